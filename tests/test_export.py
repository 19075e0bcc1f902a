"""Export parity on real images: every format that runs here must match the bundle in PyTorch eager."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from imgclf.cli import main
from imgclf.exporters.formats import (
    ExportError,
    ImageInputWrapper,
    compare,
    eager_probs,
    export,
    export_onnx,
    export_torchscript,
    load_torchscript,
    trace,
)
from imgclf.runtime.bundle import BundleError, load_bundle
from imgclf.runtime.onnxrt import OrtRunner

N_IMAGES = 200
TOL = 1e-4


def _mnist_test_images(bundle) -> np.ndarray:
    from imgclf.data.sources import decode_items, index_source

    index = index_source("mnist")
    idx = np.flatnonzero(index.split == "test")[:N_IMAGES]
    dec = decode_items(index, idx, bundle.pre, use_cache=False, progress=False)
    return dec.images


def _sign_images(bundle, sign_dir: Path) -> np.ndarray:
    # 20 real photos per class from the end of each folder (the fixture trains on a 500-image
    # subset, so most of these were never seen), decoded by the bundle's own prepare().
    files = [f for c in sorted(sign_dir.iterdir()) if c.is_dir() for f in sorted(c.iterdir())[-20:]]
    return np.stack([bundle.prepare(f) for f in files[:N_IMAGES]])


@pytest.fixture(scope="module", params=["mnist", "sign"])
def case(request, tmp_path_factory):
    """(bundle loaded for PyTorch eager, 200 real uint8 images, eager reference probabilities, tmp dir)."""
    if request.param == "mnist":
        path = request.getfixturevalue("mnist_bundle")
        b = load_bundle(path, backend="torch")
        images = _mnist_test_images(b)
    else:
        path = request.getfixturevalue("sign_bundle")
        b = load_bundle(path, backend="torch")
        images = _sign_images(b, request.getfixturevalue("sign_dir"))
    assert images.shape[0] == N_IMAGES and images.dtype == np.uint8
    ref = eager_probs(b, images)
    return request.param, b, images, ref, tmp_path_factory.mktemp(f"export-{request.param}")


def _assert_parity(ref: np.ndarray, probs: np.ndarray) -> None:
    p = compare(ref, probs)
    assert p.top1_agree == p.n == len(ref), str(p)
    assert p.max_abs_diff <= TOL, str(p)


def test_onnx_graph_metadata_and_parity(case):
    import onnx

    name, b, images, ref, tmp = case
    res = export_onnx(b, tmp / "model.onnx")
    model = onnx.load(str(res.path))
    onnx.checker.check_model(model, full_check=True)
    inp = model.graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [*b.pre.size, b.pre.channels]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["imgclf.classes"]) == b.classes
    assert meta["imgclf.bundle_sha256"] == b.sha256
    assert json.loads(meta["imgclf.preprocess"]) == b.pre.to_dict()
    assert meta["imgclf.input_size"] == f"{b.pre.size[0]}x{b.pre.size[1]}x{b.pre.channels}"
    # Preprocessing is inside the graph: no float input anywhere.
    assert {n.op_type for n in model.graph.node} >= {"Cast", "Transpose"}

    # The checked graph and the ORT-optimised one both match eager on 200 real images,
    # with batches of 200 and of 1 (dynamic batch).
    opt = res.extra[0]
    assert opt.name == "model.optimized.onnx" and opt.exists()
    for f in (res.path, opt):
        run = OrtRunner(f)
        _assert_parity(ref, run(images))
        _assert_parity(ref[:3], np.concatenate([run(images[i : i + 1]) for i in range(3)]))


def test_torchscript_parity(case):
    name, b, images, ref, tmp = case
    res = export_torchscript(b, tmp / "model.pt")
    m, meta = load_torchscript(res.path)
    assert json.loads(meta["imgclf.classes"]) == b.classes
    import torch

    with torch.inference_mode():
        probs = m(torch.as_tensor(images)).numpy()
    _assert_parity(ref, probs)


def test_bundle_backends_agree(case):
    name, b, images, ref, tmp = case
    ort_bundle = load_bundle(b.path, backend="onnxruntime")
    assert ort_bundle.backend == "onnxruntime"
    _assert_parity(ref, ort_bundle.predict_batch(images))
    assert ort_bundle._runner is not None  # really ran through ORT, not a silent fallback
    torch_bundle = load_bundle(b.path, backend="torch")
    _assert_parity(ref, torch_bundle.predict_batch(images))
    # Same top_k structure from both.
    assert (
        ort_bundle.top_k(ort_bundle.predict_batch(images[:5]), 3)[0]["label"]
        == b.top_k(ref[:5], 3)[0]["label"]
    )


def test_load_bundle_from_onnx_file(case):
    name, b, images, ref, tmp = case
    path = tmp / "direct.onnx"
    export_onnx(b, path, optimized=False)
    ob = load_bundle(path)
    assert ob.classes == b.classes and ob.pre == b.pre and ob.sha256 == b.sha256
    assert ob.model is None and ob.backend == "onnxruntime"
    _assert_parity(ref, ob.predict_batch(images))
    with pytest.raises(BundleError, match="probabilities only"):
        ob.logits(images[:1])
    with pytest.raises(ExportError, match="export from the bundle folder"):
        export(ob, "onnx", tmp / "again.onnx")


@pytest.mark.skipif(importlib.util.find_spec("coremltools") is None, reason="coremltools not installed")
def test_coreml_spec_and_wrapper_parity(case):
    import torch

    from imgclf.exporters.formats import coreml_spec_summary, export_coreml

    name, b, images, ref, tmp = case
    res = export_coreml(b, tmp / "model.mlpackage")
    spec = coreml_spec_summary(res.path)
    h, w = b.pre.size
    assert spec["type"] == "mlProgram"
    assert spec["inputs"] == [
        {
            "name": "image",
            "type": "imageType",
            "width": w,
            "height": h,
            "color": "RGB" if b.pre.channels == 3 else "GRAYSCALE",
        }
    ]
    assert [o["name"] for o in spec["outputs"]] == ["classLabel", "classLabel_probs"]
    assert spec["predicted_probabilities"] == "classLabel_probs"
    assert spec["class_labels"] == b.classes
    assert spec["metadata"]["imgclf.bundle_sha256"] == b.sha256
    # Core ML cannot predict on Linux; check the exact traced graph it was converted from.
    ts = trace(b, ImageInputWrapper)
    with torch.inference_mode():
        probs = ts(torch.as_tensor(images).permute(0, 3, 1, 2).float()).numpy()
    _assert_parity(ref, probs)


def test_tflite(case):
    name, b, images, ref, tmp = case
    if importlib.util.find_spec("litert_torch") is None:
        with pytest.raises(ExportError, match="pip install"):
            export(b, "tflite", tmp / "model.tflite")
        pytest.skip("litert-torch not installed: checked the clear error instead")
    res = export(b, "tflite", tmp / "model.tflite", check_images=images)
    assert res.parity is not None, "ai-edge-litert missing: cannot run the .tflite file"
    assert res.parity.top1_agree == N_IMAGES and res.parity.max_abs_diff <= TOL, str(res.parity)
    assert json.loads(json.loads(res.extra[0].read_text())["imgclf.classes"]) == b.classes


def test_cli_export_then_predict_from_onnx(sign_bundle, sign_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "deploy" / "sign.onnx"
    check = str(sign_dir / "7")
    assert main(["export", str(sign_bundle), "--format", "onnx", "--out", str(out), "--check", check]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "sign.optimized.onnx" in text
    assert "top-1 agrees on 200/200" in text

    img = str(sorted((sign_dir / "4").iterdir())[0])
    assert main(["predict", str(out), img, "--json"]) == 0
    from_onnx = json.loads(capsys.readouterr().out)
    monkeypatch.setenv("IMGCLF_BACKEND", "onnxruntime")
    assert main(["predict", str(sign_bundle), img, "--json"]) == 0
    from_bundle = json.loads(capsys.readouterr().out)
    assert from_onnx == from_bundle  # same graph, same JSON, to the last digit
    monkeypatch.setenv("IMGCLF_BACKEND", "torch")
    assert main(["predict", str(sign_bundle), img, "--json"]) == 0
    from_torch = json.loads(capsys.readouterr().out)
    assert from_torch["label"] == from_onnx["label"]
    assert abs(from_torch["probability"] - from_onnx["probability"]) <= TOL


def test_cli_errors_are_one_line(sign_bundle, tmp_path, capsys, monkeypatch):
    assert main(["export", str(sign_bundle), "--format", "coreml", "--out", str(tmp_path / "x.mlmodel")]) == 2
    err = capsys.readouterr().err
    assert ".mlpackage" in err and "Traceback" not in err

    foreign = tmp_path / "foreign.onnx"
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(g), str(foreign))
    assert main(["predict", str(foreign), str(foreign)]) == 2
    assert "no imgclf metadata" in capsys.readouterr().err

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert main(["predict", str(junk), str(junk)]) == 2
    assert "not a loadable ONNX model" in capsys.readouterr().err

    monkeypatch.setenv("IMGCLF_BACKEND", "tensorrt")
    with pytest.raises(BundleError, match="IMGCLF_BACKEND=tensorrt"):
        load_bundle(sign_bundle)


def test_exported_onnx_and_served_bundle_give_identical_json(sign_bundle, sign_dir, tmp_path):
    """What a deployed .onnx file predicts equals what `imgclf serve` answers for the bundle."""
    from fastapi.testclient import TestClient

    from imgclf.runtime.predict import predict_files
    from imgclf.serving.app import create_app

    out = tmp_path / "sign.onnx"
    assert main(["export", str(sign_bundle), "--format", "onnx", "--out", str(out)]) == 0
    onnx_bundle = load_bundle(out)
    files = [str(sorted((sign_dir / c).iterdir())[3]) for c in "0369"]
    exported = [r.to_dict() for r in predict_files(onnx_bundle, files, top_k=3)]
    with TestClient(create_app(sign_bundle, backend="onnxruntime")) as client:
        for f, want in zip(files, exported):
            with open(f, "rb") as fh:
                r = client.post(
                    "/v1/predict?top_k=3", files={"file": (Path(f).name, fh.read(), "image/jpeg")}
                )
            assert r.status_code == 200, r.text
            got = r.json()["predictions"][0]
            assert got["label"] == want["label"]
            assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
            assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)
            for a, b in zip(got["top_k"], want["top_k"]):
                assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)


def test_int8_export_is_calibrated_on_training_images_and_checked_on_held_out(mnist_bundle, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(mnist_bundle), "--int8", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    q = tmp_path / "m.int8.onnx"
    assert q.exists() and q.stat().st_size < out.stat().st_size / 2  # int8 weights
    line = next(ln for ln in text.splitlines() if ln.startswith("int8:"))
    assert "held-out images" in line and "(float32) ->" in line
    meta = load_bundle(q).meta
    assert meta["classes"] == load_bundle(mnist_bundle).classes
    from imgclf.runtime.onnxrt import read_metadata

    props = read_metadata(q)
    assert (
        props["imgclf.quantization"].startswith("int8")
        and 200 <= int(props["imgclf.calibration_images"]) <= 256
    )
    # the int8 graph predicts like the float32 one on real MNIST test digits
    from imgclf.exporters.int8 import compare_int8

    b = load_bundle(mnist_bundle, backend="torch")
    x = _mnist_test_images(b)
    chk = compare_int8(OrtRunner(out), OrtRunner(q), x)
    assert chk.top1_agree >= 0.97 * chk.n
    assert chk.max_abs_diff < 0.2


def test_int8_needs_onnx_and_calibration_images(sign_bundle, tmp_path, capsys, monkeypatch):
    import shutil

    assert (
        main(["export", str(sign_bundle), "--format", "torchscript", "--int8", "-o", str(tmp_path / "a.pt")])
        == 2
    )
    assert "--int8 applies to --format onnx only" in capsys.readouterr().err
    # a copied bundle whose training data is gone needs --calibration
    moved = tmp_path / "copy"
    shutil.copytree(sign_bundle, moved)
    mj = moved / "model.json"
    meta = json.loads(mj.read_text())
    meta["data_source"] = str(tmp_path / "gone")
    mj.write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    rc = main(["export", str(moved), "--int8", "-o", str(tmp_path / "b.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "--calibration IMAGES" in err


def test_serve_runs_an_int8_onnx_file(mnist_bundle, mnist_dir, tmp_path):
    """`imgclf serve model.int8.onnx`: predictions as the file gives them; explain says why not."""
    import io as _io

    from fastapi.testclient import TestClient
    from PIL import Image

    from imgclf.serving.app import create_app

    out = tmp_path / "m.onnx"
    assert main(["export", str(mnist_bundle), "--int8", "-o", str(out)]) == 0
    q = tmp_path / "m.int8.onnx"
    b = load_bundle(q)
    assert b.meta["quantization"].startswith("int8")
    x = _mnist_test_images(load_bundle(mnist_bundle, backend="torch"))[:3]
    want = b.predict_batch(x)
    with TestClient(create_app(q)) as client:
        for img, p in zip(x, want):
            buf = _io.BytesIO()
            Image.fromarray(img[..., 0]).save(buf, "PNG")
            r = client.post("/v1/predict", files={"file": ("d.png", buf.getvalue(), "image/png")})
            assert r.status_code == 200, r.text
            got = r.json()["predictions"][0]
            assert got["label"] == b.classes[int(p.argmax())]
            assert got["probability"] == pytest.approx(float(p.max()), abs=1e-6)
        r = client.post("/v1/explain", files={"file": ("d.png", buf.getvalue(), "image/png")})
        assert r.status_code == 501 and "bundle folder" in r.json()["detail"]
        assert client.get("/openapi.json").status_code == 200


def test_ort_threads_default_and_override(monkeypatch):
    import os

    from imgclf.runtime.onnxrt import THREADS_ENV, default_threads

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert default_threads() == max(1, min(4, os.cpu_count() or 1))
    monkeypatch.setenv(THREADS_ENV, "3")
    assert default_threads() == 3
    monkeypatch.setenv(THREADS_ENV, "lots")  # unreadable: back to the default
    assert default_threads() == max(1, min(4, os.cpu_count() or 1))


@pytest.mark.parametrize("name", ["smallervggnet", "minivgg"])
def test_fold_batchnorm_forward_is_exact(name: str) -> None:
    from imgclf.exporters.int8 import fold_batchnorm_forward
    from imgclf.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(name, 5, in_channels=3, img_size=32).eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:  # trained-looking statistics, so the fold has something to fold
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
            bn.running_mean.uniform_(0, 1)
            bn.running_var.uniform_(0.5, 2)
        # A negative scale cannot pass a MaxPool: the BN before the first pool must stay.
        bns[{"smallervggnet": 0, "minivgg": 1}[name]].weight[0] = -0.7
    folded = fold_batchnorm_forward(model, (3, 32, 32))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4)
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    # Every BN followed by a conv is folded except the one with a negative scale before a
    # MaxPool; the last one feeds the dense layer, not a conv.
    followed_by_conv = {"smallervggnet": 4, "minivgg": 5}[name]
    assert left == len(bns) - followed_by_conv + 1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(bns)  # original untouched
