"""Bundle save/load: round trip, integrity checks, no pickle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import imgclf
from imgclf.core.preprocess import Preprocess
from imgclf.data.sources import decode_items, index_source
from imgclf.models.registry import create_model
from imgclf.runtime.bundle import BundleError, load_bundle, save_bundle


def _mnist_test_images(bundle, n: int = 64) -> np.ndarray:
    idx = index_source("mnist")
    test = np.flatnonzero(idx.split == "test")[:n]
    return decode_items(idx, test, bundle.pre, progress=False).images


def test_metadata_fields(mnist_bundle: Path) -> None:
    meta = json.loads((mnist_bundle / "model.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["input"] == {"size": [28, 28], "channels": 1, "color_mode": "L"}
    assert meta["architecture"]["name"] == "lenet"
    assert meta["preprocess"]["scale"] == pytest.approx(1 / 255)
    assert meta["train_config"]["data"] == "mnist"
    assert {"torch", "imgclf", "python"} <= set(meta["versions"])
    assert 0.5 < meta["metrics"]["test_accuracy"] <= 1.0
    assert len(meta["weights_sha256"]) == 64


def test_round_trip_gives_identical_predictions(mnist_bundle: Path, tmp_path: Path) -> None:
    b = load_bundle(mnist_bundle)
    x = _mnist_test_images(b)
    p1 = b.predict_batch(x)
    # The calibration record travels too: the temperature is part of what predict_batch computes.
    extra = {k: b.meta[k] for k in ("calibration",) if b.meta.get(k)}
    save_bundle(tmp_path / "copy", b.model, b.pre, b.classes, metrics=b.meta["metrics"], extra=extra)
    p2 = load_bundle(tmp_path / "copy").predict_batch(x)
    assert np.array_equal(p1.argmax(1), p2.argmax(1))
    np.testing.assert_allclose(p1, p2, atol=1e-6)
    np.testing.assert_allclose(p1.sum(1), 1.0, atol=1e-5)


def test_run_folder_and_api(mnist_bundle: Path) -> None:
    m = imgclf.load(str(mnist_bundle.parent))  # run folder resolves to its model/
    img = _mnist_test_images(m, 1)[0]
    out = m.predict(img, top_k=3)
    assert out[0]["label"] in m.classes and len(out[0]["top_k"]) == 3
    probs = [t["probability"] for t in out[0]["top_k"]]
    assert probs == sorted(probs, reverse=True)


def test_integrity_errors(mnist_bundle: Path, tmp_path: Path) -> None:
    d = tmp_path / "b"
    shutil.copytree(mnist_bundle, d)
    w = d / "model.safetensors"
    blob = w.read_bytes()
    w.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(BundleError, match="truncated or replaced"):
        load_bundle(d)
    w.unlink()
    with pytest.raises(BundleError, match="missing weights"):
        load_bundle(d)
    (d / "model.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(d)
    (d / "model.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(BundleError, match="not an imgclf bundle"):
        load_bundle(d)
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "absent")


def test_foreign_weights_file_is_refused(tmp_path: Path) -> None:
    import hashlib

    m = create_model("lenet", num_classes=10)
    d = save_bundle(tmp_path / "b", m, Preprocess((28, 28), 1), [str(i) for i in range(10)])
    junk = b"\x80\x04\x95 this is a pickle, not safetensors"
    (d / "model.safetensors").write_bytes(junk)
    meta = json.loads((d / "model.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(junk).hexdigest()
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="not a safetensors file"):
        load_bundle(d)


def test_weights_of_wrong_architecture_are_refused(tmp_path: Path) -> None:
    m = create_model("lenet", num_classes=10)
    d = save_bundle(tmp_path / "b", m, Preprocess((28, 28), 1), [str(i) for i in range(10)])
    meta = json.loads((d / "model.json").read_text())
    other = create_model("minivgg", num_classes=10, in_channels=1, img_size=28)
    meta["architecture"] = {"name": other.arch, "args": other.arch_args}
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(d)
    meta["architecture"] = {"name": m.arch, "args": {**m.arch_args, "num_classes": 5}}
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="10 class names but the network was built for 5"):
        load_bundle(d)


def test_no_pickle_in_the_package() -> None:
    root = Path(imgclf.__file__).parent
    for py in root.rglob("*.py"):
        text = py.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, py
        assert "allow_pickle=True" not in text, py


def test_channels_last_state_is_saved_contiguous(tmp_path: Path) -> None:
    m = create_model("smallervggnet", num_classes=3, img_size=32).to(memory_format=torch.channels_last)
    d = save_bundle(tmp_path / "b", m, Preprocess((32, 32), 3), ["a", "b", "c"])
    b = load_bundle(d)
    x = np.random.default_rng(0).integers(0, 255, size=(4, 32, 32, 3), dtype=np.uint8)
    m.eval()
    with torch.no_grad():
        from imgclf.core.preprocess import normalize

        ref = torch.softmax(m(normalize(torch.from_numpy(x), b.pre)), 1).numpy()
    np.testing.assert_allclose(b.predict_batch(x), ref, atol=1e-5)
