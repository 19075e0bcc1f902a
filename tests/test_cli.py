"""The `imgclf` command end to end (as a user runs it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.cli import main
from imgclf.training import auto, recipes


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imgclf", *args], capture_output=True, text=True, timeout=600
    )


def test_help_lists_commands_and_train_options() -> None:
    r = _run("--help")
    assert r.returncode == 0
    for cmd in ("train", "predict", "models"):
        assert cmd in r.stdout
    r = _run("train", "--help")
    assert "--val-split" in r.stdout and "--resume" in r.stdout and "mnist, fashion-mnist, digits" in r.stdout


def test_models_lists_registry() -> None:
    r = _run("models")
    assert r.returncode == 0
    assert "smallervggnet" in r.stdout and "lenet" in r.stdout and "1,256,080" in r.stdout


def test_predict_json_fields_and_bad_file(mnist_bundle: Path, tmp_path: Path, mnist_dir: Path) -> None:
    from imgclf.data.sources import index_source

    idx = index_source("mnist")
    test = np.flatnonzero(idx.split == "test")[:5]
    for i in test:
        Image.fromarray(idx.arrays[i]).save(tmp_path / f"digit_{idx.labels[i]}_{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    r = _run("predict", str(mnist_bundle), str(tmp_path), "--json", "--top-k", "3")
    assert r.returncode == 1  # one file failed
    lines = [json.loads(s) for s in r.stdout.splitlines()]
    assert len(lines) == 5
    for d in lines:
        assert set(d) == {"path", "label", "probability", "top_k", "unknown", "ood_score"}
        assert isinstance(d["unknown"], bool) and isinstance(d["ood_score"], float)
        assert len(d["top_k"]) == 3 and d["top_k"][0]["label"] == d["label"]
        assert 0 <= d["probability"] <= 1
    assert "broken.png" in r.stderr and "Traceback" not in r.stderr
    # the plain format
    r = _run("predict", str(mnist_bundle), *sorted(str(p) for p in tmp_path.glob("digit_*.png")))
    assert r.returncode == 0
    assert all(re.search(r": \d+\.\d\d%( \(unknown: .*\))?$", line) for line in r.stdout.splitlines())
    # An input that yields no image is an error that says which and why, not silence.
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    r = _run("predict", str(mnist_bundle), str(tmp_path / "empty"), str(tmp_path / "gone.png"))
    assert r.returncode == 1 and r.stdout == ""
    assert "empty: folder holds no files" in r.stderr and "gone.png: no such file" in r.stderr


def test_user_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "not a folder and not a built-in" in err
    assert main(["predict", str(tmp_path / "nobundle"), "x.png"]) == 2
    assert "no such bundle" in capsys.readouterr().err
    assert main(["train", "--data", "digits", "--model", "lenett", "--out", str(tmp_path / "r2")]) == 2
    assert "did you mean 'lenet'" in capsys.readouterr().err


def test_train_cli_end_to_end_on_digits(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _run(
        "train",
        "--data",
        "digits",
        "--model",
        "lenet",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--no-tensorboard",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    # Two epochs under the auto recipe's augmentation (full strength below 200 images a class):
    # well above chance (10 %), not converged (79 % here; 46 epochs give 97.8 %).
    assert summary["epochs_run"] == 2 and summary["test_accuracy"] > 0.7
    assert "epoch 2/2" in r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "lenet" and cfg["epochs"] == 2 and cfg["tensorboard"] is False


def test_config_file_keys_beat_the_recipe_even_at_default_values(tmp_path: Path) -> None:
    # The auto recipe sets AdamW and measures the lr; the file asks for the plain defaults
    # lr 1e-3 and adam, which must win, and the command line beats the file.
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"data": "digits", "lr": 0.001, "optimizer": "adam", "epochs": 3}))
    out = tmp_path / "run"
    r = _run("train", "--config", str(cfg_file), "--epochs", "1", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["lr"], cfg["optimizer"], cfg["epochs"], cfg["recipe"]) == (0.001, "adam", 1, "auto")
    # Keys the file leaves out still come from the recipe (its weight decay for a non-AdamW optimizer).
    assert (cfg["label_smoothing"], cfg["weight_decay"]) == (
        auto.STATIC["label_smoothing"],
        recipes.COUPLED_WEIGHT_DECAY,
    )
    cfg_file.write_text(json.dumps({"data": "digits", "lr": 0.001, "lrr": 2}))
    r = _run("train", "--config", str(cfg_file), "--out", str(tmp_path / "r2"), "--no-progress")
    assert r.returncode == 2 and "lrr" in r.stderr and "did you mean 'lr'" in r.stderr
