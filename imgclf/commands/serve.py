"""imgclf serve"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from imgclf.serving.settings import ServeSettings

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


def add_settings_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`~imgclf.serving.settings.ServeSettings` field, default and help from it."""
    for f in dataclasses.fields(ServeSettings):
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        tp = float if f.type in ("float", float) else int
        p.add_argument(flag, dest=f.name, type=tp, default=f.default, help=f.metadata["help"])
    p.add_argument(
        "--max-upload-mb", type=float, default=None, help="the body limit in MiB (instead of bytes)"
    )
    p.add_argument("--max-pixels", dest="max_image_pixels", type=int, help=argparse.SUPPRESS)  # older name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder (a run's model/ folder, or the run folder)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    add_settings_arguments(p)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn worker processes; EACH loads its own copy of the model and has its own /metrics",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "onnxruntime"],
        default=None,
        help="inference engine (unset: $IMGCLF_BACKEND, else auto = onnxruntime when installed)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads per worker, for ONNX Runtime and torch (unset: ONNX Runtime gets the "
        "cores minus one, shared by the workers, so one core is left for HTTP; torch its own choice)",
    )
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds to let open requests finish on shutdown",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="serve on Ray Serve (pip install 'imgclf[ray]'): the same API, replicas on any node",
    )
    p.add_argument("--replicas", type=int, default=1, help="with --ray: Ray Serve replicas (models)")
    p.add_argument(
        "--ray-address", default=None, help="with --ray: cluster to join: auto or ray://HEAD:10001"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level",
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from imgclf.runtime.bundle import load_bundle
    from imgclf.runtime.onnxrt import THREADS_ENV
    from imgclf.serving.app import ENV_CONFIG, create_app

    if args.max_upload_mb is not None:
        args.max_upload_bytes = int(args.max_upload_mb * 2**20)
    for flag, value, low in (("--workers", args.workers, 1), ("--port", args.port, 0)):
        if value < low:
            print(f"imgclf serve: error: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    opts: dict = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)}
    try:
        ServeSettings(**opts).validate()
    except ValueError as e:
        print(f"imgclf serve: error: --{e}", file=sys.stderr)
        return 2
    opts["backend"] = args.backend
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"imgclf serve: warning: binding {args.host}: the API has no authentication; "
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
            host=args.host,
            port=args.port,
            replicas=args.replicas,
            address=args.ray_address,
            threads=args.threads,
            **opts,
        )
    if args.threads:
        os.environ[THREADS_ENV] = str(args.threads)
    elif THREADS_ENV not in os.environ:
        # Inference and HTTP handling share the machine: measured on 2 cores, one ORT thread
        # beside the event loop beat two fighting it (docs/SERVE.md). Workers inherit this.
        os.environ[THREADS_ENV] = str(max(1, ((os.cpu_count() or 1) - 1) // max(1, args.workers)))
    common = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "timeout_graceful_shutdown": args.graceful_timeout,
        # idle keep-alive connections are dropped; a header that never ends is cut at 64 KiB
        "timeout_keep_alive": 5,
        "h11_max_incomplete_event_size": 64 * 1024,
    }
    if args.workers == 1:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        app = create_app(args.bundle, **opts)  # BundleError -> one-line message from cli.main
        print(f"imgclf serve: http://{args.host}:{args.port}/  (API docs at /docs)", file=sys.stderr)
        uvicorn.run(app, **common)
        return 0
    # Several processes: uvicorn needs an import string; each worker rebuilds the app from the
    # environment. Load once here so a broken bundle fails with one clear line, not N tracebacks.
    bundle = load_bundle(args.bundle, backend=args.backend)
    del bundle
    os.environ[ENV_CONFIG] = json.dumps(
        {"bundle": os.path.abspath(args.bundle), "torch_threads": args.threads, **opts}
    )
    print(
        f"imgclf serve: http://{args.host}:{args.port}/ with {args.workers} workers (each loads the model)",
        file=sys.stderr,
    )
    uvicorn.run("imgclf.serving.app:app_from_env", factory=True, workers=args.workers, **common)
    return 0
