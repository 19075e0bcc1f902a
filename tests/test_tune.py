"""imgclf tune: the search writes a config that trains, survives crashed trials, resumes, prunes.

Search logic is tested with a stand-in for ``train`` that drives the real callback with planned
validation accuracies (deterministic and instant); one test runs the real search end to end on the
built-in digits with LeNet through the CLI and trains the winner.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("optuna", reason="imgclf tune needs Optuna (pip install 'optuna>=4.0')")

from imgclf.cli import main  # noqa: E402
from imgclf.core.errors import ConfigError, TrainingError  # noqa: E402
from imgclf.training import tune as T  # noqa: E402
from imgclf.training.trainer import TrainResult  # noqa: E402

# Fixed keys of the stand-in searches: the recipe is named so that the tests do not depend on
# what the default recipe decides from the data.
GIVEN = {"data": "digits", "model": "lenet", "recipe": "best", "img_size": 16}


class FakeTrainer:
    """The part of the Trainer a callback uses here."""

    def __init__(self) -> None:
        self.reason = ""

    def stop(self, reason: str, *, failed: bool = False) -> None:
        self.reason = reason


class FakeTrain:
    """``train(cfg, progress=, callbacks=)`` that reports ``acc(trial, epoch)`` to the callbacks."""

    def __init__(
        self,
        acc: Callable[[int, int], float],
        raises: dict[int, BaseException] | None = None,
        nan: tuple[int, ...] = (),
        sleep: float = 0.0,
    ) -> None:
        self.acc, self.raises, self.nan, self.sleep = acc, raises or {}, nan, sleep
        self.calls: list[int] = []
        self.epochs: dict[int, int] = {}
        self.configs: dict[int, Any] = {}

    def __call__(self, cfg: Any, *, progress: Any = None, callbacks: list | None = None) -> TrainResult:
        n = int(Path(cfg.out).name)
        self.calls.append(n)
        self.configs[n] = cfg
        time.sleep(self.sleep)
        if n in self.raises:
            raise self.raises[n]
        tr = FakeTrainer()
        for cb in callbacks or []:
            cb.on_train_begin(tr)
        history = []
        for epoch in range(1, cfg.epochs + 1):
            a = self.acc(n, epoch)
            logs = {
                "epoch": epoch,
                "train_loss": 1.0,
                "train_acc": a,
                "val_loss": 1 - a,
                "val_acc": a,
                "lr": 0.1,
            }
            history.append(logs)
            for cb in callbacks or []:
                cb.on_epoch_end(tr, epoch, logs)
            if tr.reason:
                break
        self.epochs[n] = len(history)
        metrics: dict[str, Any] = {
            "val_accuracy": history[-1]["val_acc"],
            "val_loss": history[-1]["val_loss"],
        }
        metrics["epochs_run"] = len(history)
        if n in self.nan:
            metrics["stop_reason"] = "loss became nan at epoch 1, batch 3: training diverged"
        return TrainResult(Path(cfg.out), Path(cfg.out) / "model", metrics, history)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeTrain]:
    def make(*args: Any, **kw: Any) -> FakeTrain:
        f = FakeTrain(*args, **kw)
        monkeypatch.setattr(T, "train", f)
        return f

    return make


def _by_number(result: T.TuneResult) -> dict[int, T.TrialRow]:
    return {r.number: r for r in result.rows}


def test_pruning_stops_bad_trials_early(fake, tmp_path: Path) -> None:
    f = fake(lambda n, e: 0.9 if n == 0 else 0.1)  # trial 0 is good; later ones are clearly worse
    res = T.tune(GIVEN, budget_s=600, out=tmp_path, trials=3, max_epochs=9)
    rows = _by_number(res)
    assert rows[0].state == "complete" and f.epochs[0] == 9
    for n in (1, 2):
        assert rows[n].state == "pruned" and f.epochs[n] == 1 < 9, rows[n]
        assert rows[n].epochs_run == 1 and "pruned at epoch 1" in rows[n].note
    assert (res.n_trials, res.n_pruned, res.n_failed) == (3, 2, 0)
    assert res.best_value == pytest.approx(0.9) and res.best_trial_dir == tmp_path / "trials" / "000"
    # every searched key was passed explicitly; the fixed ones as given
    cfg = f.configs[1]
    assert (cfg.model, cfg.img_size, cfg.epochs, cfg.recipe, cfg.tensorboard) == (
        "lenet",
        16,
        9,
        "best",
        False,
    )
    assert cfg.lr == rows[1].params["lr"] and cfg.augment == "on"


def test_crashed_trial_does_not_end_the_search(fake, tmp_path: Path) -> None:
    f = fake(
        lambda n, e: 0.5 + 0.01 * n,
        raises={1: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")},
        nan=(2,),
    )
    res = T.tune(GIVEN, budget_s=600, out=tmp_path, trials=5, max_epochs=2, pruner="none")
    rows = _by_number(res)
    assert (
        rows[1].state == "failed"
        and rows[1].note == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert rows[2].state == "failed" and "diverged" in rows[2].note  # TerminateOnNaN's stop
    assert [rows[n].state for n in (0, 3, 4)] == ["complete"] * 3
    assert f.calls == [0, 1, 2, 3, 4] and res.n_failed == 2
    assert res.best_value == pytest.approx(0.54)
    table = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [t["state"] for t in table] == ["complete", "failed", "failed", "complete", "complete"]
    assert "out of memory" in table[1]["note"] and table[1]["value"] == ""


def test_broken_setup_stops_after_failures_in_a_row(fake, tmp_path: Path) -> None:
    fake(lambda n, e: 0.5, raises={n: ValueError(f"bad {n}") for n in range(20)})
    with pytest.raises(TrainingError, match="5 trials in a row failed"):
        T.tune(GIVEN, budget_s=600, out=tmp_path, trials=20, max_epochs=2)
    assert len(list(csv.DictReader((tmp_path / "trials.csv").open()))) == 5


def test_rerun_resumes_the_study(fake, tmp_path: Path) -> None:
    f = fake(lambda n, e: 0.3 + 0.1 * n, sleep=0.3)
    first = T.tune(GIVEN, budget_s=600, out=tmp_path, trials=2, max_epochs=2, pruner="none")
    assert f.calls == [0, 1]
    again = T.tune(GIVEN, budget_s=600, out=tmp_path, trials=4, max_epochs=2, pruner="none")
    assert f.calls == [0, 1, 2, 3]  # the first two were kept, not run again
    assert again.n_trials == 4
    for a, b in zip(first.rows, again.rows[:2]):
        assert (a.number, a.params, a.value) == (b.number, b.params, b.value)
    assert again.rows[2].params != first.rows[0].params  # a resumed sampler draws new points
    # The budget counts across runs: once spent, the same command trains nothing more.
    assert again.spent_s >= 1.2
    third = T.tune(GIVEN, budget_s=1.0, out=tmp_path, trials=10, max_epochs=2, pruner="none")
    assert f.calls == [0, 1, 2, 3] and third.n_trials == 4
    # Another setup in the same folder is refused rather than mixed in.
    with pytest.raises(ConfigError, match="other fixed keys"):
        T.tune({**GIVEN, "img_size": 28}, budget_s=600, out=tmp_path, trials=5, max_epochs=2)


def test_ctrl_c_stops_cleanly_and_the_search_resumes(fake, tmp_path: Path) -> None:
    f = fake(lambda n, e: 0.5, raises={1: KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        T.tune(GIVEN, budget_s=600, out=tmp_path, trials=3, max_epochs=2, pruner="none")
    table = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [(t["state"], t["note"]) for t in table] == [("complete", ""), ("failed", "interrupted (Ctrl-C)")]
    assert (tmp_path / "best.yaml").exists()  # what was found so far
    f.raises = {}
    res = T.tune(GIVEN, budget_s=600, out=tmp_path, trials=3, max_epochs=2, pruner="none")
    assert f.calls == [0, 1, 2] and [r.state for r in res.rows] == ["complete", "failed", "complete"]


def test_space_leaves_out_fixed_keys_and_picks_models_by_data(tmp_path: Path) -> None:
    grey = T.search_space({"data": "digits"})
    assert grey["model"].choices == T.SEARCH_MODELS["grey"] and "flip" not in grey
    colour = T.search_space({"data": str(tmp_path), "model": "resnet20", "lr": 0.01})
    assert (
        "model" not in colour
        and "lr" not in colour
        and colour["img_size"].choices == T.SEARCH_SIZES["colour"]
    )
    assert "flip" in colour
    off = T.search_space({"data": "digits", "augment": "off"})
    assert not set(T.AUGMENT_KEYS) & set(off)


def test_reporter_stops_a_real_trainer_at_the_deadline(tmp_path: Path) -> None:
    from imgclf.training.api import train
    from imgclf.training.recipes import config_from

    seen: list[tuple[int, float]] = []
    rep = T.TrialReporter(lambda e, v, logs: seen.append((e, v)) and None, planned_epochs=5, deadline=0.0)
    cfg = config_from({**GIVEN, "epochs": 5, "subset": 200, "out": str(tmp_path / "r"), "tensorboard": False})
    m = train(cfg, progress=False, callbacks=[rep]).metrics
    assert m["epochs_run"] == 1 and rep.out_of_time and not rep.pruned
    assert len(seen) == 1 and seen[0][0] == 1 and 0 <= seen[0][1] <= 1


def test_tune_cli_writes_a_config_that_trains(tmp_path: Path, capsys) -> None:
    out = tmp_path / "search"
    argv = ["tune", "--data", "digits", "--model", "lenet", "--img-size", "16", "--subset", "300"]
    argv += [
        "--set",
        "recipe=best",
        "--budget",
        "60s",
        "--trials",
        "2",
        "--max-epochs",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "trial   0" in text and "trial   1" in text and f"--config {out / 'best.yaml'}" in text
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "out" not in best and "tensorboard" not in best
    fixed = {k: best[k] for k in ("data", "model", "img_size", "subset", "recipe", "epochs")}
    assert fixed == {
        "data": "digits",
        "model": "lenet",
        "img_size": 16,
        "subset": 300,
        "recipe": "best",
        "epochs": 2,
    }
    assert {"lr", "batch_size", "optimizer", "weight_decay"} <= set(best)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_trials"] == 2 and summary["config_path"] == str(out / "best.yaml")
    assert (out / "study.journal").exists()

    run = tmp_path / "winner"
    assert main(["train", "--config", str(out / "best.yaml"), "--out", str(run), "--no-progress"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    for key in (
        "lr",
        "weight_decay",
        "optimizer",
        "batch_size",
        "label_smoothing",
        "model",
        "img_size",
        "epochs",
    ):
        assert cfg[key] == best[key], key
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 2


@pytest.mark.parametrize("budget", ["soon", "0s", "-5m", "1.5x"])
def test_cli_rejects_a_bad_budget_in_one_line(budget: str, tmp_path: Path, capsys) -> None:
    assert main(["tune", "--data", "digits", "--budget", budget, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--budget" in err and "Traceback" not in err


def test_cli_needs_a_budget_or_trials(tmp_path: Path, capsys) -> None:
    assert main(["tune", "--data", "digits", "--out", str(tmp_path)]) == 2
    assert "give --budget" in capsys.readouterr().err


def test_help_explains(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    text = capsys.readouterr().out
    assert "--budget" in text and "best.yaml" in text and "resumes" in text and "--ray-address" in text


def test_budget_units() -> None:
    from imgclf.commands.tune import parse_budget

    assert [parse_budget(s) for s in ("90s", "30m", "1.5h", "3600", "2min")] == [90, 1800, 5400, 3600, 120]


def test_ray_tune_local(tmp_path: Path) -> None:
    """The same objective on Ray Tune (OptunaSearch + ASHAScheduler); about 35 s, most of it Ray's start."""
    pytest.importorskip("ray.tune", reason="Ray not installed (pip install 'imgclf[ray]')")
    given = {**GIVEN, "subset": 300}
    res = T.tune(
        given, budget_s=120, out=tmp_path, trials=2, max_epochs=2, ray_address="local", ray_cpus_per_trial=1
    )
    assert res.n_trials == 2 and res.n_failed == 0 and res.config_path == tmp_path / "best.yaml"
    assert sorted(r.number for r in res.rows) == [0, 1]
    for r in res.rows:
        assert (Path(r.run_dir) / "config.json").exists() and {"lr", "batch_size"} <= set(r.params)
        assert r.state == "complete" if r.epochs_run == 2 else r.state == "pruned"
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["lr"] == T.best_row(res.rows).params["lr"] and best["epochs"] == 2


def test_first_trial_starts_from_the_auto_recipes_choice(fake, tmp_path: Path) -> None:
    fake(lambda n, e: 0.5)
    given = {"data": "digits", "recipe": "best", "img_size": 16}
    r = T.tune(given, budget_s=600, out=tmp_path, trials=2, max_epochs=2, pruner="none")
    first, second = r.rows[0].params, r.rows[1].params
    assert first["model"] == T.SEARCH_MODELS["grey"][0] and first["optimizer"] == "adamw"
    assert first["lr"] == T.START["lr"] and first["batch_size"] == T.START["batch_size"]
    assert second != first  # then the sampler draws
    assert T.start_point({"img_size": T.Dim("size", choices=(32, 48))}) == {}  # 64 not offered
