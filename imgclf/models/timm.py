"""timm architectures in the imgclf registry (``--model timm:<name>``, optional ``timm`` package)."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from imgclf.core.errors import ConfigError

TIMM_PREFIX = "timm:"


def is_timm(name: str | None) -> bool:
    return bool(name) and str(name).lower().startswith(TIMM_PREFIX)


def require_timm() -> Any:
    """Import timm, or raise a one-line ConfigError saying how to install it."""
    try:
        import timm
    except ImportError:
        raise ConfigError(
            "--model timm:<name> needs the optional timm package: pip install 'imgclf[timm]' "
            "(or pip install timm), or use a built-in model from `imgclf models`"
        ) from None
    return timm


def register_timm(name: str) -> str:
    """Register ``timm:<arch>`` in the imgclf registry (idempotent); returns the registry key."""
    from imgclf.models import registry as models

    key = name.lower()
    if key in models.list_models():
        return key
    arch = name[len(TIMM_PREFIX) :]
    timm = require_timm()
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"--model {name}: timm has no model {arch!r}{hint} (see timm.list_models())")
    cfg = timm.get_pretrained_cfg(arch) if hasattr(timm, "get_pretrained_cfg") else None
    size = 224
    if cfg is not None and getattr(cfg, "input_size", None):
        size = int(cfg.input_size[-1])

    def factory(num_classes: int, in_channels: int, img_size: tuple[int, int]) -> nn.Module:
        # Never pretrained here: a bundle rebuilds its net from this factory offline; the
        # pretrained weights are copied in by load_timm_pretrained during training only.
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)

    models.register(key, default_size=size, default_channels=3, description=f"timm {arch}", min_size=32)(
        factory
    )
    return key
