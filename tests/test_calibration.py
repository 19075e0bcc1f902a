"""Temperature scaling: fitted after training, stored in the bundle, applied everywhere, refittable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imgclf.core.errors import BundleError
from imgclf.runtime.bundle import load_bundle
from imgclf.runtime.calibration import expected_calibration_error, fit_temperature, uncalibrate


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imgclf", *args], capture_output=True, text=True, timeout=300
    )


def _copy(bundle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(bundle_dir, dst)
    return dst


def _set_temperature(bundle_dir: Path, cal: object) -> None:
    p = bundle_dir / "model.json"
    meta = json.loads(p.read_text())
    meta["calibration"] = cal
    p.write_text(json.dumps(meta))


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at() -> None:
    # Labels drawn from softmax(z / 2.5): the NLL-optimal temperature is 2.5 up to sampling noise.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 6, generator=g) * 4
    y = torch.multinomial(torch.softmax(z / 2.5, 1), 1, generator=g)[:, 0]
    assert fit_temperature(z, y) == pytest.approx(2.5, rel=0.05)
    # Log-probabilities are as good as logits (softmax is shift-invariant per row).
    assert fit_temperature(torch.log_softmax(z, 1), y) == pytest.approx(fit_temperature(z, y), rel=1e-4)


def test_uncalibrate_inverts_temperature_scaling() -> None:
    z = torch.randn(50, 4, generator=torch.Generator().manual_seed(1)) * 3
    raw = torch.softmax(z, 1).numpy()
    scaled = torch.softmax(z / 0.6, 1).numpy()
    np.testing.assert_allclose(uncalibrate(scaled, 0.6), raw, atol=1e-5)


def test_training_fits_a_temperature_that_lowers_val_nll_and_keeps_every_prediction(
    mnist_bundle: Path,
) -> None:
    meta = json.loads((mnist_bundle / "model.json").read_text())
    run = mnist_bundle.parent
    metrics = json.loads((run / "metrics.json").read_text())
    cal = meta["calibration"]
    assert cal["method"] == "temperature" and cal["fit_on"] == "val" and cal["n_images"] > 0
    # metrics.json carries the headline pair and the per-split figures.
    for k in ("ece_uncalibrated", "ece", "val_ece", "val_ece_uncalibrated", "temperature"):
        assert k in metrics, k
    assert metrics["ece"] == metrics.get("test_ece", metrics["val_ece"])
    assert cal["ece"] <= cal["ece_uncalibrated"]  # T=1 is kept when the fit would not help

    b = load_bundle(mnist_bundle, backend="torch")
    assert b.temperature == pytest.approx(cal["temperature"])
    from imgclf.data.sources import decode_items, index_source

    idx = index_source("mnist")
    test = np.flatnonzero(idx.split == "test")[:300]
    dec = decode_items(idx, test, b.pre)
    probs = b.predict_batch(dec.images)
    logits = b.logits(dec.images)
    raw = torch.softmax(logits, 1).numpy()
    np.testing.assert_array_equal(probs.argmax(1), raw.argmax(1))  # calibration never changes a label
    np.testing.assert_allclose(probs, torch.softmax(logits / b.temperature, 1).numpy(), atol=1e-6)
    if b.temperature != 1.0:
        assert np.abs(probs - raw).max() > 1e-3  # and it does change the probabilities
    y = torch.from_numpy(dec.labels)
    nll = lambda t: float(F.cross_entropy(logits / t, y))  # noqa: E731
    # On held-out test images the fitted T is at least not much worse than none.
    assert nll(b.temperature) <= nll(1.0) * 1.05


def test_onnx_graph_and_export_apply_the_temperature(mnist_bundle: Path, tmp_path: Path) -> None:
    d = _copy(mnist_bundle, tmp_path)
    _set_temperature(d, {"method": "temperature", "temperature": 3.0})
    eager = load_bundle(d, backend="torch")
    ort = load_bundle(d, backend="onnxruntime")
    x = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_allclose(ort.predict_batch(x), eager.predict_batch(x), atol=1e-5)
    r = _cli("export", str(d), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    onnx_b = load_bundle(tmp_path / "m.onnx")
    assert onnx_b.temperature == 3.0 and onnx_b.meta["calibration"]["temperature"] == 3.0
    np.testing.assert_allclose(onnx_b.predict_batch(x), eager.predict_batch(x), atol=1e-5)


@pytest.mark.parametrize(
    "cal, words",
    [
        ({"method": "temperature", "temperature": -1}, "calibration.temperature=-1"),
        ({"method": "temperature", "temperature": "hot"}, "calibration.temperature='hot'"),
        ({"method": "temperature"}, "calibration.temperature=None"),
        ({"method": "platt"}, "'calibration' must be"),
        ("yes", "'calibration' must be"),
    ],
)
def test_tampered_calibration_is_one_clear_line(mnist_bundle: Path, tmp_path: Path, cal, words) -> None:
    d = _copy(mnist_bundle, tmp_path)
    _set_temperature(d, cal)
    with pytest.raises(BundleError, match="calibration") as e:
        load_bundle(d)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_tampered_calibration_on_the_command_line_is_one_line(mnist_bundle: Path, tmp_path: Path) -> None:
    d = _copy(mnist_bundle, tmp_path)
    _set_temperature(d, {"method": "temperature", "temperature": float("nan")})
    r = _cli("predict", str(d), str(tmp_path), "--json")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "calibration.temperature=nan" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bundle_without_calibration_loads_with_t_1(mnist_bundle: Path, tmp_path: Path) -> None:
    d = _copy(mnist_bundle, tmp_path)
    meta = json.loads((d / "model.json").read_text())
    del meta["calibration"]
    (d / "model.json").write_text(json.dumps(meta))
    b = load_bundle(d, backend="torch")
    assert b.temperature == 1.0
    x = np.zeros((2, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_allclose(b.predict_batch(x), torch.softmax(b.logits(x), 1).numpy(), atol=1e-6)


def test_calibrate_command_refits_and_dry_run_writes_nothing(mnist_bundle: Path, tmp_path: Path) -> None:
    d = _copy(mnist_bundle, tmp_path)
    _set_temperature(d, {"method": "temperature", "temperature": 8.0})  # badly under-confident
    before = (d / "model.json").read_bytes()
    args = ("calibrate", str(d), "--data", "mnist", "--split", "test", "--no-progress")
    r = _cli(*args, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    assert (d / "model.json").read_bytes() == before
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    cal = json.loads((d / "model.json").read_text())["calibration"]
    # Refitting from T=8 starts from the raw logits (T is undone first) and finds a far better T.
    assert cal["temperature"] < 4.0 and cal["ece"] < cal["ece_uncalibrated"]
    assert "temperature 8.000 ->" in r.stdout
    b = load_bundle(d)  # the rewritten model.json still verifies
    assert b.temperature == pytest.approx(cal["temperature"])


def test_calibrate_refuses_an_onnx_file_in_one_line(mnist_bundle: Path, tmp_path: Path) -> None:
    r = _cli("export", str(mnist_bundle), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    r = _cli("calibrate", str(tmp_path / "m.onnx"), "--data", "mnist")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "bundle" in r.stderr


def test_ece_is_zero_for_perfectly_calibrated_bins() -> None:
    # Confidence 0.75 everywhere, right 3 times in 4: exactly calibrated.
    probs = np.tile([[0.75, 0.25]], (8, 1))
    labels = np.array([0, 0, 0, 1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)
