"""Grad-CAM: generic target layer for every model, original-size maps, per-class maps, CLI."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imgclf.analysis.explain import UnknownClassError, find_target_layer, gradcam, gradcam_batch, overlay_png
from imgclf.cli import main
from imgclf.models.registry import create_model, get_spec, list_models
from imgclf.runtime.bundle import load_bundle


@pytest.fixture(autouse=True)
def _small_cpu() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list_models())
def test_target_layer_for_every_model(name: str) -> None:
    spec = get_spec(name)
    side = max(spec.min_size, 32)
    model = create_model(name, 4, in_channels=3, img_size=side).eval()
    x = torch.rand(1, 3, side, side)
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, out: seen.append((mod, tuple(out.shape))))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    model(x)
    for h in hooks:
        h.remove()
    layer = find_target_layer(model, x)
    shapes = dict((id(m), s) for m, s in seen)
    assert isinstance(layer, nn.Conv2d)
    assert shapes[id(layer)][-1] * shapes[id(layer)][-2] > 1  # a spatial map, not a squeeze-excite 1x1
    # no later-executed conv has a spatial output
    later = [s for m, s in seen[[id(m) for m, _ in seen].index(id(layer)) + 1 :]]
    assert all(s[-1] * s[-2] == 1 for s in later)
    cam, k, probs = gradcam_batch(model, x)
    assert cam.ndim == 2 and cam.min() >= 0 and cam.max() <= 1
    assert k == int(np.argmax(probs)) and probs.shape == (4,)


def _photo(sign_dir: Path) -> Path:
    return sorted((sign_dir / "3").iterdir())[0]


def test_gradcam_original_size_and_per_class(sign_bundle: Path, sign_dir: Path) -> None:
    bundle = load_bundle(sign_bundle)
    src = _photo(sign_dir)
    # A non-square crop (as a PIL image) checks that H and W are not swapped.
    crop = Image.open(src).convert("RGB").crop((0, 0, 100, 70))
    heat, k, orig = gradcam(bundle, crop)
    assert heat.shape == (70, 100) and heat.dtype == np.float32 and orig.shape == (70, 100, 3)
    assert orig.dtype == np.uint8 and 0.0 <= heat.min() and heat.max() <= 1.0
    probs = bundle.predict_batch(bundle.prepare(crop)[None])[0]
    assert k == int(np.argmax(probs))  # None explains the predicted class
    assert heat.max() > 0.5  # normalised: the strongest region is near 1

    heat_p, _, _ = gradcam(bundle, str(src))
    other = int(np.argmin(bundle.predict_batch(bundle.prepare(src)[None])[0]))
    heat_o, used, _ = gradcam(bundle, str(src), other)
    assert used == other
    assert heat_p.shape == heat_o.shape == (100, 100)
    assert np.abs(heat_p - heat_o).mean() > 0.01  # a different class highlights different pixels

    # bytes and streams work like paths
    blob = src.read_bytes()
    assert np.allclose(gradcam(bundle, blob)[0], heat_p)
    assert np.allclose(gradcam(bundle, io.BytesIO(blob))[0], heat_p)


def test_overlay_png_and_errors(sign_bundle: Path, sign_dir: Path) -> None:
    bundle = load_bundle(sign_bundle)
    src = _photo(sign_dir)
    png = overlay_png(bundle, src, class_name=bundle.classes[1], alpha=0.5)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.size == (100, 100) and im.mode == "RGB"
    assert not np.array_equal(np.asarray(im), np.asarray(Image.open(src).convert("RGB")))
    with pytest.raises(UnknownClassError, match="not in this bundle"):
        overlay_png(bundle, src, class_name="pikachu")
    with pytest.raises(UnknownClassError, match="out of range"):
        gradcam(bundle, src, 99)


def test_explain_cli(
    sign_bundle: Path, sign_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _photo(sign_dir)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    out = tmp_path / "out"
    rc = main(["explain", str(sign_bundle), str(src), str(bad), "--out", str(out), "--class", "3"])
    cap = capsys.readouterr()
    assert rc == 1 and "bad.jpg: not an image" in cap.err and "Traceback" not in cap.err
    written = out / f"{src.stem}.gradcam-3.png"
    assert Image.open(written).size == (100, 100) and str(written) in cap.out
    # beside the original when --out is not given
    local = tmp_path / "photo.jpg"
    local.write_bytes(src.read_bytes())
    assert main(["explain", str(sign_bundle), str(local)]) == 0
    assert (tmp_path / "photo.gradcam.png").exists()
    assert main(["explain", str(sign_bundle), str(local), "--class", "pikachu"]) == 2
    assert "not in this bundle" in capsys.readouterr().err
