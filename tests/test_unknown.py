"""Unknown-image rejection end to end: fitted by training, stored in the bundle, answered everywhere."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.core.errors import BundleError
from imgclf.runtime.bundle import load_bundle

FASHION = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "fashion-mnist"


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "imgclf", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _idx_images(path: Path, n: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]


@pytest.fixture(scope="module")
def fashion_pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 real Fashion-MNIST test images: unknowns for a model trained on MNIST digits."""
    if not FASHION.exists():
        pytest.skip(f"{FASHION} not found")
    d = tmp_path_factory.mktemp("fashion")
    for i, a in enumerate(_idx_images(FASHION / "t10k-images-idx3-ubyte.gz", 60)):
        Image.fromarray(a).save(d / f"garment_{i}.png")
    return d


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("digits")
    for i, a in enumerate(_idx_images(mnist_dir / "t10k-images-idx3-ubyte.gz", 60)):
        Image.fromarray(a).save(d / f"digit_{i}.png")
    return d


def _predict_json(bundle: Path | str, folder: Path) -> list[dict]:
    r = _cli("predict", str(bundle), str(folder), "--json")
    assert r.returncode == 0, r.stderr
    return [json.loads(s) for s in r.stdout.splitlines()]


def test_training_stores_a_fitted_scorer_and_threshold(mnist_bundle: Path) -> None:
    meta = json.loads((mnist_bundle / "model.json").read_text())
    ood = meta["ood"]
    assert ood["scorer"]["kind"] == "mahalanobis" and ood["keep_rate"] == 0.95
    # The threshold keeps the asked share of validation images.
    assert ood["val_keep_rate"] == pytest.approx(0.95, abs=0.02)
    from safetensors import safe_open

    with safe_open(str(mnist_bundle / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"ood.center", "ood.whiten", "ood.means"} <= names
    b = load_bundle(mnist_bundle)
    assert b.ood is not None and b.ood_threshold == pytest.approx(ood["threshold"])


def test_predict_marks_fashion_images_unknown_and_keeps_digits(
    mnist_bundle: Path, fashion_pngs: Path, digit_pngs: Path
) -> None:
    garments = _predict_json(mnist_bundle, fashion_pngs)
    digits = _predict_json(mnist_bundle, digit_pngs)
    for d in garments + digits:
        assert isinstance(d["unknown"], bool) and np.isfinite(d["ood_score"])
        assert d["label"] == d["top_k"][0]["label"]  # the best class is still given
    rejected = np.mean([d["unknown"] for d in garments])
    kept = 1 - np.mean([d["unknown"] for d in digits])
    # A 2-epoch LeNet: the 95 % keep rate holds roughly on test digits, and most garments go.
    assert kept >= 0.85, kept
    assert rejected >= 0.8, rejected
    # The plain format says so too.
    r = _cli("predict", str(mnist_bundle), str(fashion_pngs / "garment_0.png"))
    assert ("unknown: score" in r.stdout) == garments[0]["unknown"]


def test_exported_onnx_returns_the_same_scores(
    mnist_bundle: Path, fashion_pngs: Path, tmp_path: Path
) -> None:
    r = _cli("export", str(mnist_bundle), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["probabilities", "ood_score"]
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["imgclf.ood"])
    eager = load_bundle(mnist_bundle, backend="torch")
    assert meta["threshold"] == pytest.approx(eager.ood_threshold)
    x = np.stack([eager.prepare(p) for p in sorted(fashion_pngs.iterdir())[:16]])
    p_e, s_e = eager.predict_scored(x)
    p_o, s_o = sess.run(None, {"image": x})
    np.testing.assert_allclose(p_o, p_e, atol=1e-5)
    np.testing.assert_allclose(s_o, s_e, rtol=1e-4, atol=1e-3)
    via_file = _predict_json(tmp_path / "m.onnx", fashion_pngs)
    via_bundle = _predict_json(mnist_bundle, fashion_pngs)
    assert [d["unknown"] for d in via_file] == [d["unknown"] for d in via_bundle]


def test_bundle_without_rejection_says_so(mnist_bundle: Path, digit_pngs: Path, tmp_path: Path) -> None:
    d = tmp_path / "model"
    shutil.copytree(mnist_bundle, d)
    meta = json.loads((d / "model.json").read_text())
    del meta["ood"]
    (d / "model.json").write_text(json.dumps(meta))
    # The ood.* arrays are still in the weights: refused, since model.json no longer explains them.
    with pytest.raises(BundleError, match="ood"):
        load_bundle(d)
    # An older bundle (no block, no arrays) loads and predicts, saying no rejection is configured.
    from safetensors.torch import load_file, save_file

    sd = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if not k.startswith("ood.")}
    save_file(sd, str(d / "model.safetensors"))
    import hashlib

    meta["weights_sha256"] = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    (d / "model.json").write_text(json.dumps(meta))
    lines = _predict_json(d, digit_pngs)
    assert lines and all(x["unknown"] is None and x["ood_score"] is None for x in lines)
    assert "no unknown-image rejection" in lines[0]["ood"]


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m["ood"].update(threshold="high"), "ood.threshold='high'"),
        (lambda m: m["ood"]["scorer"].update(kind="magic"), "kind='magic'"),
        (lambda m: m["ood"]["scorer"].update(dims=3), "tensor 'ood.center' has shape"),
    ],
)
def test_tampered_ood_block_is_one_clear_line(mnist_bundle: Path, tmp_path: Path, edit, words) -> None:
    d = tmp_path / "model"
    shutil.copytree(mnist_bundle, d)
    meta = json.loads((d / "model.json").read_text())
    edit(meta)
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as e:
        load_bundle(d)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_negatives_folder_sharpens_the_threshold(mnist_dir: Path, fashion_pngs: Path, tmp_path: Path) -> None:
    from imgclf.training.api import train
    from imgclf.training.config import TrainConfig

    common = dict(data="mnist", model="lenet", epochs=1, subset=800, tensorboard=False, ood_score="energy")
    plain = train(TrainConfig(**common, out=str(tmp_path / "a")), progress=False)
    sharp = train(TrainConfig(**common, out=str(tmp_path / "b"), negatives=str(fashion_pngs)), progress=False)
    a = json.loads((plain.bundle_dir / "model.json").read_text())["ood"]
    b = json.loads((sharp.bundle_dir / "model.json").read_text())["ood"]
    assert "negatives" not in a and b["negatives"]["images"] == 60
    # keep_rate is a floor with negatives: at least as many validation images kept.
    assert b["val_keep_rate"] >= 0.95 - 1e-9
    assert b["scorer"]["kind"] == "energy"
    # A missing negatives folder fails before any training.
    with pytest.raises(Exception, match="no such folder"):
        train(
            TrainConfig(**common, out=str(tmp_path / "c"), negatives=str(tmp_path / "nope")), progress=False
        )
    assert not (tmp_path / "c" / "checkpoints").exists()
