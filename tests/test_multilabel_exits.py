"""Multi-label through the prediction exits: export (ONNX, int8, TorchScript, Core ML), explain, batch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import batch_input_folder

from imgclf.cli import main
from imgclf.runtime.bundle import load_bundle
from imgclf.runtime.multilabel import predicted_sets

TOL = 1e-4


@pytest.fixture(autouse=True)
def _small_cpu() -> None:
    torch.set_num_threads(1)


def _test_files(colour_garment_dir: Path) -> list[Path]:
    """The fixture's 60 held-out test images (10 per label-set folder)."""
    return sorted((colour_garment_dir / "test").glob("*/*.png"))


@pytest.fixture(scope="module")
def eager(multilabel_bundle: Path):
    return load_bundle(multilabel_bundle, backend="torch")


@pytest.fixture(scope="module")
def images(eager, colour_garment_dir: Path) -> np.ndarray:
    return np.stack([eager.prepare(f) for f in _test_files(colour_garment_dir)])


def _sets(probs: np.ndarray, thresholds: np.ndarray, classes: list[str]) -> list[set[str]]:
    return [{classes[j] for j in np.flatnonzero(row)} for row in predicted_sets(probs, thresholds)]


# ----------------------------------------------------------------------------- export


def test_onnx_export_sigmoids_metadata_and_loaded_file(eager, images, tmp_path: Path) -> None:
    from imgclf.exporters.formats import eager_probs, export
    from imgclf.runtime.onnxrt import OrtRunner, read_metadata

    ref = eager_probs(eager, images)
    assert not np.allclose(ref.sum(axis=1), 1.0)  # sigmoids, not a softmax
    want = _sets(ref, eager.thresholds, eager.classes)
    assert len({frozenset(s) for s in want}) > 1  # the model predicts several different sets

    res = export(eager, "onnx", tmp_path / "m.onnx", check_images=images)
    assert res.parity is not None and res.parity.ok, str(res.parity)
    assert res.parity.multi_label and f"label sets agree on {len(images)}/{len(images)}" in str(res.parity)
    props = read_metadata(res.path)
    assert json.loads(props["imgclf.task"]) == "multi-label"
    assert json.loads(props["imgclf.thresholds"]) == pytest.approx(eager.thresholds.tolist())
    assert json.loads(props["imgclf.classes"]) == eager.classes
    assert json.loads(props["imgclf.output"])["kind"] == "sigmoid probabilities"
    for f in (res.path, res.extra[0]):  # the checked graph and the ORT-optimised one
        probs = OrtRunner(f)(images)
        assert np.abs(probs - ref).max() <= TOL
        assert _sets(probs, eager.thresholds, eager.classes) == want

    loaded = load_bundle(res.path)
    assert loaded.multi_label and loaded.model is None
    assert np.allclose(loaded.thresholds, eager.thresholds)
    got = [set(r["labels"]) for r in loaded.top_k(loaded.predict_batch(images))]
    assert got == want


def test_parity_compares_label_sets_not_just_probabilities() -> None:
    """A probability that moves by 2e-5 across a threshold changes the set: parity must fail."""
    from imgclf.exporters.formats import compare

    th = np.array([0.5, 0.3], dtype=np.float32)
    ref = np.array([[0.50001, 0.9], [0.1, 0.2]], dtype=np.float32)
    moved = np.array([[0.49999, 0.9], [0.1, 0.2]], dtype=np.float32)
    p = compare(ref, moved, th)
    assert p.max_abs_diff <= TOL and p.top1_agree == 1 and not p.ok
    assert "label sets agree on 1/2" in str(p)
    # The same numbers judged single-label (argmax) would have passed.
    assert compare(ref, moved).ok


def test_torchscript_export_parity_and_metadata(eager, images, tmp_path: Path) -> None:
    from imgclf.exporters.formats import eager_probs, export, load_torchscript

    res = export(eager, "torchscript", tmp_path / "m.pt", check_images=images)
    assert res.parity is not None and res.parity.ok and res.parity.multi_label, str(res.parity)
    m, meta = load_torchscript(res.path)
    assert json.loads(meta["imgclf.task"]) == "multi-label"
    assert json.loads(meta["imgclf.thresholds"]) == pytest.approx(eager.thresholds.tolist())
    with torch.inference_mode():
        probs = m(torch.as_tensor(images)).numpy()
    ref = eager_probs(eager, images)
    assert np.abs(probs - ref).max() <= TOL
    assert _sets(probs, eager.thresholds, eager.classes) == _sets(ref, eager.thresholds, eager.classes)


def test_tflite_wrapper_and_metadata_are_multi_label(eager, images) -> None:
    """litert-torch is not installed here: check what export_tflite converts and writes beside it."""
    from imgclf.exporters.formats import eager_probs
    from imgclf.runtime.graph import bundle_metadata, inference_wrapper

    wrapper = inference_wrapper(eager)
    with torch.inference_mode():
        probs = wrapper(torch.as_tensor(images)).numpy()
    assert np.abs(probs - eager_probs(eager, images)).max() <= TOL
    meta = bundle_metadata(eager)
    assert json.loads(meta["imgclf.task"]) == "multi-label"
    assert len(json.loads(meta["imgclf.thresholds"])) == 5


