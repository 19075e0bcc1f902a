"""Grad-CAM (Selvaraju et al., 2017) for any registered model.

The target layer is found generically: the last ``nn.Conv2d`` *executed* in a forward pass whose
output still has a spatial extent (more than 1x1). Executed order, not declaration order, matters
because residual shortcuts and squeeze-excite blocks declare 1x1 convs after the main path.

The map is computed at the model's input size, then upsampled to the ORIGINAL image size so it
lines up with the photo the user gave. A multi-label bundle has one independent sigmoid per label, so
a map explains one label: the gradient is that label's logit's, and :func:`explain_labels` gives one
map per predicted label. Hand-written (about 30 lines) rather than a library:
pytorch-grad-cam needs torchvision, which this project cannot use.
"""

from __future__ import annotations

from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgclf.analysis.visualize import overlay, png_bytes
from imgclf.core.errors import ImgclfError
from imgclf.core.imageio import ImageSource, open_image
from imgclf.core.preprocess import normalize
from imgclf.runtime.bundle import Bundle


class UnknownClassError(ImgclfError, ValueError):
    """A class name or index that the bundle does not have."""


def find_target_layer(model: nn.Module, x: torch.Tensor) -> nn.Conv2d:
    """The last Conv2d run during ``model(x)`` with spatial output larger than 1x1."""
    seen: list[tuple[nn.Conv2d, tuple[int, ...]]] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, out: seen.append((mod, tuple(out.shape))))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer; Grad-CAM needs a convolutional model")
    spatial = [m for m, shape in seen if shape[-1] * shape[-2] > 1]
    return spatial[-1] if spatial else seen[-1][0]


def gradcam_batch(
    model: nn.Module,
    x: torch.Tensor,
    class_index: int | None = None,
    layer: nn.Conv2d | None = None,
    multi_label: bool = False,
) -> tuple[np.ndarray, int, np.ndarray]:
    """Grad-CAM for one normalised input ``x`` (1, C, h, w).

    Returns (map float32 (h', w') at the layer's resolution, in [0, 1]; class used; probabilities).
    ``multi_label``: the probabilities are per-label sigmoids; the gradient is still that of the
    chosen label's own logit (default: the most probable label).
    """
    from imgclf.models.registry import logits_to_probs

    layer = layer or find_target_layer(model, x)
    acts: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        with torch.enable_grad():
            logits = model(x)
            probs = logits_to_probs(logits.detach(), multi_label=multi_label)[0]
            k = int(probs.argmax()) if class_index is None else int(class_index)
            # A single-logit (binary) head scores class 1 with +logit and class 0 with -logit.
            score = logits[0, 0] * (1 if k == 1 else -1) if logits.shape[1] == 1 else logits[0, k]
            (grad,) = torch.autograd.grad(score, acts[-1])
    finally:
        hook.remove()
    a = acts[-1].detach()[0]
    weights = grad[0].mean(dim=(1, 2))  # global-average-pooled gradients, one weight per channel
    cam = F.relu((weights[:, None, None] * a).sum(0))
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    return cam.float().numpy(), k, probs.float().numpy()


def _as_reusable(source: ImageSource) -> ImageSource:
    # A stream can be read only once; we decode twice (model input + original), so buffer it.
    if hasattr(source, "read"):
        return bytes(source.read())  # type: ignore[union-attr]
    return source


def _word(bundle: Bundle) -> str:
    return "label" if bundle.multi_label else "class"


def _plural(word: str) -> str:
    return word + ("es" if word == "class" else "s")


def _class_index(bundle: Bundle, class_index: int | None) -> int | None:
    if class_index is None:
        return None
    k = len(bundle.classes)
    if not 0 <= int(class_index) < k:
        w = _word(bundle)
        raise UnknownClassError(f"{w} index {class_index} out of range: this bundle has {k} {_plural(w)}")
    return int(class_index)


def class_index_of(bundle: Bundle, class_name: str) -> int:
    """Index of ``class_name`` (a class, or a label of a multi-label bundle); a one-line error
    listing them otherwise."""
    try:
        return bundle.classes.index(class_name)
    except ValueError:
        w = _word(bundle)
        raise UnknownClassError(
            f"{w} {class_name!r} is not in this bundle; its {_plural(w)} are: {', '.join(bundle.classes)}"
        ) from None


def gradcam(
    bundle: Bundle,
    source: ImageSource | IO[bytes],
    class_index: int | None = None,
    *,
    max_side: int | None = None,
) -> tuple[np.ndarray, int, np.ndarray]:
    """Grad-CAM for one image.

    Returns (heatmap float32 HxW in [0, 1] at the original image's size, class index used,
    original image as uint8 HxWx3). ``class_index`` None explains the predicted class.
    ``max_side`` shrinks the returned original (and heatmap) to at most that many pixels a side.
    Raises :class:`imgclf.core.imageio.ImageDecodeError` for an unusable image.
    """
    source = _as_reusable(source)
    k = _class_index(bundle, class_index)
    img = open_image(source, channels=3)
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side))  # the CAM is model-sized anyway: a big overlay only costs time
    original = np.asarray(img, dtype=np.uint8)
    # The model input goes through the bundle's own recipe, exactly as predict does.
    x = normalize(torch.from_numpy(np.array(bundle.prepare(source)[None])), bundle.pre)
    cam, used, _ = gradcam_batch(bundle.model, x, k, multi_label=bundle.multi_label)
    h, w = original.shape[:2]
    up = F.interpolate(torch.from_numpy(cam)[None, None], size=(h, w), mode="bilinear", align_corners=False)
    heat = up[0, 0].clamp_(0.0, 1.0).numpy().astype(np.float32)
    return heat, used, original


