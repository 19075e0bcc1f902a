"""The same HTTP API as ``imgclf serve`` on Ray Serve (``pip install 'imgclf[ray]'``).

Each replica builds the FastAPI app of :func:`imgclf.serving.app.create_app` (routes, limits, its
dynamic batcher, /metrics) inside its own Ray actor; Ray Serve's proxy spreads requests across
``replicas`` replicas, on any node of the cluster. Only ``imgclf serve --ray`` imports this.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from ray import serve

from imgclf.runtime.bundle import load_bundle, resolve_bundle_dir
from imgclf.serving.settings import SERVER_DEFAULTS


@serve.ingress()  # the app is built in each replica, by __serve_build_asgi_app__
class ImgclfDeployment:
    """One replica: loads the bundle and serves imgclf's FastAPI app."""

    def __init__(self, bundle: str, options: dict[str, Any], threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.bundle = bundle
        self.options = options

    def __serve_build_asgi_app__(self) -> Any:
        from imgclf.serving.app import create_app

        return create_app(self.bundle, **self.options)


def build_app(
    bundle: str | os.PathLike,
    *,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    threads: int | None = None,
    **options: Any,
) -> Any:
    """A bound Ray Serve application; ``options`` are :func:`imgclf.serving.app.create_app`'s."""
    d = str(Path(resolve_bundle_dir(bundle)).resolve())
    load_bundle(d)  # a broken bundle fails here with one clear line, not in every replica
    dep = serve.deployment(ImgclfDeployment).options(
        name="imgclf",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    return dep.bind(d, options, threads)


def start(
    bundle: str | os.PathLike,
    *,
    host: str = SERVER_DEFAULTS.host,
    port: int = SERVER_DEFAULTS.port,
    replicas: int = 1,
    address: str | None = None,
    threads: int | None = None,
    **options: Any,
) -> str:
    """Deploy on Ray Serve (starting or joining Ray) and return the base URL; does not block."""
    from imgclf.training.distributed import init_ray

    init_ray(address)
    app = build_app(bundle, replicas=replicas, threads=threads, **options)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="imgclf", route_prefix="/")
    return f"http://{host}:{port}"


def run_blocking(bundle: str | os.PathLike, **kw: Any) -> int:
    """``imgclf serve --ray``: deploy, then wait for Ctrl-C and shut Serve down."""
    import ray

    url = start(bundle, **kw)
    print(
        f"imgclf serve: {url}/ on Ray Serve with {kw.get('replicas', 1)} replica(s) (API docs at /docs); "
        "Ctrl-C stops it",
        file=sys.stderr,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
