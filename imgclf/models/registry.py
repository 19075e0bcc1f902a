"""Model registry and architectures for imgclf.

Models are registered by name (timm-style) and built with :func:`create_model`.
Every model accepts any channel count and any input size at or above its
spec's ``min_size``; the classifier head is sized by a dummy forward pass at
construction. Models return raw logits; convert them with
:func:`logits_to_probs`, which every inference path shares.

The first four architectures reproduce Keras tutorials layer for layer, so
they use Keras defaults: BatchNormalization(momentum=0.99, epsilon=1e-3),
glorot-uniform kernels and zero biases.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
from collections import OrderedDict
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

# Keras updates BN running stats as ``m * running + (1 - m) * batch`` and torch as
# ``(1 - m) * running + m * batch``; Keras' default 0.99 would be torch 0.01. We use torch's 0.1
# (Keras 0.9): with 0.01 the running stats need ~500 steps to settle, so short runs on small
# folders (50 steps/epoch) evaluated at chance level although training accuracy was high.
_KERAS_BN_MOMENTUM = 0.1
_KERAS_BN_EPS = 1e-3

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


def num_outputs(num_classes: int, spec: ModelSpec) -> int:
    """Final-layer width: 1 for a binary-head spec and 2 classes, else num_classes."""
    if spec.binary_head_for_two_classes and num_classes == 2:
        return 1
    return num_classes


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def logits_to_probs(logits: Tensor) -> Tensor:
    """Convert ``(N, K)`` logits to ``(N, max(K, 2))`` class probabilities.

    A single-logit head ``(N, 1)`` is a sigmoid over the positive class and is
    expanded to ``[1 - p, p]``; ``K > 1`` uses softmax. Only the static shape is
    inspected, so the function traces cleanly for ONNX export.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (N, K), got {tuple(logits.shape)}")
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
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

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
        bound = sig.bind(num_outputs(num_classes, spec), in_channels, (h, w), **kwargs)
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


class _FeatureClassifier(nn.Module):
    """``features`` -> flatten -> ``classifier``, the layout shared by every model."""

    def __init__(self, features: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


@torch.no_grad()
def _feature_dim(features: nn.Module, in_channels: int, hw: tuple[int, int]) -> int:
    """Flattened size of ``features`` for one ``(in_channels, *hw)`` input."""
    was_training = features.training
    # Eval mode so the dummy pass leaves BatchNorm running stats untouched.
    features.eval()
    try:
        out = features(torch.zeros(1, in_channels, *hw))
    finally:
        features.train(was_training)
    return int(out[0].numel())


def _keras_bn2d(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=_KERAS_BN_EPS, momentum=_KERAS_BN_MOMENTUM)


def _keras_bn1d(c: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(c, eps=_KERAS_BN_EPS, momentum=_KERAS_BN_MOMENTUM)


def _init_keras(model: nn.Module) -> nn.Module:
    # Keras Conv2D/Dense default: glorot_uniform kernel, zero bias. torch's
    # xavier fan computation for conv (in*k*k, out*k*k) matches Keras'.
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _init_kaiming(model: nn.Module, linear_std: float | None = None) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is None:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
    return model


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


# ---------------------------------------------------------------------------
# Keras-tutorial reproductions
# ---------------------------------------------------------------------------


@register(
    "lenet",
    default_size=28,
    default_channels=1,
    description="LeNet: 2x(conv5x5-relu-pool2), dense 500 (MNIST)",
    # Two 'valid' 2x2 pools need at least 4 pixels to leave a 1x1 map.
    min_size=4,
)
def _lenet(num_classes: int, in_channels: int, img_size: tuple[int, int]) -> nn.Module:
    features = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 20, 5, padding=2),
            relu1=nn.ReLU(inplace=True),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(20, 50, 5, padding=2),
            relu2=nn.ReLU(inplace=True),
            pool2=nn.MaxPool2d(2),
        )
    )
    flat = _feature_dim(features, in_channels, img_size)
    classifier = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(flat, 500),
            relu3=nn.ReLU(inplace=True),
            fc2=nn.Linear(500, num_classes),
        )
    )
    return _init_keras(_FeatureClassifier(features, classifier))


def _conv_relu_bn(cin: int, cout: int) -> list[nn.Module]:
    # The tutorials put BN after the activation: conv -> ReLU -> BN.
    return [
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.ReLU(inplace=True),
        _keras_bn2d(cout),
    ]


