"""Test-time augmentation: average a bundle's probabilities over flipped/shifted copies.

Each view is a plain uint8 NHWC batch fed through :meth:`Bundle.predict_batch`, so TTA uses the
one preprocessing path. Views are chosen to match what training saw: horizontal flips only when
the bundle was trained with ``flip on`` (never for digits), shifts of about 1/14 of the side
(2 px at 28x28) with edge replication, as the training augmentation fills borders.

    from imgclf.runtime.bundle import load_bundle
    from imgclf.runtime.tta import predict_tta
    probs = predict_tta(bundle, uint8_nhwc_batch)          # views chosen from the bundle
    probs = predict_tta(bundle, batch, views="flip")       # or an explicit set
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

View = Callable[[np.ndarray], np.ndarray]

VIEW_SETS = ("auto", "identity", "flip", "shift", "flip-shift")


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _hflip(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[:, :, ::-1, :])


def _shift(dy: int, dx: int) -> View:
    """Translate NHWC images by (dy, dx) pixels, replicating the edge (Keras fill_mode='nearest')."""

    def f(x: np.ndarray) -> np.ndarray:
        h, w = x.shape[1], x.shape[2]
        ys = np.clip(np.arange(h) - dy, 0, h - 1)
        xs = np.clip(np.arange(w) - dx, 0, w - 1)
        return np.ascontiguousarray(x[:, ys][:, :, xs])

    return f


def views_for(name: str, size: int, flip_ok: bool = True) -> list[View]:
    """The list of view functions for a named set at image side ``size``."""
    if name not in VIEW_SETS or name == "auto":
        raise ValueError(f"unknown TTA set {name!r}; choose one of {', '.join(VIEW_SETS)}")
    views: list[View] = [_identity]
    if name in ("flip", "flip-shift") and flip_ok:
        views.append(_hflip)
    if name in ("shift", "flip-shift"):
        d = max(1, round(size / 14))
        views += [_shift(d, 0), _shift(-d, 0), _shift(0, d), _shift(0, -d)]
    return views


def auto_views(bundle: Any) -> str:
    """The view set matching the bundle's training: only transforms it was trained to ignore.

    A model trained without augmentation gets ``identity`` (measured: shifted views cost an
    undertrained MNIST LeNet 2 points); flips only when it trained with flips.
    """
    return config_views(bundle.meta.get("train_config", {}) or {})


def config_views(tc: dict[str, Any]) -> str:
    """:func:`auto_views` from a training config's dict (the trainer's check, before a bundle)."""
    if tc.get("augment") != "on":
        return "identity"
    flipped = tc.get("flip") == "on"
    shifted = float(tc.get("shift") or 0) > 0
    return {(True, True): "flip-shift", (True, False): "flip", (False, True): "shift"}.get(
        (flipped, shifted), "identity"
    )


def predict_tta(bundle: Any, batch: np.ndarray, views: str | Sequence[View] = "auto") -> np.ndarray:
    """uint8 NHWC ``batch`` -> (N, K) probabilities averaged over the TTA views.

    ``views``: ``auto`` (from the bundle's training config), a name from :data:`VIEW_SETS`, or a
    list of functions mapping a uint8 NHWC array to another of the same shape.
    """
    batch = np.asarray(batch)
    if batch.ndim != 4:
        raise ValueError(f"expected a uint8 NHWC batch, got shape {batch.shape}")
    if isinstance(views, str):
        name = auto_views(bundle) if views == "auto" else views
        fns = views_for(name, int(batch.shape[1]))
    else:
        fns = list(views)
    if not fns:
        raise ValueError("predict_tta needs at least one view")
    total = None
    for fn in fns:
        p = bundle.predict_batch(fn(batch)).astype(np.float64)
        total = p if total is None else total + p
    probs = total / len(fns)
    return (probs / probs.sum(1, keepdims=True)).astype(np.float32)
