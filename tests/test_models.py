"""Tests for the imgclf model registry and architectures."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from imgclf.models.registry import (
    UnknownModelError,
    count_parameters,
    create_model,
    get_spec,
    list_models,
    logits_to_probs,
    num_outputs,
)

ALL_MODELS = list_models()


@pytest.fixture(autouse=True)
def _small_cpu() -> None:
    # The CI box has 2 shared cores; extra threads only add contention.
    torch.set_num_threads(1)
    torch.manual_seed(0)


def test_registry_contents() -> None:
    assert ALL_MODELS == sorted(
        [
            "lenet",
            "smallervggnet",
            "simplecnn",
            "minivgg",
            "resnet20",
            "resnet10s",
            "mobilenetv3_small",
        ]
    )
    for name in ALL_MODELS:
        spec = get_spec(name)
        assert spec.name == name
        assert spec.description
        assert 1 <= spec.min_size <= spec.default_size
    assert get_spec("LeNet").name == "lenet"


# --- sweep over every registered model ---------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_default_size_forward(name: str) -> None:
    spec = get_spec(name)
    model = create_model(name, 3).eval()
    assert model.arch == name
    assert model.arch_args["img_size"] == [spec.default_size, spec.default_size]
    assert model.arch_args["in_channels"] == spec.default_channels
    x = torch.randn(2, spec.default_channels, spec.default_size, spec.default_size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_non_default_size_and_channels(name: str, channels: int) -> None:
    model = create_model(name, 3, in_channels=channels, img_size=(40, 52)).eval()
    assert model.arch_args["img_size"] == [40, 52]
    x = torch.randn(2, channels, 40, 52)
    with torch.no_grad():
        out = model(x)
        out_cl = model(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 3)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_min_size(name: str) -> None:
    spec = get_spec(name)
    s = spec.min_size
    model = create_model(name, 3, in_channels=2, img_size=(s, s + 3)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 2, s, s + 3)).shape == (2, 3)
    with pytest.raises(ValueError, match=f"at least {s}x{s}"):
        create_model(name, 3, img_size=(s + 3, s - 1))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_construction_leaves_bn_stats_untouched(name: str) -> None:
    # The dummy forward that sizes the head must not leak into BN running stats.
    model = create_model(name, 3, img_size=24)
    assert model.training
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            assert int(m.num_batches_tracked) == 0
            assert torch.count_nonzero(m.running_mean) == 0


@pytest.mark.parametrize("name", ALL_MODELS)
def test_training_steps_reduce_loss(name: str) -> None:
    model = create_model(name, 3, in_channels=3, img_size=32).train()
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def train_loss() -> float:
        # Same dropout masks before and after training: per-step dropout noise
        # (p=0.5 in the VGG heads) would otherwise swamp a few steps' progress.
        with torch.no_grad():
            torch.manual_seed(1234)
            return nn.functional.cross_entropy(model(x), y).item()

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    initial = train_loss()
    for _ in range(16):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    final = train_loss()
    assert final < initial, (initial, final)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_rebuild_from_arch_args(name: str) -> None:
    model = create_model(name, 4, in_channels=2, img_size=(36, 44))
    # Simulate a bundle: the args go through JSON before the rebuild.
    args = json.loads(json.dumps(model.arch_args))
    clone = create_model(model.arch, **args)
    ref_sd, clone_sd = model.state_dict(), clone.state_dict()
    assert list(ref_sd) == list(clone_sd)
    for key, value in ref_sd.items():
        assert clone_sd[key].shape == value.shape, key
    # Train a step so BN running stats are non-trivial before copying.
    x = torch.randn(4, 2, 36, 44)
    model.train()(x)
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


# --- layer-for-layer parameter counts -------------------------------------------


def test_lenet_param_count() -> None:
    # conv1 20*1*25+20 = 520, conv2 50*20*25+50 = 25050,
    # dense 7*7*50*500+500 = 1225500, out 500*10+10 = 5010 -> 1256080
    model = create_model("lenet", 10, in_channels=1, img_size=28)
    assert count_parameters(model) == 520 + 25050 + 1225500 + 5010 == 1256080


def test_smallervggnet_param_count() -> None:
    def conv(cin: int, cout: int) -> int:
        return cin * cout * 9 + cout

    def bn(c: int) -> int:  # trainable gamma + beta
        return 2 * c

    expected = (
        conv(3, 32) + bn(32)  # 96 -> pool3 -> 32
        + conv(32, 64) + bn(64) + conv(64, 64) + bn(64)  # -> pool2 -> 16
        + conv(64, 128) + bn(128) + conv(128, 128) + bn(128)  # -> pool2 -> 8
        + (8 * 8 * 128 * 1024 + 1024) + bn(1024)  # dense 1024 + BN
        + (1024 * 5 + 5)  # output
    )  # fmt: skip
    model = create_model("smallervggnet", 5, in_channels=3, img_size=96)
    assert count_parameters(model) == expected == 8675397


def test_simplecnn_param_count() -> None:
    # 64 -> conv valid 62 -> pool 31 -> conv valid 29 -> pool 14
    expected = (3 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (14 * 14 * 64 * 128 + 128) + (128 + 1)
    assert count_parameters(create_model("simplecnn", 2)) == expected


def test_minivgg_width_kwarg() -> None:
    def expected(w: int, classes: int) -> int:
        def block(cin: int, c: int) -> int:
            return (cin * c * 9 + c) + 2 * c + (c * c * 9 + c) + 2 * c

        feats = block(3, w) + block(w, 2 * w) + block(2 * w, 4 * w)
        return feats + (8 * 8 * 4 * w * 512 + 512) + 2 * 512 + (512 * classes + classes)

    assert count_parameters(create_model("minivgg", 7)) == expected(32, 7)
    narrow = create_model("minivgg", 7, width=8)
    assert narrow.arch_args["width"] == 8
    assert count_parameters(narrow) == expected(8, 7)


def test_resnet20_structure() -> None:
    model = create_model("resnet20", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    projections = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    # 19 3x3 convs + 1 linear = 20 weighted layers; option B adds 2 projections.
    assert len(convs) == 19 and len(linears) == 1 and len(projections) == 2
    assert [c.out_channels for c in projections] == [32, 64]
    assert count_parameters(model) == 272474
    wide = create_model("resnet20", 10, width=32)
    assert wide.classifier.in_features == 128


def test_mobilenetv3_small_stem_and_width() -> None:
    def stem_stride(img_size: int | tuple[int, int]) -> tuple[int, ...]:
        model = create_model("mobilenetv3_small", 3, img_size=img_size)
        return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).stride

    assert stem_stride(32) == (1, 1)
    assert stem_stride(64) == (2, 2)
    assert stem_stride((64, 40)) == (1, 1)
    model = create_model("mobilenetv3_small", 3)
    assert any(isinstance(m, nn.Hardswish) for m in model.modules())
    assert any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
    # torchvision's mobilenet_v3_small has 2,542,856 params at 1000 classes;
    # a 10-class head removes 990 * 1025 of them.
    assert count_parameters(create_model("mobilenetv3_small", 10)) == 2_542_856 - 990 * 1025 == 1528106
    full = count_parameters(create_model("mobilenetv3_small", 3))
    half = count_parameters(create_model("mobilenetv3_small", 3, width_mult=0.5))
    assert half < full / 2


# --- binary heads and probabilities --------------------------------------------


def test_simplecnn_binary_head() -> None:
    spec = get_spec("simplecnn")
    assert num_outputs(2, spec) == 1 and num_outputs(3, spec) == 3
    assert num_outputs(2, get_spec("lenet")) == 2
    model = create_model("simplecnn", 2, img_size=32).eval()
    assert model.arch_args["num_classes"] == 2
    with torch.no_grad():
        logits = model(torch.randn(5, 3, 32, 32))
    assert logits.shape == (5, 1)
    probs = logits_to_probs(logits)
    assert probs.shape == (5, 2)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(logits[:, 0]))
    assert create_model("simplecnn", 3, img_size=32)(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_logits_to_probs_softmax() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logits_to_probs(logits), torch.softmax(logits, 1))
    with pytest.raises(ValueError):
        logits_to_probs(torch.zeros(3))


# The legacy exporter is used because the dynamo one needs onnxscript; its
# deprecation and shape-branch tracer warnings are expected here.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_logits_to_probs_onnx_export(tmp_path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    class Probs(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits_to_probs(x)

    for k in (1, 4):
        path = tmp_path / f"probs{k}.onnx"
        torch.onnx.export(
            Probs(),
            (torch.randn(2, k),),
            str(path),
            dynamo=False,
            input_names=["logits"],
            dynamic_axes={"logits": {0: "n"}},
        )
        x = torch.randn(6, k)
        (got,) = ort.InferenceSession(str(path)).run(None, {"logits": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), logits_to_probs(x))


# --- errors --------------------------------------------------------------------


def test_unknown_model_error() -> None:
    with pytest.raises(UnknownModelError) as info:
        create_model("lenett", 10)
    msg = str(info.value)
    assert "did you mean 'lenet'?" in msg
    assert "resnet20" in msg
    assert isinstance(info.value, KeyError)
    with pytest.raises(KeyError, match="mobilenetv3_small"):
        get_spec("mobilenet")


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="width"):
        create_model("lenet", 10, width=3)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("lenet", 1)
    with pytest.raises(ValueError, match="in_channels"):
        create_model("lenet", 10, in_channels=0)
    with pytest.raises(ValueError, match="img_size"):
        create_model("lenet", 10, img_size=(28, 28, 1))


def test_minivgg_blocks_kwarg_is_the_fashion_tutorial_net() -> None:
    def block(cin: int, c: int) -> int:
        return (cin * c * 9 + c) + 2 * c + (c * c * 9 + c) + 2 * c

    # Two blocks on 28x28x1 leave 7x7x64 for the 512-unit dense layer (the tutorial's MiniVGGNet).
    expected = block(1, 32) + block(32, 64) + (7 * 7 * 64 * 512 + 512) + 2 * 512 + (512 * 10 + 10)
    model = create_model("minivgg", 10, in_channels=1, img_size=28, blocks=2)
    assert count_parameters(model) == expected
    assert model.arch_args["blocks"] == 2
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="blocks must be 1, 2 or 3"):
        create_model("minivgg", 10, blocks=4)
