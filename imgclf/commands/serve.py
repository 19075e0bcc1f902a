"""imgclf serve"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from imgclf.serving.settings import ServerSettings, ServeSettings, flag_of, value_type

NAME = "serve"
HELP = "serve a bundle over HTTP (JSON API with dynamic batching, web page, /metrics)"
DESCRIPTION = (
    "Start an HTTP server for a bundle. POST /v1/predict takes multipart image files (or one raw "
    "image body) and returns the top-k classes per image in upload order; POST /v1/explain returns "
    "a Grad-CAM overlay PNG; GET / is a web page to try the model; GET /v1/model, /healthz, "
    "/metrics (Prometheus) and /docs (OpenAPI). Requests from many clients are gathered into "
    "batches of up to --max-batch images, waiting at most --max-wait-ms for more. "
    "Binds 127.0.0.1 unless --host says otherwise. Stop with Ctrl-C: open requests are finished first."
)


def _add_fields(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the settings class ``cls``; type, default, help and choices from it."""
    for f in dataclasses.fields(cls):
        kw = {"dest": f.name, "type": value_type(cls, f), "default": f.default, "help": f.metadata["help"]}
        if f.metadata["choices"]:
            kw["choices"] = f.metadata["choices"]
        p.add_argument(flag_of(f), **kw)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder (a run's model/ folder, or the run folder)")
    _add_fields(p, ServerSettings)
    _add_fields(p, ServeSettings)
    p.add_argument(
        "--max-upload-mb", type=float, default=None, help="the body limit in MiB (instead of bytes)"
    )
    p.add_argument("--max-pixels", dest="max_image_pixels", type=int, help=argparse.SUPPRESS)  # older name
    p.add_argument(
        "--ray",
        action="store_true",
        help="serve on Ray Serve (pip install 'imgclf[ray]'): the same API, replicas on any node",
    )
    p.add_argument("--replicas", type=int, default=1, help="with --ray: Ray Serve replicas (models)")
    p.add_argument(
        "--ray-address", default=None, help="with --ray: cluster to join: auto or ray://HEAD:10001"
    )


def run(args: argparse.Namespace) -> int:
    from imgclf.serving.app import run_server

    if args.max_upload_mb is not None:
        args.max_upload_bytes = int(args.max_upload_mb * 2**20)
    # Out-of-range values raise ConfigError: cli.main prints it as one line (exit 2).
    settings = ServeSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)})
    server = ServerSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerSettings)})
    settings.validate()
    server.validate()
    if server.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"imgclf serve: warning: binding {server.host}: the API has no authentication; "
            "put it behind a proxy you control",
            file=sys.stderr,
        )
    if args.ray:
        if args.replicas < 1:
            print("imgclf serve: error: --replicas must be >= 1", file=sys.stderr)
            return 2
        try:
            from imgclf.serving.ray_serve import run_blocking
        except ImportError as e:
            print(f"imgclf serve: error: --ray needs Ray ({e}): pip install 'imgclf[ray]'", file=sys.stderr)
            return 2
        return run_blocking(
            args.bundle,
            host=server.host,
            port=server.port,
            replicas=args.replicas,
            address=args.ray_address,
            threads=server.threads,
            backend=server.backend,
            **dataclasses.asdict(settings),
        )
    # A broken bundle raises BundleError: one line from cli.main.
    run_server(
        args.bundle, settings, server, announce=lambda msg: print(f"imgclf serve: {msg}", file=sys.stderr)
    )
    return 0