@register(
    "smallervggnet",
    default_size=96,
    default_channels=3,
    description="SmallerVGGNet: 5x conv-relu-bn (32/64/128), dense 1024 (Pokedex)",
    # Pools of 3, 2, 2 (all 'valid') need 12 pixels to leave a 1x1 map.
    min_size=12,
)
def _smallervggnet(num_classes: int, in_channels: int, img_size: tuple[int, int]) -> nn.Module:
    features = nn.Sequential(
        *_conv_relu_bn(in_channels, 32),
        nn.MaxPool2d(3),
        nn.Dropout(0.25),
        *_conv_relu_bn(32, 64),
        *_conv_relu_bn(64, 64),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        *_conv_relu_bn(64, 128),
        *_conv_relu_bn(128, 128),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
    )
    flat = _feature_dim(features, in_channels, img_size)
    classifier = nn.Sequential(
        nn.Linear(flat, 1024),
        nn.ReLU(inplace=True),
        _keras_bn1d(1024),
        nn.Dropout(0.5),
        nn.Linear(1024, num_classes),
    )
    return _init_keras(_FeatureClassifier(features, classifier))


@register(
    "simplecnn",
    default_size=64,
    default_channels=3,
    description="Simple CNN: 2x(conv-relu-pool), dense 128; 1 logit for 2 classes",
    binary_head=True,
    # valid 3x3 -> pool2 -> valid 3x3 -> pool2 leaves 1x1 from 10 pixels.
    min_size=10,
)
def _simplecnn(num_classes: int, in_channels: int, img_size: tuple[int, int]) -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )
    flat = _feature_dim(features, in_channels, img_size)
    classifier = nn.Sequential(
        nn.Linear(flat, 128),
        nn.ReLU(inplace=True),
        nn.Dropout(0.2),
        nn.Linear(128, num_classes),
    )
    return _init_keras(_FeatureClassifier(features, classifier))


@register(
    "minivgg",
    default_size=64,
    default_channels=3,
    description="MiniVGG: 3x(2x conv-relu-bn, pool) (32/64/128), dense 512 (apparel); "
    "blocks=2 is the Fashion-MNIST tutorial's net",
    # Three 'valid' 2x2 pools need 8 pixels to leave a 1x1 map.
    min_size=8,
)
def _minivgg(
    num_classes: int, in_channels: int, img_size: tuple[int, int], width: int = 32, blocks: int = 3
) -> nn.Module:
    _check_positive_int("width", width)
    _check_positive_int("blocks", blocks)
    if blocks > 3:
        raise ValueError(f"minivgg: blocks must be 1, 2 or 3, got {blocks}")
    layers: list[nn.Module] = []
    cin = in_channels
    for i in range(blocks):
        filters = width * 2**i
        layers += _conv_relu_bn(cin, filters)
        layers += _conv_relu_bn(filters, filters)
        layers += [nn.MaxPool2d(2), nn.Dropout(0.25)]
        cin = filters
    features = nn.Sequential(*layers)
    flat = _feature_dim(features, in_channels, img_size)
    classifier = nn.Sequential(
        nn.Linear(flat, 512),
        nn.ReLU(inplace=True),
        _keras_bn1d(512),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    )
    return _init_keras(_FeatureClassifier(features, classifier))


# ---------------------------------------------------------------------------
# ResNet-20 (He et al. 2016, CIFAR variant)
# ---------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        # Option B: a projection only where the shape changes, identity elsewhere.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@register(
    "resnet20",
    default_size=32,
    default_channels=3,
    description="CIFAR ResNet-20: 3x3 basic blocks (16/32/64), 1x1 conv shortcuts",
    # Padded convs + global pooling never collapse the map; 8 px is a sanity
    # floor (the last stage is already 1x1 there).
    min_size=8,
)
def _resnet20(num_classes: int, in_channels: int, img_size: tuple[int, int], width: int = 16) -> nn.Module:
    _check_positive_int("width", width)
    n_blocks = 3  # depth 6n + 2 = 20
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    ]
    cin = width
    for stage, cout in enumerate((width, width * 2, width * 4)):
        for i in range(n_blocks):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(_BasicBlock(cin, cout, stride))
            cin = cout
    layers.append(nn.AdaptiveAvgPool2d(1))
    features = nn.Sequential(*layers)
    flat = _feature_dim(features, in_channels, img_size)
    model = _FeatureClassifier(features, nn.Linear(flat, num_classes))
    return _init_kaiming(model)