def overlay_png(
    bundle: Bundle,
    source: ImageSource | IO[bytes],
    class_name: str | None = None,
    alpha: float = 0.45,
    *,
    max_side: int | None = None,
) -> bytes:
    """PNG bytes of the Grad-CAM heatmap (jet colormap) blended onto the original image
    (shrunk to ``max_side`` pixels a side when given)."""
    k = class_index_of(bundle, class_name) if class_name is not None else None
    heat, _, original = gradcam(bundle, source, k, max_side=max_side)
    return png_bytes(overlay(original, heat, alpha=alpha))


def _overlays(
    bundle: Bundle,
    source: ImageSource | IO[bytes],
    class_name: str | None,
    alpha: float,
    max_side: int | None = None,
) -> list[tuple[np.ndarray, str, float]]:
    """[(overlay image, label explained, its probability)]: ``class_name`` or the predicted class;
    every predicted label of a multi-label bundle (see :func:`labels_to_explain`)."""
    source = _as_reusable(source)
    probs = bundle.predict_batch(bundle.prepare(source)[None])[0]
    if bundle.multi_label:
        ks: list[int | None] = list(labels_to_explain(bundle, source, class_name, probs=probs))
    else:
        ks = [class_index_of(bundle, class_name) if class_name is not None else None]
    out = []
    for k in ks:
        heat, used, original = gradcam(bundle, source, k, max_side=max_side)
        out.append((overlay(original, heat, alpha=alpha), bundle.classes[used], float(probs[used])))
    return out


def explain_png(
    bundle: Bundle,
    source: ImageSource | IO[bytes],
    class_name: str | None = None,
    alpha: float = 0.45,
    *,
    max_side: int | None = None,
) -> tuple[bytes, list[tuple[str, float]]]:
    """(PNG bytes, [(label explained, its probability)]) for one image: the overlay of
    ``class_name`` or the predicted class; for a multi-label bundle without ``class_name``, one
    overlay per predicted label (most probable first) side by side in one PNG."""
    maps = _overlays(bundle, source, class_name, alpha, max_side)
    return png_bytes(np.concatenate([m for m, _, _ in maps], axis=1)), [(c, p) for _, c, p in maps]


def explain_file(
    bundle: Bundle, source: ImageSource, class_name: str | None = None, alpha: float = 0.45
) -> tuple[bytes, str, float]:
    """(overlay PNG bytes, class explained, its probability) for one image."""
    source = _as_reusable(source)
    k = class_index_of(bundle, class_name) if class_name is not None else None
    heat, used, original = gradcam(bundle, source, k)
    prob = float(bundle.predict_batch(bundle.prepare(source)[None])[0, used])
    return png_bytes(overlay(original, heat, alpha=alpha)), bundle.classes[used], prob


def labels_to_explain(
    bundle: Bundle, source: ImageSource, label: str | None = None, *, probs: np.ndarray | None = None
) -> list[int]:
    """Indices of the labels a multi-label map is drawn for: ``label`` when given, else every
    predicted label (most probable first), else (an empty set) the most probable label.
    ``probs``: the image's probabilities when the caller already has them."""
    if label is not None:
        return [class_index_of(bundle, label)]
    if probs is None:
        probs = bundle.predict_batch(bundle.prepare(source)[None])[0]
    if bundle.thresholds is None:
        return [int(np.argmax(probs))]
    on = np.flatnonzero(probs >= bundle.thresholds)
    on = on[np.argsort(-probs[on], kind="stable")]
    # An empty set still gets one map, so every image explains something; its line shows the
    # probability, which is then below the label's threshold.
    return [int(i) for i in on] if len(on) else [int(np.argmax(probs))]


def explain_labels(
    bundle: Bundle, source: ImageSource, label: str | None = None, alpha: float = 0.45
) -> list[tuple[bytes, str, float]]:
    """[(overlay PNG bytes, label explained, its probability)] for one image: one map per
    predicted label of a multi-label bundle (or just ``label``); the predicted class otherwise."""
    return [(png_bytes(m), c, p) for m, c, p in _overlays(bundle, source, label, alpha)]


__all__ = [
    "explain_labels",
    "explain_png",
    "labels_to_explain",
    "UnknownClassError",
    "class_index_of",
    "explain_file",
    "find_target_layer",
    "gradcam",
    "gradcam_batch",
    "overlay_png",
]
