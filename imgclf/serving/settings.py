"""Every ``imgclf serve`` option with its default and help, declared once.

:func:`imgclf.serving.app.create_app` takes these as keywords and ``imgclf serve`` builds its
flags from them; this module imports nothing heavy, so ``imgclf --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _opt(default: Any, help: str, *, flag: str | None = None, ge: float | None = None) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag, "ge": ge})


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of one server; every field is also an ``imgclf serve`` flag."""

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
    max_queue: int = _opt(1024, "most images waiting for inference; beyond it requests get 503", ge=1)
    decode_threads: int | None = _opt(None, "threads decoding uploads (default: min(4, cores))", ge=1)
    request_timeout_s: float = _opt(
        30.0, "seconds a client may take to send its request body before it gets 408", ge=0.1
    )
    explain_max_pixels: int = _opt(
        12_000_000, "largest image /v1/explain accepts (Grad-CAM keeps several copies in memory)", ge=1
    )

    def validate(self) -> ServeSettings:
        for f in dataclasses.fields(self):
            v, ge = getattr(self, f.name), f.metadata["ge"]
            if v is not None and ge is not None and v < ge:
                raise ValueError(f"{f.name.replace('_', '-')} must be >= {ge}, got {v}")
        return self


DEFAULTS = ServeSettings()