@pytest.mark.skipif(importlib.util.find_spec("coremltools") is None, reason="coremltools not installed")
def test_coreml_has_a_probabilities_output_not_a_classifier(eager, images, tmp_path: Path) -> None:
    from imgclf.exporters.formats import ImageInputWrapper, coreml_spec_summary, eager_probs, export, trace

    res = export(eager, "coreml", tmp_path / "m.mlpackage")
    assert res.parity is None  # Core ML predicts on Apple platforms only
    spec = coreml_spec_summary(res.path)
    assert [o["name"] for o in spec["outputs"]] == ["probabilities"]
    assert spec["class_labels"] == [] and spec["predicted_feature"] == ""
    assert json.loads(spec["metadata"]["imgclf.thresholds"]) == pytest.approx(eager.thresholds.tolist())
    assert json.loads(spec["metadata"]["imgclf.classes"]) == eager.classes
    ts = trace(eager, ImageInputWrapper)  # the exact graph Core ML converted
    with torch.inference_mode():
        probs = ts(torch.as_tensor(images).permute(0, 3, 1, 2).float()).numpy()
    assert np.abs(probs - eager_probs(eager, images)).max() <= TOL


def test_int8_export_compares_label_sets_and_map_on_held_out(
    multilabel_bundle: Path, eager, tmp_path: Path, capsys
) -> None:
    from imgclf.exporters.int8 import recorded_images

    held = recorded_images(eager, "test", 2000)
    assert held is not None and held[1].shape == (60, 5) and (held[1].sum(axis=1) == 2).all()
    out = tmp_path / "m.onnx"
    rc = main(["export", str(multilabel_bundle), "--int8", "-o", str(out)])
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("int8:"))
    assert "label sets agree with float32 on" in line and "60 held-out images" in line
    assert "mAP" in line and "exact-match accuracy" in line
    q = load_bundle(tmp_path / "m.int8.onnx")
    assert q.multi_label and np.allclose(q.thresholds, eager.thresholds)
    assert rc in (0, 1)  # 1 only when int8 loses more than a point of mAP; the line says which


# ----------------------------------------------------------------------------- explain


def test_gradcam_per_label_uses_that_labels_logit(eager, colour_garment_dir: Path) -> None:
    from imgclf.analysis.explain import find_target_layer, gradcam, labels_to_explain
    from imgclf.core.preprocess import normalize

    src = sorted((colour_garment_dir / "test" / "red_trouser").iterdir())[0]
    heat = {}
    for name in ("red", "trouser", "bag"):
        heat[name], used, _ = gradcam(eager, src, eager.classes.index(name))
        assert eager.classes[used] == name and heat[name].shape == (28, 28)
    # Different labels highlight different pixels.
    assert np.abs(heat["red"] - heat["trouser"]).mean() > 0.01
    assert np.abs(heat["trouser"] - heat["bag"]).mean() > 0.01
    # The map is the Grad-CAM of that label's own logit (not of a softmax over labels).
    x = normalize(torch.from_numpy(eager.prepare(src)[None].copy()), eager.pre)
    model = eager.model
    layer = find_target_layer(model, x)
    acts = []
    hook = layer.register_forward_hook(lambda _m, _i, out: acts.append(out))
    with torch.enable_grad():
        logit = model(x)[0, eager.classes.index("trouser")]
        (g,) = torch.autograd.grad(logit, acts[-1])
    hook.remove()
    cam = torch.relu((g[0].mean(dim=(1, 2))[:, None, None] * acts[-1].detach()[0]).sum(0))
    cam = cam / cam.max()
    up = torch.nn.functional.interpolate(cam[None, None], size=(28, 28), mode="bilinear", align_corners=False)
    assert np.allclose(up[0, 0].clamp(0, 1).numpy(), heat["trouser"], atol=1e-5)
    # By default: the predicted labels, most probable first.
    probs = eager.predict_batch(eager.prepare(src)[None])[0]
    want = [eager.classes[i] for i in np.argsort(-probs) if probs[i] >= eager.thresholds[i]]
    assert [eager.classes[i] for i in labels_to_explain(eager, src)] == want


