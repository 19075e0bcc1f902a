"""Hostile or broken input: tampered bundles and bad configs give one line, never a traceback."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from imgclf.cli import main
from imgclf.core.errors import BundleError, ConfigError
from imgclf.runtime.bundle import load_bundle
from imgclf.training.config import TrainConfig


def _tamper(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "model.json").read_text())
    edit(meta)
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


def _del(*keys):
    def edit(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        d.pop(keys[-1])

    return edit


def _set(value, *keys):
    def edit(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return edit


CASES = {
    "classes cut to 3": (lambda m: m.__setitem__("classes", m["classes"][:3]), "class names"),
    "12 names for 10 outputs": (lambda m: m.__setitem__("classes", m["classes"] + ["x", "y"]), "class names"),
    "duplicate class names": (lambda m: m.__setitem__("classes", ["a"] * len(m["classes"])), "duplicate"),
    "classes not a list": (_set("abc", "classes"), "classes"),
    "missing preprocess": (_del("preprocess"), "preprocess"),
    "mean is text": (_set("abc", "preprocess", "mean"), "preprocess.mean"),
    "std zero": (_set([0.0], "preprocess", "std"), "std"),
    "size 100000x100000": (_set([100000, 100000], "preprocess", "size"), "preprocess.size"),
    "size 0x0": (_set([0, 0], "preprocess", "size"), "preprocess.size"),
    "channels 7": (_set(7, "preprocess", "channels"), "channels"),
    "unknown resize": (_set("magic", "preprocess", "resize"), "resize"),
    "bad architecture args": (
        _set(
            {"num_classes": 10, "in_channels": 1, "img_size": [28, 28], "width": -3}, "architecture", "args"
        ),
        "architecture",
    ),  # fmt: skip
    "architecture missing": (_del("architecture"), "architecture"),
    "unknown architecture": (_set("nonet", "architecture", "name"), "nonet"),
    "format_version text": (_set("abc", "format_version"), "format_version"),
    "no sha": (_del("weights_sha256"), "weights_sha256"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_model_json_gives_one_clear_error(case, mnist_bundle, tmp_path, capsys) -> None:
    edit, needle = CASES[case]
    bad = _tamper(mnist_bundle, tmp_path / "b", edit)
    with pytest.raises(BundleError, match=needle.replace(".", r"\.")):
        load_bundle(bad)
    rc = main(["predict", str(bad), __file__])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 0 and "model.json" in err


def test_nan_weights_are_refused(mnist_bundle, tmp_path) -> None:
    bad = tmp_path / "nan"
    shutil.copytree(mnist_bundle, bad)
    sd = load_file(str(bad / "model.safetensors"))
    k = next(k for k, v in sd.items() if v.is_floating_point())
    sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, str(bad / "model.safetensors"))
    meta = json.loads((bad / "model.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((bad / "model.safetensors").read_bytes()).hexdigest()
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="NaN"):
        load_bundle(bad)


BAD_CONFIGS = {
    "epochs: abc": ({"epochs": "abc"}, "whole number"),
    "lr: fast": ({"lr": "fast"}, "expected a number"),
    "epochs: 1.7": ({"epochs": 1.7}, "whole number"),
    "lr: null": ({"lr": None}, "required"),
    "lr nan": ({"lr": float("nan")}, "finite"),
    "label_smoothing 2": ({"label_smoothing": 2}, "range"),
    "momentum -1": ({"momentum": -1}, "range"),
    "val+test 1.2": ({"val_split": 0.6, "test_split": 0.6}, "holds out"),
    "ema 5": ({"ema": 5}, "range"),
    "epochs: true": ({"epochs": True}, "whole number"),
    "subset 0": ({"subset": 0}, "range"),
    "patience -1": ({"patience": -1}, "range"),
    "mean for 2 of 3 channels": ({"mean": [0.1, 0.2], "channels": 3}, "one per channel"),
    "optimizer typo": ({"optimizer": "adan"}, "not one of"),
    "mean text": ({"mean": "abc"}, "list of finite numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_values_are_one_line_errors(case, tmp_path, capsys) -> None:
    values, needle = BAD_CONFIGS[case]
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**values).validate()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"data": "digits", **values}))
    rc = main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 0 and needle in err
    assert not (tmp_path / "r").exists()  # nothing was started


def test_broken_yaml_and_cli_nan_are_one_line(tmp_path, capsys) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("epochs: [1, 2\nlr: 0.1\n")
    assert main(["train", "--config", str(y)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid YAML" in err and err.count("\n") == 0
    assert main(["train", "--data", "digits", "--lr", "nan", "--out", str(tmp_path / "r")]) == 2
    assert "finite" in capsys.readouterr().err


def _odd_folder(root: Path, small_sign_folder) -> Path:
    """Real photos plus a non-UTF-8 name, a non-image with a non-UTF-8 name, two symlink loops and
    a folder named like an image (``1/x.jpg/``, holding a real photo)."""
    import os

    small_sign_folder(root, per_class=10)
    src = next((root / "0").iterdir())
    shutil.copy(src, os.path.join(os.fsencode(root / "0"), b"caf\xe9.jpg"))
    Path(os.fsdecode(os.path.join(os.fsencode(root / "1"), b"bad\xff.jpg"))).write_bytes(b"not an image")
    (root / "2" / "loop").symlink_to(root / "2")
    (root / "2" / "up").symlink_to(root)
    (root / "1" / "x.jpg").mkdir()
    shutil.copy(src, root / "1" / "x.jpg" / "inside.jpg")
    return root


def test_non_utf8_names_and_symlink_loops_train_and_predict(tmp_path, small_sign_folder, capsys) -> None:
    import imgclf

    root = _odd_folder(tmp_path / "ds", small_sign_folder)
    res = imgclf.train(data=str(root), model="simplecnn", img_size=32, epochs=1, out=str(tmp_path / "r"))
    skipped = (res.run_dir / "skipped_files.txt").read_bytes()
    assert b"bad\xff.jpg\tnot an image" in skipped  # the original bytes, so the user can find the file
    assert skipped.count(b"symbolic link loop") == 2
    assert b"/1/x.jpg\tfolder named like an image file" in skipped
    splits = json.loads((res.run_dir / "splits.json").read_text())
    listed = [p for v in splits.values() for p in v]
    assert len(listed) == len(set(listed)) and not any(
        "loop" in p or "up/" in p or "x.jpg" in p for p in listed
    )
    rc = main(["predict", str(res.run_dir), str(root) + "/**/*", "--csv", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert rc in (0, 1) and "Traceback" not in err
    assert f"skipped {root}/1/x.jpg: folder named like an image file" in err
    assert f"skipped {root}/2/loop: symbolic link loop" in err
    rows = (tmp_path / "p.csv").read_bytes().splitlines()[1:]
    assert len(rows) == 32  # 30 photos + the copy + the bad file, each once despite two loops in the glob
    assert any(r.startswith(str(root / "0").encode() + b"/caf\xe9.jpg") for r in rows)
    assert main(["inspect", "--data", str(root), "--out", str(tmp_path / "doc")]) in (0, 1)
    assert (tmp_path / "doc" / "inspect.html").stat().st_size > 500
    page = (tmp_path / "doc" / "inspect.html").read_bytes()
    assert b"bad\\xff.jpg" in page and b"Skipped while listing (3)" in page
    doc = json.loads((tmp_path / "doc" / "inspect.json").read_text())
    assert {(e["path"], e["class"], e["reason"].split(":")[0]) for e in doc["skipped"]} == {
        ("1/x.jpg", "1", "folder named like an image file"),
        ("2/loop", "2", "symbolic link loop"),
        ("2/up", "2", "symbolic link loop"),
    }
    assert "skipped while listing (3):" in capsys.readouterr().out
    assert main(["evaluate", str(res.run_dir), "--data", str(root), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_images"] > 0
    assert "Traceback" not in capsys.readouterr().err


def test_empty_class_folder_is_refused(tmp_path, small_sign_folder) -> None:
    from imgclf.core.errors import DataError
    from imgclf.data.sources import index_folder

    root = small_sign_folder(tmp_path / "ds", per_class=3)
    (root / "9").mkdir()
    (root / "9" / ".hidden").write_text("x")
    with pytest.raises(DataError, match="9 hold no files"):
        index_folder(root)


def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path) -> None:
    import csv
    import os
    import signal
    import subprocess
    import sys
    import time

    def cmd(out: Path) -> list[str]:
        args = "train --data digits --model lenet --epochs 4 --threads 1 --no-tensorboard --no-progress"
        return [sys.executable, "-m", "imgclf", *args.split(), "--out", str(out)]

    env = dict(os.environ)
    subprocess.run(cmd(tmp_path / "ref"), check=True, capture_output=True, env=env)
    p = subprocess.Popen(cmd(tmp_path / "k"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    last = tmp_path / "k" / "checkpoints" / "last.safetensors"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert main(["train", "--resume", str(tmp_path / "k"), "--no-progress"]) == 0

    def lrs(run: Path) -> list[str]:
        return [r["lr"] for r in csv.DictReader(open(run / "history.csv"))]

    assert lrs(tmp_path / "k") == lrs(tmp_path / "ref")
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())["test_accuracy"]
    b = json.loads((tmp_path / "k" / "metrics.json").read_text())["test_accuracy"]
    assert b == pytest.approx(a, abs=0.01)
    assert not list((tmp_path / "k").rglob(".*.tmp"))