# ---------------------------------------------------------------------------
# MobileNetV3-Small (Howard et al. 2019)
# ---------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int = 8) -> int:
    # Channel rounding from the reference implementation: nearest multiple of
    # 8, never more than 10% below the requested value.
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _mbv3_bn(c: int) -> nn.BatchNorm2d:
    # The reference MobileNetV3 uses the same BN settings as Keras.
    return nn.BatchNorm2d(c, eps=_KERAS_BN_EPS, momentum=_KERAS_BN_MOMENTUM)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = _make_divisible(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = torch.mean(x, dim=(2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.relu(self.fc1(s))))


class _InvertedResidual(nn.Module):
    def __init__(
        self,
        cin: int,
        kernel: int,
        expanded: int,
        cout: int,
        se: bool,
        hs: bool,
        stride: int,
    ) -> None:
        super().__init__()
        act: type[nn.Module] = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers += [
                nn.Conv2d(cin, expanded, 1, bias=False),
                _mbv3_bn(expanded),
                act(),
            ]
        layers += [
            nn.Conv2d(
                expanded,
                expanded,
                kernel,
                stride=stride,
                padding=kernel // 2,
                groups=expanded,
                bias=False,
            ),
            _mbv3_bn(expanded),
            act(),
        ]
        if se:
            layers.append(_SqueezeExcite(expanded))
        layers += [nn.Conv2d(expanded, cout, 1, bias=False), _mbv3_bn(cout)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


# (kernel, expanded, out, squeeze-excite, hardswish, stride) from Table 2 of the paper.
_MBV3_SMALL_CFG: tuple[tuple[int, int, int, bool, bool, int], ...] = (
    (3, 16, 16, True, False, 2),
    (3, 72, 24, False, False, 2),
    (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2),
    (5, 240, 40, True, True, 1),
    (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1),
    (5, 144, 48, True, True, 1),
    (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1),
    (5, 576, 96, True, True, 1),
)


@register(
    "mobilenetv3_small",
    default_size=64,
    default_channels=3,
    description="MobileNetV3-Small: inverted residuals, depthwise conv, SE, hardswish",
    # Padded convs + global pooling never collapse the map; 8 px is a sanity
    # floor (the last stages are already 1x1 there).
    min_size=8,
)
def _mobilenetv3_small(
    num_classes: int,
    in_channels: int,
    img_size: tuple[int, int],
    width_mult: float = 1.0,
) -> nn.Module:
    if isinstance(width_mult, bool) or not isinstance(width_mult, int | float):
        raise TypeError(f"width_mult must be a number, got {width_mult!r}")
    if not math.isfinite(width_mult) or width_mult <= 0:
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")

    def ch(c: int) -> int:
        return _make_divisible(c * width_mult)

    # The reference stem has stride 2 (total stride 32, 7x7 maps at 224 px).
    # Small inputs keep full resolution at the stem instead, so a 32 px image
    # still ends at 2x2 rather than 1x1.
    stem_stride = 1 if min(img_size) < 64 else 2
    stem = ch(16)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, stem, 3, stride=stem_stride, padding=1, bias=False),
        _mbv3_bn(stem),
        nn.Hardswish(),
    ]
    cin = stem
    for kernel, expanded, cout, se, hs, stride in _MBV3_SMALL_CFG:
        layers.append(_InvertedResidual(cin, kernel, ch(expanded), ch(cout), se, hs, stride))
        cin = ch(cout)
    last_conv = 6 * cin
    layers += [
        nn.Conv2d(cin, last_conv, 1, bias=False),
        _mbv3_bn(last_conv),
        nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1),
    ]
    features = nn.Sequential(*layers)
    flat = _feature_dim(features, in_channels, img_size)
    # The paper's 1024-wide head is scaled with width_mult.
    hidden = ch(1024)
    classifier = nn.Sequential(
        nn.Linear(flat, hidden),
        nn.Hardswish(),
        nn.Dropout(0.2),
        nn.Linear(hidden, num_classes),
    )
    return _init_kaiming(_FeatureClassifier(features, classifier), linear_std=0.01)
