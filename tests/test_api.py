"""The public API: every entry called twice in one process, the README's example, callbacks."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgclf
from imgclf.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _digit_png(path: Path, index: int = 7) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    Image.fromarray((d.images[index] * 255 / 16).astype(np.uint8)).save(path)
    return path


def test_each_entry_twice_in_one_process(tmp_path: Path) -> None:
    """The old API broke on the second call: the submodule imgclf.train replaced the function."""
    results = [
        imgclf.train(data="digits", model="lenet", epochs=1, out=str(tmp_path / f"r{i}"), tensorboard=False)
        for i in range(2)
    ]
    assert callable(imgclf.train) and callable(imgclf.evaluate) and callable(imgclf.inspect)
    assert all(r.metrics["epochs_run"] == 1 for r in results)
    png = _digit_png(tmp_path / "7.png")
    for r in results:
        model = imgclf.load(r.bundle_dir)
        pred = model.predict(str(png))[0]
        assert pred["label"] in model.classes and 0.0 <= pred["probability"] <= 1.0
        probs = model.predict_batch(np.stack([model.prepare(str(png))] * 3))
        assert probs.shape == (3, 10) and np.allclose(probs.sum(1), 1.0, atol=1e-4)
    for i, r in enumerate(results):
        ev = imgclf.evaluate(r.bundle_dir, out=tmp_path / f"eval{i}")
        written = json.loads((tmp_path / f"eval{i}" / "metrics.json").read_text())
        assert written["accuracy"] == pytest.approx(ev.metrics["accuracy"])
        assert ev.metrics["accuracy"] == pytest.approx(r.metrics["test_accuracy"], abs=1e-6)
    for i, r in enumerate(results):
        res = imgclf.export(r.bundle_dir, "onnx", tmp_path / f"m{i}.onnx")
        assert res.path.exists() and res.parity is not None and res.parity.ok
        onnx_model = imgclf.load(res.path)
        assert (
            onnx_model.predict(str(png))[0]["label"]
            == imgclf.load(r.bundle_dir).predict(str(png))[0]["label"]
        )
    for _ in range(2):
        doc = imgclf.inspect("digits", near=False)
        assert doc.to_dict()["totals"]["images"] == 1797
    for r in results:
        with imgclf.serve(r.bundle_dir, port=0, background=True) as server:
            with urllib.request.urlopen(server.url + "/healthz", timeout=10) as resp:
                assert resp.status == 200


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"From Python.*?```python\n(.*?)```", text, re.S)
    assert m, "README has no 'From Python' example"
    monkeypatch.chdir(tmp_path)
    _digit_png(tmp_path / "digit.png")
    exec(compile(m.group(1), "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "'label':" in out and "http://127.0.0.1:" in out
    assert (tmp_path / "runs/digits/eval/report.html").exists()
    assert (tmp_path / "runs/digits/digits.onnx").exists()
    assert (tmp_path / "runs/digits-2/model/model.json").exists()


class Recorder(imgclf.Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.epochs_seen = 0
        self.batches = 0
        self.stop_at = stop_at

    def on_train_begin(self, trainer) -> None:
        self.calls.append("train_begin")

    def on_epoch_begin(self, trainer, epoch) -> None:
        self.calls.append(f"epoch_begin {epoch}")

    def on_batch_end(self, trainer, batch, logs) -> None:
        self.batches += 1
        assert np.isfinite(logs["loss"]) and logs["lr"] > 0

    def on_epoch_end(self, trainer, epoch, logs) -> None:
        self.calls.append(f"epoch_end {epoch}")
        self.epochs_seen += 1
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "time_s"} <= set(logs)
        if self.stop_at == epoch:
            trainer.stop("recorder says stop")

    def on_train_end(self, trainer, logs) -> None:
        self.calls.append("train_end")
        assert "test_accuracy" in logs

    def state_dict(self) -> dict:
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state: dict) -> None:
        self.epochs_seen = state["epochs_seen"]


def test_user_callback_sees_every_hook_can_stop_and_resumes_with_state(tmp_path: Path) -> None:
    rec = Recorder(stop_at=2)
    res = imgclf.train(
        data="digits", model="lenet", epochs=5, out=str(tmp_path / "r"), tensorboard=False, callbacks=[rec]
    )
    assert rec.calls == [
        "train_begin",
        "epoch_begin 1",
        "epoch_end 1",
        "epoch_begin 2",
        "epoch_end 2",
        "train_end",
    ]
    assert res.metrics["epochs_run"] == 2 and res.metrics["stopped_early"]
    assert rec.batches == 2 * (len(json.loads((res.run_dir / "splits.json").read_text())["train"]) // 32)
    again = Recorder()
    cont = imgclf.resume(res.run_dir, epochs=3, callbacks=[again])
    assert again.epochs_seen == 3  # 2 restored from the checkpoint + the one epoch it ran
    assert [int(h["epoch"]) for h in cont.history] == [1, 2, 3]


def test_run_killed_before_first_checkpoint_restarts(tmp_path: Path) -> None:
    """What a kill -9 during epoch 1 leaves: config.json, splits.json, an empty checkpoints/, a temp file."""
    out = tmp_path / "r"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text(
        json.dumps(TrainConfig(data="digits", model="lenet", epochs=1, out=str(out)).to_dict())
    )
    (out / ".history.csv.abc.tmp").write_text("half")
    res = imgclf.resume(out)
    assert res.metrics["epochs_run"] == 1 and not list(out.rglob(".*.tmp"))
    fresh = tmp_path / "f"
    (fresh / "checkpoints").mkdir(parents=True)
    assert imgclf.train(data="digits", model="lenet", epochs=1, out=str(fresh)).metrics["epochs_run"] == 1


def test_options_doc_is_generated_from_the_config() -> None:
    from imgclf.training.config import options_markdown

    assert (ROOT / "docs" / "OPTIONS.md").read_text() == options_markdown()
