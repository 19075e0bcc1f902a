"""The model registry: register a factory by name (timm-style), build it with :func:`create_model`.

Every model accepts any channel count and any input size at or above its
spec's ``min_size``; the classifier head is sized by a dummy forward pass at
construction. Models return raw logits; convert them with
:func:`logits_to_probs`, which every inference path shares.
The architectures themselves are in :mod:`imgclf.models.architectures`.
"""

from __future__ import annotations

import difflib
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from imgclf.core.errors import UnknownModelError

__all__ = [
    "ModelSpec",
    "UnknownModelError",
    "count_parameters",
    "create_model",
    "get_spec",
    "list_models",
    "logits_to_probs",
    "num_outputs",
    "register",
]


# create_model passes these itself; everything else a factory takes is an extra kwarg.
_CORE_ARGS = ("num_classes", "in_channels", "img_size")

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """Registry entry describing one architecture.

    ``factory(num_outputs, in_channels, (h, w), **kw)`` builds the network; its
    first argument is the width of the final layer, already reduced to 1 for
    binary heads by :func:`create_model`. ``min_size`` is the smallest input
    side (in pixels, both height and width) the architecture accepts.
    """

    name: str
    factory: Factory
    default_size: int
    default_channels: int
    description: str = ""
    binary_head_for_two_classes: bool = False
    min_size: int = 1


_REGISTRY: dict[str, ModelSpec] = {}


def register(
    name: str,
    *,
    default_size: int,
    default_channels: int,
    description: str = "",
    binary_head: bool = False,
    min_size: int = 1,
) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(num_classes, in_channels, img_size, **kw)``.

    ``binary_head=True`` makes :func:`create_model` build a single-logit head for
    two classes (sigmoid/BCE is the caller's job). Raises ``ValueError`` if the
    name is already taken.
    """
    key = name.lower()

    def decorator(factory: Factory) -> Factory:
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        if min_size > default_size:
            raise ValueError(f"{key}: min_size {min_size} exceeds default_size {default_size}")
        _REGISTRY[key] = ModelSpec(
            name=key,
            factory=factory,
            default_size=default_size,
            default_channels=default_channels,
            description=description,
            binary_head_for_two_classes=binary_head,
            min_size=min_size,
        )
        return factory

    return decorator


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` for ``name`` (case-insensitive).

    Raises :class:`UnknownModelError` naming the available models and the
    closest match, if any.
    """
    key = name.lower() if isinstance(name, str) else name
    try:
        return _REGISTRY[key]
    except (KeyError, TypeError):
        pass
    available = list_models()
    msg = f"unknown model {name!r}"
    close = difflib.get_close_matches(str(key), available, n=1, cutoff=0.5)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    msg += f" Available models: {', '.join(available)}"
    raise UnknownModelError(msg)


def num_outputs(num_classes: int, spec: ModelSpec, multi_label: bool = False) -> int:
    """Final-layer width: 1 for a binary-head spec and 2 classes (single-label), else num_classes."""
    if spec.binary_head_for_two_classes and num_classes == 2 and not multi_label:
        return 1
    return num_classes


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def logits_to_probs(logits: Tensor, temperature: float = 1.0, multi_label: bool = False) -> Tensor:
    """Convert ``(N, K)`` logits to ``(N, max(K, 2))`` class probabilities.

    ``temperature`` divides the logits first (temperature scaling; 1.0 leaves them as they are).
    ``multi_label``: an independent sigmoid per label, ``(N, K)``.

    A single-logit head ``(N, 1)`` is a sigmoid over the positive class and is
    expanded to ``[1 - p, p]``; ``K > 1`` uses softmax. Only the static shape is
    inspected, so the function traces cleanly for ONNX export.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (N, K), got {tuple(logits.shape)}")
    if temperature != 1.0:
        logits = logits / temperature
    if multi_label:
        return torch.sigmoid(logits)
    if logits.shape[1] == 1:
        # sigmoid(-x) rather than 1 - sigmoid(x): no cancellation for confident
        # positives, so tiny negative-class probabilities survive.
        return torch.cat([torch.sigmoid(-logits), torch.sigmoid(logits)], dim=1)
    return torch.softmax(logits, dim=1)


def _as_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        return img_size, img_size
    if (
        isinstance(img_size, Sequence)
        and not isinstance(img_size, str)
        and len(img_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in img_size)
    ):
        return int(img_size[0]), int(img_size[1])
    raise ValueError(f"img_size must be an int or a pair of ints (h, w), got {img_size!r}")


def create_model(
    name: str,
    num_classes: int,
    in_channels: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    multi_label: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    ``multi_label`` keeps one output per label (no single-logit head for two labels).

    ``in_channels`` and ``img_size`` default to the spec's values; ``img_size`` is
    a square side or ``(h, w)`` and each side must be ``>= spec.min_size``.
    Extra ``kwargs`` go to the factory. The model gets ``arch`` (the name) and
    ``arch_args`` (JSON-serialisable, factory defaults filled in) such that
    ``create_model(model.arch, **model.arch_args)`` rebuilds it.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if in_channels is None:
        in_channels = spec.default_channels
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
    h, w = _as_hw(spec.default_size if img_size is None else img_size)
    if min(h, w) < spec.min_size:
        raise ValueError(
            f"{spec.name} needs inputs of at least {spec.min_size}x{spec.min_size} pixels, got {h}x{w}"
        )

    # Bind the kwargs against the factory so typos fail loudly and defaults are
    # recorded: a rebuilt model must not depend on defaults that may change.
    sig = inspect.signature(spec.factory)
    try:
        bound = sig.bind(num_outputs(num_classes, spec, multi_label), in_channels, (h, w), **kwargs)
    except TypeError as exc:
        extra = [p for p in sig.parameters if p not in _CORE_ARGS]
        raise TypeError(f"{spec.name}: {exc}; accepted extra kwargs: {', '.join(extra) or 'none'}") from None
    bound.apply_defaults()
    extras = {k: v for k, v in bound.arguments.items() if k not in _CORE_ARGS}
    arch_args = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "img_size": [h, w],
    }
    if multi_label:  # recorded only when set, so single-label records stay as they were
        arch_args["multi_label"] = True
    arch_args.update(extras)
    try:
        json.dumps(arch_args)
    except TypeError as exc:
        raise TypeError(f"{spec.name}: model kwargs must be JSON-serialisable: {exc}") from None

    model = spec.factory(*bound.args, **bound.kwargs)
    model.arch = spec.name
    model.arch_args = arch_args
    return model


# ---------------------------------------------------------------------------
# Shared building blocks
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Keras-tutorial reproductions
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# ResNet-20 (He et al. 2016, CIFAR variant)
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# MobileNetV3-Small (Howard et al. 2019)
# ---------------------------------------------------------------------------
