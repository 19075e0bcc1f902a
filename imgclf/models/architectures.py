"""The built-in architectures, each registered by name in :mod:`imgclf.models.registry`.

The first four reproduce Keras tutorials layer for layer, so they use Keras defaults:
BatchNormalization(epsilon=1e-3), glorot-uniform kernels and zero biases.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from imgclf.models.registry import register

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

# Keras updates BN running stats as ``m * running + (1 - m) * batch`` and torch as
# ``(1 - m) * running + m * batch``; Keras' default 0.99 would be torch 0.01. We use torch's 0.1
# (Keras 0.9): with 0.01 the running stats need ~500 steps to settle, so short runs on small
# folders (50 steps/epoch) evaluated at chance level although training accuracy was high.
_KERAS_BN_MOMENTUM = 0.1


_KERAS_BN_EPS = 1e-3


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


@register(
    "resnet10s",
    default_size=64,
    default_channels=3,
    description=(
        "small ResNet-10 for photos: 3x3 stem (stride 2 from 64 px, plus max-pool from 128 px), four "
        "stages of one basic block (32/64/128/256), global pooling, dropout 0.2"
    ),
    min_size=8,
)
def _resnet10s(
    num_classes: int, in_channels: int, img_size: tuple[int, int], width: int = 32, dropout: float = 0.2
) -> nn.Module:
    _check_positive_int("width", width)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    side = min(img_size)
    # Downsample early on larger inputs so the first stage runs at 32-64 px whatever the input:
    # the compute per image then grows slowly with the input size (a CPU default must stay cheap).
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, width, 3, stride=2 if side >= 64 else 1, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    ]
    if side >= 128:
        layers.append(nn.MaxPool2d(3, stride=2, padding=1))
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        layers.append(_BasicBlock(cin, width * mult, 1 if stage == 0 else 2))
        cin = width * mult
    layers.append(nn.AdaptiveAvgPool2d(1))
    features = nn.Sequential(*layers)
    model = _init_kaiming(
        _FeatureClassifier(features, nn.Sequential(nn.Dropout(dropout), nn.Linear(cin, num_classes)))
    )
    for m in model.modules():
        if isinstance(m, _BasicBlock):
            # Each block starts as the identity (zero-init of its last BN scale, Goyal et al. 2017):
            # steadier early training at the high rates a range test picks.
            nn.init.zeros_(m.bn2.weight)
    return model


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
