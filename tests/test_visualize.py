"""Pictures: annotation captions, overlays, montages, predict --annotate/--csv/--gallery, show-data."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.analysis import visualize as V
from imgclf.analysis.gallery import annotation_lines
from imgclf.cli import main
from imgclf.data.sources import index_source
from imgclf.runtime.bundle import load_bundle
from imgclf.runtime.predict import judge_from_filename, predict_files


@pytest.fixture(autouse=True)
def _small_cpu() -> None:
    torch.set_num_threads(1)


def _size(png: bytes) -> tuple[int, int]:
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG"
    return im.size


def test_judge_from_filename() -> None:
    poke = ["bulbasaur", "charmander", "pikachu"]
    assert judge_from_filename("ex/charmander_counter.png", poke, "charmander") == "correct"
    assert judge_from_filename("ex/charmander_counter.png", poke, "pikachu") == "incorrect"
    assert judge_from_filename("ex/my_photo.png", poke, "pikachu") is None
    assert judge_from_filename("ex/pikachu_vs_bulbasaur.png", poke, "pikachu") is None  # ambiguous
    digits = [str(i) for i in range(10)]
    assert judge_from_filename("IMG_1118.JPG", digits, "1") is None  # digits inside a number don't count
    assert judge_from_filename("3_hand.jpg", digits, "3") == "correct"
    assert judge_from_filename("hand-3.jpg", digits, "5") == "incorrect"
    assert judge_from_filename("digit_1.png", digits, "2") == "incorrect"  # "1" is a whole token
    fashion = ["T-shirt/top", "Shirt", "Sneaker"]
    assert judge_from_filename("shirt_01.png", fashion, "Shirt") == "correct"
    assert V.annotation_text("cat", 0.85421, "correct") == "cat: 85.42% (correct)"
    assert V.annotation_text("cat", 1.0) == "cat: 100.00%"


def test_overlay_blend() -> None:
    img = np.full((6, 8, 3), 200, dtype=np.uint8)
    heat = np.zeros((6, 8), dtype=np.float32)
    heat[:, 4:] = 1.0
    assert np.abs(V.overlay(img, heat, alpha=0.0).astype(int) - img).max() <= 1
    full = V.overlay(img, heat, alpha=1.0)
    # jet: 0 -> dark blue, 1 -> dark red
    assert full[0, 0, 2] > 100 and full[0, 0, 0] < 10
    assert full[0, 7, 0] > 100 and full[0, 7, 2] < 10
    with pytest.raises(ValueError, match="does not match"):
        V.overlay(img, heat[:3])


def test_montages_and_confusion() -> None:
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 255, (28, 28), dtype=np.uint8) for _ in range(7)]
    w, h = _size(V.montage(ims, [f"#{i}" for i in range(7)], cols=4))
    assert w > h  # 4 columns x 2 rows
    w2, h2 = _size(V.class_montage([("a", ims[:3]), ("b", ims[3:5]), ("c", ims[5:])]))
    assert h2 > 200
    cm = np.array([[5, 1], [0, 4]])
    assert min(_size(V.confusion_png(cm, ["cat", "dog"]))) > 200
    assert _size(V.montage([])) > (0, 0)


def _mnist_pngs(mnist_dir: Path, dst: Path) -> list[Path]:
    index = index_source(str(mnist_dir))
    test = np.flatnonzero(index.split == "test")[:6]
    dst.mkdir()
    out = []
    for n, i in enumerate(test):
        label = index.classes[index.labels[i]]
        # names like "7_sample0.png" carry the true class, "digit_b.png" none (no verdict expected)
        name = f"{label}_sample{n}.png" if n % 2 == 0 else f"digit_{chr(97 + n)}.png"
        Image.fromarray(index.arrays[i]).save(dst / name)
        out.append(dst / name)
    return out


def test_predict_annotate_csv(
    mnist_bundle: Path, mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _mnist_pngs(mnist_dir, tmp_path / "pics")
    (tmp_path / "pics" / "broken.png").write_bytes(b"\x89PNG but not really")
    ann, csv_path = tmp_path / "ann", tmp_path / "p.csv"
    rc = main(
        [
            "predict",
            str(mnist_bundle),
            str(tmp_path / "pics"),
            "--json",
            "--annotate",
            str(ann),
            "--csv",
            str(csv_path),
        ]
    )
    cap = capsys.readouterr()
    assert rc == 1 and "broken.png" in cap.err  # one bad file: reported, the rest predicted
    printed = {Path(d["path"]).name: d for d in map(json.loads, cap.out.splitlines())}
    assert set(printed) == {f.name for f in files}

    bundle = load_bundle(mnist_bundle)
    results = {Path(r.path).name: r for r in predict_files(bundle, [str(f) for f in files])}
    for f in files:
        d, r = printed[f.name], results[f.name]
        line = annotation_lines(bundle, r)[0]
        # The caption is exactly the prediction the command printed.
        expect = f"{d['label']}: {d['probability'] * 100:.2f}%"
        if f.name.startswith("digit_"):
            assert line == expect
        else:
            verdict = "correct" if f.name.split("_")[0] == d["label"] else "incorrect"
            assert line == f"{expect} ({verdict})"
        out = Image.open(ann / f"{f.stem}.png").convert("RGB")
        assert out.width == 400 and out.height == 400
        # Text is drawn in the top-left corner in green (right) or red (wrong); the digit's
        # black background has neither colour.
        top = np.asarray(out)[:40, :].astype(int)
        colour = V.RED if line.endswith("(incorrect)") else V.GREEN
        assert (np.abs(top - np.array(colour)).sum(axis=2) < 60).sum() > 20
        assert (np.abs(np.asarray(out)[200:, :].astype(int) - np.array(colour)).sum(axis=2) < 60).sum() == 0

    with open(csv_path) as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert len(rows) == 7 and "not an image" in rows["broken.png"]["error"]
    for name, d in printed.items():
        assert rows[name]["label"] == d["label"] and rows[name]["top1_label"] == d["label"]
        assert float(rows[name]["probability"]) == pytest.approx(d["probability"], abs=1e-6)
        assert rows[name]["top5_label"] != ""


def test_predict_gallery_and_show_data(
    mnist_bundle: Path, mnist_dir: Path, sign_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = tmp_path / "gallery.png"
    assert (
        main(
            [
                "predict",
                str(mnist_bundle),
                "--gallery",
                "9",
                "--data",
                "mnist",
                "--gallery-out",
                str(g),
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert "correct" in capsys.readouterr().out and _size(g.read_bytes())[0] > 300
    assert main(["predict", str(mnist_bundle), "--gallery", "4"]) == 2  # needs --data
    assert "--data" in capsys.readouterr().err

    grid = tmp_path / "grid.png"
    assert main(["show-data", "--data", str(sign_dir), "--out", str(grid), "--per-class", "3"]) == 0
    w, h = _size(grid.read_bytes())
    assert h > w  # 10 rows of 3
    rnd = tmp_path / "rnd.png"
    assert main(["show-data", "--data", "mnist", "--random", "25", "--out", str(rnd)]) == 0
    assert _size(rnd.read_bytes())[0] > 300
    assert main(["show-data", "--data", str(tmp_path / "nope"), "--out", str(rnd)]) == 2
    assert "not a folder and not a built-in dataset" in capsys.readouterr().err
