"""imgclf.analysis.evaluate: metrics vs hand computation, split selection, report, bad files, colour probe."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.analysis.evaluate import (
    bias_probe,
    bias_verdict,
    compute_metrics,
    evaluate,
    expected_calibration_error,
    greyscale,
    hue_shift,
    select_items,
    write_evaluation,
)
from imgclf.cli import main
from imgclf.data.sources import DataError, index_source
from imgclf.runtime.bundle import load_bundle


@pytest.fixture(autouse=True)
def _small_cpu() -> None:
    torch.set_num_threads(1)


# A fixed prediction set: 3 classes, 6 images.
Y = np.array([0, 0, 1, 1, 2, 2])
P = np.array(
    [
        [0.80, 0.10, 0.10],  # 0 -> 0 right, conf .8
        [0.30, 0.60, 0.10],  # 0 -> 1 wrong, conf .6, true in top-2
        [0.20, 0.70, 0.10],  # 1 -> 1 right, conf .7
        [0.10, 0.85, 0.05],  # 1 -> 1 right, conf .85
        [0.50, 0.10, 0.40],  # 2 -> 0 wrong, conf .5, true in top-2
        [0.05, 0.05, 0.90],  # 2 -> 2 right, conf .9
    ]
)


def test_metrics_match_hand_computation() -> None:
    m = compute_metrics(Y, P, ["a", "b", "c"], top_k=2)
    assert m["n_images"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # top-2: every true class is among the two most likely
    assert m["top_k"] == 2 and m["top_k_accuracy"] == pytest.approx(1.0)
    # predictions: [0, 1, 1, 1, 0, 2]
    # a: tp 1, fp 1, fn 1 -> P .5 R .5; b: tp 2, fp 1, fn 0 -> P 2/3 R 1; c: tp 1, fn 1 -> P 1 R .5
    prec = [0.5, 2 / 3, 1.0]
    rec = [0.5, 1.0, 0.5]
    f1 = [2 * p * r / (p + r) for p, r in zip(prec, rec)]
    assert m["precision_macro"] == pytest.approx(np.mean(prec))
    assert m["recall_macro"] == pytest.approx(np.mean(rec))
    assert m["f1_macro"] == pytest.approx(np.mean(f1))
    assert m["f1_weighted"] == pytest.approx(np.mean(f1))  # equal supports
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.3, 0.7, 0.85, 0.4, 0.9])))
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # ECE, 15 bins of width 1/15: confidences .5 .6 .7 .8 .85 .9 each fall in their own bin.
    conf = np.array([0.8, 0.6, 0.7, 0.85, 0.5, 0.9])
    right = np.array([1, 0, 1, 1, 0, 1])
    assert m["ece"] == pytest.approx(np.mean(np.abs(right - conf)))
    assert m["ece_bins"] == 15


def test_ece_bins_pool_confidences() -> None:
    # Two predictions in the same bin (14/15, 1]: one right, one wrong, mean conf .97 -> |.5 - .97|.
    p = np.array([[0.96, 0.04], [0.98, 0.02]])
    assert expected_calibration_error(p, np.array([0, 1])) == pytest.approx(abs(0.5 - 0.97))
    # A perfectly calibrated, fully confident model has ECE 0.
    assert expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)


def test_metrics_binary_and_missing_class() -> None:
    # Two classes: no top-k (it would be trivially 1); a class absent from y still gets a row.
    m = compute_metrics(np.array([0, 0, 1]), np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]]), ["x", "y"])
    assert "top_k_accuracy" not in m and m["accuracy"] == pytest.approx(2 / 3)
    m3 = compute_metrics(np.array([0, 1]), np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]), ["a", "b", "c"])
    assert m3["per_class"]["c"]["support"] == 0 and m3["confusion_matrix"][2] == [0, 0, 0]


def test_bias_words() -> None:
    v = bias_verdict(0.94, 0.61, 0.70, chance=0.1)
    assert "falls from 94 % to 61 % without colour" in v and "leans on colour" in v
    assert "does not depend on colour" in bias_verdict(0.94, 0.93, 0.935, chance=0.1)
    assert "chance" in bias_verdict(0.11, 0.10, 0.10, chance=0.1)


def test_colour_variants() -> None:
    red = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    red[..., 0] = 255
    g = greyscale(red)
    assert g.shape == red.shape and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert int(g[0, 0, 0, 0]) == 76  # 0.299 * 255, as PIL's "L"
    cyan = hue_shift(red, 0.5)
    assert cyan[0, 0, 0].tolist() == [0, 255, 255]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    assert np.abs(hue_shift(x, 0.0).astype(int) - x).max() <= 1


def _no_external_refs(html: str) -> None:
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html, flags=re.I)
    assert refs and all(r.startswith("data:") or r.startswith("#") for r in refs), refs
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "@import" not in html


def test_evaluate_mnist_official_test_split(mnist_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(mnist_bundle)
    out = tmp_path / "eval"
    res = evaluate(bundle, "mnist", out=out, limit=300, progress=False, bias=True)
    m = res.metrics
    assert m["split"] == "test" and "official test split" in m["selection"]
    assert all(it.startswith("mnist:test:") for it in res.items)
    assert m["n_images"] == len(res.items) == pytest.approx(300, abs=10)
    assert m["accuracy"] > 0.6  # a trained LeNet, far above chance (0.1)
    assert sum(r["support"] for r in m["per_class"].values()) == m["n_images"]
    assert m["failed_files"] == []
    assert m["bias"]["applicable"] is False  # greyscale model

    for name in ("metrics.json", "classification_report.txt", "confusion.png", "misclassified.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == m["accuracy"]
    assert "macro avg" in (out / "classification_report.txt").read_text()
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == m["n_images"]
    assert np.mean([int(r["correct"]) for r in rows]) == pytest.approx(m["accuracy"])
    assert all((r["true"] == r["predicted"]) == (r["correct"] == "1") for r in rows)

    html = (out / "report.html").read_text()
    _no_external_refs(html)
    assert 'id="confusion"' in html and 'id="per-class"' in html
    for c in bundle.classes:
        assert f'<td class="l">{c}</td>' in html
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(uris) >= 4  # confusion, misclassified, reliability, training curves
    sizes = [Image.open(io.BytesIO(base64.b64decode(u))).size for u in uris]
    assert all(w > 100 and h > 100 for w, h in sizes)


def test_evaluate_cli_json(mnist_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["evaluate", str(mnist_bundle), "--data", "mnist", "--limit", "100", "--json", "--no-progress"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["split"] == "test" and 0.0 <= m["accuracy"] <= 1.0 and len(m["confusion_matrix"]) == 10
    # A wrong split name is an argparse error; a source with other classes is one clear line.
    rc = main(["evaluate", str(mnist_bundle), "--data", "fashion-mnist", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "do not match the bundle's" in err and "Traceback" not in err


REPORT_FILES = [
    "metrics.json",
    "classification_report.txt",
    "confusion.png",
    "misclassified.png",
    "reliability.png",
    "predictions.csv",
    "report.html",
]


def test_eval_result_round_trips_to_report_files(mnist_bundle: Path, tmp_path: Path) -> None:
    # A bundle path and no data: loads the bundle and evaluates on the source it records.
    res = evaluate(str(mnist_bundle), limit=100, progress=False)
    assert res.out_dir is None and res.files == {}
    assert res.metrics["data"] == load_bundle(mnist_bundle).meta["data_source"]
    assert res.selection.split == res.metrics["split"] == "test"
    assert len(res.selection.idx) == len(res.items) == res.metrics["n_images"]
    assert res.failed == res.metrics["failed_files"] == [] and res.bias is None and res.tta is None
    assert res.accuracy == pytest.approx(res.correct.mean())
    assert res.confusion.sum() == res.metrics["n_images"] and np.trace(res.confusion) == res.correct.sum()

    written = write_evaluation(res, tmp_path / "ev")
    assert [p.name for p in written] == REPORT_FILES and all(p.stat().st_size > 0 for p in written)
    assert res.out_dir == tmp_path / "ev" and list(res.files.values()) == written
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == res.metrics
    with open(tmp_path / "ev" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    preds = res.predictions
    assert [r["file"] for r in rows] == res.files_rel == [p.file for p in preds]
    assert [r["predicted"] for r in rows] == [p.predicted for p in preds]
    assert [int(r["correct"]) for r in rows] == res.correct.astype(int).tolist()
    assert [float(r["probability"]) for r in rows] == pytest.approx(res.confidence.tolist(), abs=1e-6)


def test_recorded_split_is_used(sign_bundle: Path, sign_dir: Path) -> None:
    bundle = load_bundle(sign_bundle)
    index = index_source(str(sign_dir))
    recorded = json.loads((Path(bundle.meta["run_dir"]) / "splits.json").read_text())
    sel = select_items(bundle, index, None)
    # No test split was recorded for this folder run, so the held-out validation files are used.
    assert "test" not in recorded or not recorded["test"]
    assert sel.split == "val"
    assert {index.relpath(index.items[i]) for i in sel.idx} == set(recorded["val"])
    assert not set(recorded["train"]) & {index.relpath(index.items[i]) for i in sel.idx}
    with pytest.raises(DataError, match="--split all"):
        select_items(bundle, index, "test")
    assert len(select_items(bundle, index, "all").idx) == len(index)


def test_folder_with_bad_file_still_evaluates(
    sign_bundle: Path, small_sign_folder: Callable[..., Path], tmp_path: Path
) -> None:
    classes = tuple(str(i) for i in range(10))
    folder = small_sign_folder(tmp_path / "data", per_class=2, classes=classes)
    # Rename so that no file matches the run's recorded split: the default must then be "all".
    for f in list(folder.rglob("*.JPG")):
        f.rename(f.with_name("copy_" + f.name))
    (folder / "3" / "broken.jpg").write_bytes(b"this is not a jpeg")
    shutil.copy(next((folder / "4").iterdir()), folder / "4" / "truncated.jpg")
    blob = (folder / "4" / "truncated.jpg").read_bytes()
    (folder / "4" / "truncated.jpg").write_bytes(blob[: len(blob) // 3])
    bundle = load_bundle(sign_bundle)
    out = tmp_path / "eval"
    res = evaluate(bundle, str(folder), out=out, progress=False, bias=True)
    m = res.metrics
    assert m["split"] == "all" and m["n_images"] == 20
    assert res.failed == m["failed_files"] and res.bias == m["bias"]
    assert [p.name for p in (out / n for n in REPORT_FILES)] == [p.name for p in res.files.values()]
    bad = {f["file"]: f["reason"] for f in m["failed_files"]}
    assert set(bad) == {"3/broken.jpg", "4/truncated.jpg"}
    assert "not an image" in bad["3/broken.jpg"] and "truncated" in bad["4/truncated.jpg"]
    html = (out / "report.html").read_text()
    assert "Files that could not be read (2)" in html and "3/broken.jpg" in html
    _no_external_refs(html)
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 22 and {r["file"] for r in rows if r["error"]} == set(bad)

    # The colour probe runs the variants through predict_batch: check its numbers independently.
    b = m["bias"]
    assert b["applicable"] is True and b["verdict"]
    dec_images = np.stack([bundle.prepare(folder / r["file"]) for r in rows if not r["error"]])
    labels = np.array([bundle.classes.index(r["true"]) for r in rows if not r["error"]])
    grey_acc = float((bundle.predict_batch(greyscale(dec_images)).argmax(1) == labels).mean())
    assert b["greyscale_accuracy"] == pytest.approx(grey_acc)
    assert bias_probe(bundle, dec_images, labels)["accuracy"] == pytest.approx(m["accuracy"])
