"""Every ``imgclf serve`` option with its default and help, declared once.

:class:`ServeSettings` is what one app enforces (batching and limits; the keywords of
:func:`imgclf.serving.app.create_app`); :class:`ServerSettings` is how the process runs it
(address, worker processes, threads). ``imgclf serve`` builds one flag per field of both, and
:func:`imgclf.serving.app.serve` takes the fields of both as keywords. This module imports
nothing heavy, so ``imgclf --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from imgclf.core.errors import ConfigError


def _opt(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    ge: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A field whose help, CLI flag (default ``--field-name``), lower bound and choices travel with it."""
    return field(default=default, metadata={"help": help, "flag": flag, "ge": ge, "choices": choices})


def flag_of(f: dataclasses.Field) -> str:
    """The ``imgclf serve`` flag of a settings field."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def value_type(cls: type, f: dataclasses.Field) -> type:
    """The value type of a field (``int | None`` -> ``int``), for argparse."""
    tp = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


class _Checked:
    def validate(self) -> typing.Self:
        """Raise :class:`ConfigError` naming the field and its flag when a value is out of range."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v, ge, choices = getattr(self, f.name), f.metadata["ge"], f.metadata["choices"]
            if v is None:
                continue
            if ge is not None and v < ge:
                raise ConfigError(f"{f.name} ({flag_of(f)}) must be >= {ge:g}, got {v}")
            if choices and v not in choices:
                raise ConfigError(f"{f.name} ({flag_of(f)}) must be one of {', '.join(choices)}, got {v!r}")
        return self


@dataclass(frozen=True)
class ServeSettings(_Checked):
    """Batching and limits of one app; every field is also an ``imgclf serve`` flag."""

    max_batch: int = _opt(32, "most images per inference batch (1 = no batching)", ge=1)
    max_wait_ms: float = _opt(5.0, "longest a queued image waits for others to fill its batch", ge=0)
    max_upload_bytes: int = _opt(
        20 * 1024 * 1024,
        "largest request body in bytes (bigger uploads get 413)",
        flag="--max-upload-bytes",
        ge=1,
    )
    # Per image of a request, lower than the 100 MP that training and `predict` accept
    # (imgclf.core.imageio.DEFAULT_MAX_PIXELS): a server decodes strangers' uploads concurrently.
    # A 3024x3024 phone photo is 9 MP; 40 MP leaves room for big cameras while refusing bombs.
    max_image_pixels: int = _opt(
        40_000_000, "largest image in a request, in pixels (width x height); bigger ones get 413", ge=1
    )
    max_request_pixels: int = _opt(
        200_000_000,
        "most pixels all images of one request may have together (so one request cannot hold the "
        "decoders and memory for long); bigger requests get 413",
        ge=1,
    )
    max_images: int = _opt(64, "most images in one request", ge=1)
    # A request of more than max_batch // 4 images is bulk (imgclf.serving.batcher): its images go
    # in batches of at most this many, so a small request that arrives while one runs waits for
    # few images' inference, not a full batch (bench/chaos.py --server; docs/SERVE.md).
    bulk_batch: int = _opt(
        4,
        "most images of a bulk request (more than a quarter of --max-batch images) per inference "
        "batch; small requests go first and never wait behind a bigger bulk batch",
        ge=1,
    )
    max_queue: int = _opt(1024, "most images waiting for inference; beyond it requests get 503", ge=1)
    decode_threads: int | None = _opt(None, "threads decoding uploads (default: min(4, cores))", ge=1)
    request_timeout_s: float = _opt(
        30.0, "seconds a client may take to send its request body before it gets 408", ge=0.1
    )
    explain_max_pixels: int = _opt(
        12_000_000, "largest image /v1/explain accepts (Grad-CAM keeps several copies in memory)", ge=1
    )
    # Per client address, so one client opening many connections cannot take every decode
    # thread and queue slot. 32 lets one client keep a full default batch in flight; behind a
    # reverse proxy every client has the proxy's address, so raise it or turn it off (0) there.
    max_client_requests: int = _opt(
        32,
        "most /v1/predict and /v1/explain requests one client address may have in flight; "
        "more get 429 (0 = no limit; behind a proxy all clients share its address)",
        ge=0,
    )


@dataclass(frozen=True)
class ServerSettings(_Checked):
    """How the process serves the app: address, processes, threads; each is an ``imgclf serve`` flag."""

    host: str = _opt("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network")
    port: int = _opt(8000, "TCP port (0 = any free port)", ge=0)
    workers: int = _opt(
        1, "uvicorn worker processes; EACH loads its own copy of the model and has its own /metrics", ge=1
    )
    threads: int | None = _opt(
        None,
        "compute threads per worker, for ONNX Runtime and torch (unset: ONNX Runtime gets the "
        "cores minus one, shared by the workers, so one core is left for HTTP; torch its own choice)",
        ge=1,
    )
    backend: str | None = _opt(
        None,
        "inference engine (unset: $IMGCLF_BACKEND, else auto = onnxruntime when installed)",
        choices=("auto", "torch", "onnxruntime"),
    )
    graceful_timeout: float = _opt(30.0, "seconds to let open requests finish on shutdown", ge=0)
    log_level: str = _opt(
        "info", "uvicorn log level", choices=("critical", "error", "warning", "info", "debug")
    )


DEFAULTS = ServeSettings()
SERVER_DEFAULTS = ServerSettings()


def split_settings(options: dict[str, Any]) -> tuple[ServeSettings, ServerSettings]:
    """Keywords naming fields of either class -> both, validated; an unknown name is a TypeError."""
    app_names = {f.name for f in dataclasses.fields(ServeSettings)}
    server_names = {f.name for f in dataclasses.fields(ServerSettings)}
    unknown = sorted(set(options) - app_names - server_names)
    if unknown:
        raise TypeError(
            f"unknown serve option(s) {', '.join(unknown)}; they are the fields of ServeSettings "
            "and ServerSettings (imgclf/serving/settings.py)"
        )
    app = ServeSettings(**{k: v for k, v in options.items() if k in app_names})
    server = ServerSettings(**{k: v for k, v in options.items() if k in server_names})
    return app.validate(), server.validate()