def test_explain_cli_one_map_per_predicted_label(
    multilabel_bundle: Path, eager, colour_garment_dir: Path, tmp_path: Path, capsys
) -> None:
    src = sorted((colour_garment_dir / "test" / "blue_bag").iterdir())[1]
    probs = eager.predict_batch(eager.prepare(src)[None])[0]
    predicted = [c for c, p, t in zip(eager.classes, probs, eager.thresholds) if p >= t] or [
        eager.classes[int(np.argmax(probs))]
    ]
    out = tmp_path / "out"
    assert main(["explain", str(multilabel_bundle), str(src), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(ln.split(": ")[1] for ln in lines) == sorted(predicted)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{src.stem}.gradcam-{c}.png" for c in predicted)

    assert main(["explain", str(multilabel_bundle), str(src), "--out", str(out), "--label", "red"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and ": red: " in line and (out / f"{src.stem}.gradcam-red.png").exists()

    assert main(["explain", str(multilabel_bundle), str(src), "--label", "pikachu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "imgclf explain: error: label 'pikachu' is not in this bundle; its labels are: "
        "bag, blue, red, trouser, tshirt"
    )


def test_server_explain_draws_each_predicted_label(
    multilabel_bundle: Path, eager, colour_garment_dir: Path
) -> None:
    """/v1/explain on a multi-label model: one overlay per predicted label, side by side, most
    probable first, each the same map as that label's own request; the header names them."""
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from imgclf.serving.app import create_app

    src = sorted((colour_garment_dir / "test" / "blue_bag").iterdir())[1]
    probs = eager.predict_batch(eager.prepare(src)[None])[0]
    order = [int(i) for i in np.argsort(-probs, kind="stable") if probs[i] >= eager.thresholds[i]]
    want = [eager.classes[i] for i in order] or [eager.classes[int(np.argmax(probs))]]
    with TestClient(create_app(load_bundle(multilabel_bundle))) as c:
        r = c.post("/v1/explain", content=src.read_bytes())
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        drawn = json.loads(r.headers["x-explained"])
        singles = {lab: c.post(f"/v1/explain?class_name={lab}", content=src.read_bytes()) for lab in want}
    assert [d["label"] for d in drawn] == want
    assert [d["probability"] for d in drawn] == pytest.approx(
        [float(probs[eager.classes.index(w)]) for w in want], abs=1e-4
    )
    strip = np.asarray(Image.open(io.BytesIO(r.content)))
    h, w = np.asarray(Image.open(src).convert("RGB")).shape[:2]
    assert strip.shape[:2] == (h, w * len(want))
    for i, lab in enumerate(want):
        one = singles[lab]
        assert [d["label"] for d in json.loads(one.headers["x-explained"])] == [lab]
        assert np.array_equal(strip[:, i * w : (i + 1) * w], np.asarray(Image.open(io.BytesIO(one.content))))


# ----------------------------------------------------------------------------- predict-batch


def test_predict_batch_label_lists_and_probability_columns_resume(
    multilabel_bundle: Path, eager, colour_garment_dir: Path, tmp_path: Path, capsys
) -> None:
    import os
    import shutil

    import pyarrow as pa

    pq = pytest.importorskip("pyarrow.parquet")
    d = batch_input_folder(tmp_path, colour_garment_dir)
    out = tmp_path / "p.parquet"
    rc = main(["predict-batch", str(multilabel_bundle), "--data", str(d), "--out", str(out), "--no-progress"])
    s = json.loads(capsys.readouterr().out)
    assert rc == 1 and (s["total"], s["predicted"], s["failed"]) == (13, 13, 1)
    sch = pq.read_schema(out)
    assert sch.names == ["path", "path_bytes", "labels", *(f"p_{c}" for c in eager.classes), "error"]
    assert sch.field("labels").type == pa.list_(pa.string())
    assert json.loads(sch.metadata[b"imgclf.thresholds"]) == pytest.approx(eager.thresholds.tolist())
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    cut = str((d / "red_bag" / "cut.png").resolve())
    assert rows[cut]["labels"] is None and rows[cut]["error"] and rows[cut]["p_red"] is None
    files = sorted(str(p.resolve()) for p in d.glob("*/*.png") if p.name != "cut.png")
    probs = eager.predict_batch(np.stack([eager.prepare(f) for f in files]))
    want = _sets(probs, eager.thresholds, eager.classes)
    for f, p, ws in zip(files, probs, want):
        r = rows[f]
        assert r["error"] is None and set(r["labels"]) == ws
        assert [r[f"p_{c}"] for c in r["labels"]] == sorted((r[f"p_{c}"] for c in r["labels"]), reverse=True)
        assert np.abs(np.array([r[f"p_{c}"] for c in eager.classes]) - p).max() <= TOL
    truth = [set(Path(f).parent.name.split("_")) for f in files]
    assert np.mean([w == t for w, t in zip(want, truth)]) > 0.5  # real images, a real (small) model

    # Repair the truncated file: the rerun tries it again and predicts nothing else.
    shutil.copy(files[0], cut)
    rc = main(["predict-batch", str(multilabel_bundle), "--data", str(d), "--out", str(out), "--no-progress"])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and (s["predicted"], s["already_done"], s["retried"], s["failed"]) == (1, 12, 1, 0)
    again = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert len(again) == 13 and again[cut]["labels"] == rows[files[0]]["labels"]
    assert not os.path.exists(str(out) + ".parts")


def test_predict_batch_refuses_output_of_another_model(
    multilabel_bundle: Path, colour_garment_dir: Path, tmp_path: Path, capsys
) -> None:
    import pyarrow as pa

    pq = pytest.importorskip("pyarrow.parquet")
    from imgclf.serving.batch import schema

    out = tmp_path / "single.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=schema()), out)  # a single-label model's output
    d = batch_input_folder(tmp_path, colour_garment_dir)
    rc = main(["predict-batch", str(multilabel_bundle), "--data", str(d), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "holds predictions of another model" in err and "\n" not in err
