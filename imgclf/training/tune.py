"""Budgeted hyperparameter search: :func:`tune` runs trials of :func:`imgclf.training.api.train`
and writes the winner as a config file that ``imgclf train --config`` takes.

In this process the search is an Optuna study (TPE sampler, ASHA pruner) kept in a journal file
under ``out/``, so the same call again resumes it: finished trials are kept and only the rest of
the budget is spent. With ``ray_address`` the same objective runs on Ray Tune (``OptunaSearch``
with ``ASHAScheduler``), on this machine or a cluster. Either way each trial reports its
validation accuracy after every epoch through a Trainer callback (:class:`TrialReporter`), which
also stops the trial when the pruner or the budget says so. A trial that raises is recorded as
failed and the search goes on.

What is searched is declared once in :data:`SPACE`; keys the user gives are fixed and not
searched, keys neither searched nor given are left to the recipe.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.core.errors import ConfigError, TrainingError
from imgclf.core.files import atomic_write_bytes
from imgclf.training.api import train
from imgclf.training.callbacks import Callback
from imgclf.training.config import DEFAULT_RECIPE
from imgclf.training.recipes import config_from

if TYPE_CHECKING:
    import optuna

    from imgclf.training.trainer import Trainer

log = logging.getLogger("imgclf")


@dataclass(frozen=True)
class Dim:
    """One searched key: a float range (``log`` for a log-uniform draw) or a list of choices.

    ``choices`` may be a mapping from the data's kind (``colour`` or ``grey``) to the choices for it.
    """

    help: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | dict[str, tuple[Any, ...]] = ()


# The models a search tries when --model is not given: the fast architectures that suit each kind
# of data (photos in folders; greyscale built-ins such as digits and MNIST).
SEARCH_MODELS: dict[str, tuple[str, ...]] = {
    "colour": ("resnet10s", "smallervggnet", "simplecnn", "resnet20"),
    "grey": ("lenet", "minivgg", "resnet20"),
}
# Square input sides tried when --img-size is not given; small ones first: they train fastest.
SEARCH_SIZES: dict[str, tuple[int, ...]] = {"colour": (32, 48, 64, 96), "grey": (16, 28, 32)}

# The search space, declared once (docs/TUNE.md lists it). Keys are TrainConfig keys.
SPACE: dict[str, Dim] = {
    "lr": Dim("initial learning rate", 1e-4, 3e-2, log=True),
    "weight_decay": Dim("weight decay", 1e-5, 0.1, log=True),
    "optimizer": Dim("optimizer", choices=("adamw", "sgd")),
    "label_smoothing": Dim("label smoothing", 0.0, 0.2),
    "batch_size": Dim("images per step", choices=(16, 32, 64)),
    "rotation": Dim("augmentation: max rotation (degrees)", 0.0, 25.0),
    "shift": Dim("augmentation: max shift (fraction)", 0.0, 0.2),
    "zoom": Dim("augmentation: zoom range", 0.0, 0.3),
    "flip": Dim(
        "horizontal flip (not searched for greyscale built-ins: a mirrored digit is no digit)",
        choices=("on", "off"),
    ),
    "model": Dim("architecture", choices=SEARCH_MODELS),
    "img_size": Dim("input side in pixels", choices=SEARCH_SIZES),
}
AUGMENT_KEYS = ("rotation", "shift", "zoom", "flip")
MAX_EPOCHS = 30  # epochs of a trial that no rung of the pruner stops
MAX_FAILED_IN_A_ROW = 5  # so many crashes in a row mean the fixed keys are broken, not a trial
TRIAL_ONLY = {"tensorboard": False}  # what every trial sets and best.yaml leaves out
STUDY_NAME = "imgclf-tune"
JOURNAL = "study.journal"


@dataclass
class TrialRow:
    """One finished trial as trials.csv and the table show it."""

    number: int
    state: str  # complete | pruned | failed
    value: float | None  # validation accuracy (a pruned trial: at its last report)
    val_loss: float | None
    epochs_run: int
    seconds: float
    params: dict[str, Any]
    note: str = ""  # why it was pruned or how it failed (one line)
    run_dir: str = ""


@dataclass
class TuneResult:
    """What :func:`tune` found and where it wrote it."""

    best_config: dict[str, Any]
    best_value: float | None
    best_trial_dir: Path | None
    config_path: Path | None
    n_trials: int
    n_pruned: int
    n_failed: int
    summary_path: Path
    study_path: Path
    trials_csv: Path
    spent_s: float
    rows: list[TrialRow] = field(default_factory=list)


# ----------------------------------------------------------------------------- the space


def data_kind(data: str) -> str:
    """``grey`` for greyscale built-ins and IDX folders, else ``colour`` (image folders load as RGB)."""
    from imgclf.training.recipes import GREY_BUILTINS, dataset_key

    return "grey" if dataset_key(data) in GREY_BUILTINS else "colour"


def search_space(given: dict[str, Any], space: dict[str, Dim] | None = None) -> dict[str, Dim]:
    """The dimensions searched for ``given``: :data:`SPACE` (or ``space``) less the keys the user fixed,
    with data-dependent choices resolved."""
    kind = data_kind(str(given.get("data", "digits")))
    out: dict[str, Dim] = {}
    for name, dim in (SPACE if space is None else space).items():
        if name in given:
            continue
        if name in AUGMENT_KEYS and given.get("augment") == "off":
            continue  # strengths of an augmentation that is off change nothing
        if name == "flip" and kind == "grey" and space is None:
            continue
        if isinstance(dim.choices, dict):
            dim = Dim(dim.help, dim.low, dim.high, dim.log, tuple(dim.choices[kind]))
        out[name] = dim
    return out


# The search's first trial where these keys are searched (the auto recipe's fixed values; the
# first model of SEARCH_MODELS is the auto recipe's).
START: dict[str, Any] = {
    "optimizer": "adamw",
    "lr": 2e-3,
    "weight_decay": 0.05,
    "label_smoothing": 0.1,
    "batch_size": 32,
    "img_size": 64,
}


def start_point(space: dict[str, Dim]) -> dict[str, Any]:
    """Values of :data:`START` (and the first model) that lie in ``space``, for the first trial."""
    point: dict[str, Any] = {}
    for name, dim in space.items():
        value = dim.choices[0] if name == "model" and dim.choices else START.get(name)
        if value is None:
            continue
        if dim.choices and value not in dim.choices:
            continue
        if not dim.choices and not (
            dim.low is not None and dim.high is not None and dim.low <= value <= dim.high
        ):
            continue
        point[name] = value
    return point


def suggest(trial: optuna.Trial, space: dict[str, Dim]) -> dict[str, Any]:
    """Draw one value per dimension from an Optuna trial (also Ray's define-by-run space)."""
    params: dict[str, Any] = {}
    for name, dim in space.items():
        if dim.choices:
            params[name] = trial.suggest_categorical(name, list(dim.choices))
        else:
            assert dim.low is not None and dim.high is not None
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    return params


def fixed_keys(given: dict[str, Any], space: dict[str, Dim], max_epochs: int) -> dict[str, Any]:
    """The keys every trial shares: the user's, the recipe, the epochs and ``augment`` when searched."""
    fixed = {k: v for k, v in given.items() if k != "out"}
    fixed["recipe"] = given.get("recipe", DEFAULT_RECIPE)
    fixed.setdefault("epochs", max_epochs)
    if any(k in space for k in AUGMENT_KEYS) and "augment" not in given:
        fixed["augment"] = "on"  # otherwise the searched strengths are ignored on built-ins
    return fixed


# ----------------------------------------------------------------------------- the callback


class _WarningsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


_QUIET = _WarningsOnly()


class TrialReporter(Callback):
    """Reports each epoch's validation accuracy and stops the trial when told to.

    ``report(epoch, val_acc, logs)`` hands the value to the search (Optuna's ``trial.report``,
    or ``ray.tune.report``) and returns a reason to stop (pruned) or ``None``. The trial also stops
    after the epoch in which ``deadline`` (a ``time.monotonic()`` value) passes. With ``quiet`` the
    trial's INFO lines go to its train.log only, not to stderr.
    """

    def __init__(
        self,
        report: Callable[[int, float, dict[str, float]], str | None],
        *,
        planned_epochs: int,
        deadline: float | None = None,
        quiet: bool = True,
    ) -> None:
        self.report = report
        self.planned_epochs = planned_epochs
        self.deadline = deadline
        self.quiet = quiet
        self.pruned = False
        self.out_of_time = False
        self.stop_reason = ""
        self.epochs = 0
        self.last: dict[str, float] = {}

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.quiet:
            _quiet_stderr()  # the Trainer adds its stderr handler in its first run

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        self.epochs = epoch
        self.last = {"val_acc": float(logs["val_acc"]), "val_loss": float(logs["val_loss"])}
        # The built-in callbacks ran first: EarlyStopping may have ended the run at this epoch.
        state = getattr(trainer, "state", None)
        final = epoch >= self.planned_epochs or bool(getattr(state, "stop_training", False))
        reason = self.report(epoch, float(logs["val_acc"]), {**logs, "final": final})
        if reason:
            self.pruned, self.stop_reason = True, reason
            trainer.stop(reason)
        elif self.deadline is not None and time.monotonic() >= self.deadline and epoch < self.planned_epochs:
            self.out_of_time, self.stop_reason = True, f"search budget spent after epoch {epoch}"
            trainer.stop(self.stop_reason)


def _quiet_stderr() -> None:
    """Warnings only on the imgclf logger's stream handlers (its train.log files keep everything)."""
    from imgclf.training import trainer

    logger = logging.getLogger("imgclf")
    # The Trainer adds its stderr handler at the start of its first run, before any callback
    # runs; adding that handler here first lets the filter hide the first trial's set-up lines too.
    stderr_cls = getattr(trainer, "_CurrentStderr", None)
    if stderr_cls is not None and not any(isinstance(h, stderr_cls) for h in logger.handlers):
        sh = stderr_cls()
        sh.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(sh)
    for h in logger.handlers:
        if not isinstance(h, logging.FileHandler):
            h.addFilter(_QUIET)


@contextlib.contextmanager
def _quiet_search() -> Iterator[None]:
    """Optuna's per-trial INFO lines off; the trainers' stderr filter removed afterwards."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)
        for h in logging.getLogger("imgclf").handlers:
            h.removeFilter(_QUIET)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_trial(
    fixed: dict[str, Any], params: dict[str, Any], run_dir: Path, reporter: TrialReporter
) -> dict[str, Any]:
    """Train one trial into ``run_dir``; returns its metrics (raises what training raises)."""
    cfg = config_from({**fixed, **params, **TRIAL_ONLY, "out": str(run_dir)})
    if reporter.quiet:
        _quiet_stderr()
    return train(cfg, progress=False, callbacks=[reporter]).metrics


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # a trial that ran out of GPU memory must not starve the next
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


# ----------------------------------------------------------------------------- the search


def _require_optuna() -> Any:
    try:
        import optuna
    except ImportError as e:
        raise TrainingError(f"imgclf tune needs Optuna ({e}): pip install 'optuna>=4.0'") from None
    return optuna


def _jsonable(d: dict[str, Any]) -> Any:
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def _make_pruner(optuna: Any, pruner: str, min_epochs: int, max_epochs: int) -> Any:
    if pruner == "asha":
        # Rungs at min_epochs * 3**k epochs; a trial goes on only when it is in the top third there.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=3)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_epochs, max_resource=max_epochs, reduction_factor=3
        )
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"pruner {pruner!r}: use asha, hyperband or none")


def _row(t: Any) -> TrialRow:
    """A TrialRow from an Optuna FrozenTrial (its user attrs hold what training measured)."""
    state = {"COMPLETE": "complete", "PRUNED": "pruned"}.get(t.state.name, "failed")
    ua = t.user_attrs
    value = t.value if t.value is not None and math.isfinite(t.value) else None
    return TrialRow(
        number=t.number,
        state=state,
        value=value,
        val_loss=ua.get("val_loss"),
        epochs_run=int(ua.get("epochs_run", 0)),
        seconds=float(ua.get("seconds", 0.0)),
        params=dict(t.params),
        note=str(ua.get("note", "" if state != "failed" else "interrupted: the search stopped during it")),
        run_dir=str(ua.get("run_dir", "")),
    )


def _open_study(optuna: Any, out: Path, fixed: dict[str, Any], space: dict[str, Dim], pruner: Any) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / JOURNAL)))
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=storage, direction="maximize", pruner=pruner, load_if_exists=True
    )
    setup = {"fixed": _jsonable(fixed), "space": sorted(space)}
    if "setup" not in study.user_attrs:
        study.set_user_attr("setup", setup)
        study.set_user_attr("spent_s", 0.0)
    elif study.user_attrs["setup"] != setup:
        was = study.user_attrs["setup"]
        keys = sorted(set(was["fixed"]) | set(setup["fixed"]))
        diff = [
            f"{k}: {was['fixed'].get(k, '(not set)')} -> {setup['fixed'].get(k, '(not set)')}"
            for k in keys
            if was["fixed"].get(k) != setup["fixed"].get(k)
        ]
        if was["space"] != setup["space"]:
            diff.append(f"searched: {','.join(was['space'])} -> {','.join(setup['space'])}")
        raise ConfigError(
            f"{out} holds a search with other fixed keys ({'; '.join(diff)}); resume it with the same "
            "options, or choose another --out"
        )
    # A trial left RUNNING was cut off by a kill: it is over, not resumable (its row says so).
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    # Seeded from the user's seed and the trials so far, so a resumed search draws new points
    # instead of repeating the first session's.
    study.sampler = optuna.samplers.TPESampler(
        seed=int(fixed.get("seed", 42)) + len(study.trials), n_startup_trials=5
    )
    return study


def tune(
    given: dict[str, Any],
    *,
    budget_s: float,
    out: str | Path,
    trials: int | None = None,
    max_epochs: int = MAX_EPOCHS,
    min_epochs: int | None = None,
    pruner: str = "asha",
    ray_address: str | None = None,
    ray_cpus_per_trial: int = 2,
    progress: bool = False,
    quiet: bool = True,
    space: dict[str, Dim] | None = None,
) -> TuneResult:
    """Search hyperparameters for ``given`` (the fixed keys) within ``budget_s`` seconds of search.

    ``budget_s`` and ``trials`` count the whole search in ``out``: calling again with the same
    arguments resumes it and spends only what is left (raise them to search more). Writes
    ``out/best.yaml`` (for ``imgclf train --config``), ``out/trials.csv``, ``out/summary.json``,
    and every trial's run folder under ``out/trials/``.

    Each trial trains ``max_epochs`` (or ``given["epochs"]``) unless ``pruner`` (``asha``,
    ``hyperband`` or ``none``) stops it at a rung (``min_epochs`` x 3**k; default a tenth of a
    trial). ``ray_address`` (``local``, ``auto``, ``ray://HOST:10001``) runs the trials on Ray Tune
    with ``ray_cpus_per_trial`` CPUs each. ``space`` replaces :data:`SPACE`. ``progress`` prints a
    line per finished trial and the final table; ``quiet`` keeps the trials' own log lines out of
    stderr (their train.log has them). Raises :class:`TrainingError` when no trial gave a value.
    """
    given = {k: v for k, v in given.items() if k != "out"}
    given.setdefault("data", "digits")
    out = Path(out)
    dims = search_space(given, space)
    fixed, min_epochs = _checked_setup(given, dims, out, budget_s, trials, max_epochs, min_epochs)
    out.mkdir(parents=True, exist_ok=True)
    if ray_address:
        with _quiet_search():
            rows, spent = _ray_search(
                fixed,
                dims,
                out,
                budget_s,
                trials,
                int(fixed["epochs"]),
                min_epochs,
                ray_address,
                ray_cpus_per_trial,
                quiet,
            )
        return _checked(_finish(rows, fixed, out, budget_s, spent, progress, study_path=out / "ray"))
    result = _optuna_search(fixed, dims, out, budget_s, trials, min_epochs, pruner, progress, quiet)
    if progress:
        print_table(result)
    return _checked(result)


def _checked_setup(
    given: dict[str, Any],
    dims: dict[str, Dim],
    out: Path,
    budget_s: float,
    trials: int | None,
    max_epochs: int,
    min_epochs: int | None,
) -> tuple[dict[str, Any], int]:
    """Every argument and fixed key checked once, before any trial: returns the fixed keys of a
    trial and the first rung (``min_epochs``, default a tenth of a trial)."""
    if not budget_s > 0:
        raise ConfigError(f"budget {budget_s!r}: give a positive number of seconds")
    if trials is not None and trials < 1:
        raise ConfigError(f"trials={trials}: give at least 1")
    planned = int(given.get("epochs", max_epochs))  # epochs the user fixed are kept
    if min_epochs is None:
        # First rung at a tenth of a full trial: epoch-1 accuracies (mid warm-up) rank trials poorly.
        min_epochs = max(1, planned // 10)
    if planned < 1 or not 1 <= min_epochs <= planned:
        raise ConfigError(f"epochs: need 1 <= min_epochs ({min_epochs}) <= epochs of a trial ({planned})")
    if given.get("ray_workers"):
        raise ConfigError(
            "tune trains each trial in one process: leave out ray_workers (use --ray-address to spread "
            "trials over a Ray cluster)"
        )
    fixed = fixed_keys(given, dims, max_epochs)
    cfg = config_from({**fixed, "out": str(out / "trials" / "check")})
    if cfg.val_split <= 0:
        raise ConfigError("tune compares trials by validation accuracy: val_split must be above 0")
    from imgclf.data.sources import index_source

    # a missing folder or a bad labels file fails here, once
    index_source(cfg.data, cfg.cache_dir, multi_label=cfg.multi_label, label_sep=cfg.label_sep)
    return fixed, min_epochs


def _optuna_search(
    fixed: dict[str, Any],
    dims: dict[str, Dim],
    out: Path,
    budget_s: float,
    trials: int | None,
    min_epochs: int,
    pruner: str,
    progress: bool,
    quiet: bool,
) -> TuneResult:
    """The search on one machine: an Optuna study journaled in ``out`` (so it resumes)."""
    optuna = _require_optuna()
    with _quiet_search():
        pruner_obj = _make_pruner(optuna, pruner, min_epochs, int(fixed["epochs"]))
        study = _open_study(optuna, out, fixed, dims, pruner_obj)
        if not study.trials:
            # Trial 0 is the auto recipe's kind of choice, so a short budget starts from a good,
            # cheap point (a random first draw was resnet20 at 96 px: one trial in 30 minutes).
            study.enqueue_trial(start_point(dims))
        spent = float(study.user_attrs.get("spent_s", 0.0))
        if progress and spent >= budget_s:
            print(f"{out}: the budget ({budget_s:.0f}s) is spent already; raise --budget to search more")
        try:
            _optuna_loop(optuna, study, fixed, dims, out, budget_s, trials, progress, quiet)
        finally:
            # Also after Ctrl-C or a broken setup: what was found so far is written.
            rows = [_row(t) for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
            spent = float(study.user_attrs.get("spent_s", 0.0))
            result = _finish(rows, fixed, out, budget_s, spent, False, study_path=out / JOURNAL)
    return result


def _checked(result: TuneResult) -> TuneResult:
    if result.config_path is None:
        first = next((r.note for r in result.rows if r.note), "no trial ran")
        raise TrainingError(
            f"no trial gave a validation accuracy ({result.n_failed} failed; first: {first}); "
            f"see {result.trials_csv}"
        )
    return result


def _optuna_loop(
    optuna: Any,
    study: Any,
    fixed: dict[str, Any],
    space: dict[str, Dim],
    out: Path,
    budget_s: float,
    trials: int | None,
    progress: bool,
    quiet: bool,
) -> None:
    TS = optuna.trial.TrialState
    spent0 = float(study.user_attrs.get("spent_s", 0.0))
    t_session = time.monotonic()

    def spent() -> float:
        return spent0 + time.monotonic() - t_session

    failed_in_a_row = 0
    planned = int(fixed["epochs"])
    while True:
        n_done = len(study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED, TS.FAIL)))
        if trials is not None and n_done >= trials:
            break
        if spent() >= budget_s:
            break
        trial = study.ask()
        params = suggest(trial, space)
        run_dir = out / "trials" / f"{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))

        def report(epoch: int, value: float, logs: dict[str, float], trial: Any = trial) -> str | None:
            trial.report(value, epoch)
            study.set_user_attr("spent_s", spent())  # a kill loses at most one epoch of the budget
            if trial.should_prune():
                return f"pruned at epoch {epoch}"
            return None

        reporter = TrialReporter(
            report, planned_epochs=planned, deadline=time.monotonic() + budget_s - spent(), quiet=quiet
        )
        t0 = time.monotonic()
        state, value, note = TS.FAIL, None, ""
        metrics: dict[str, Any] = {}
        try:
            metrics = run_trial(fixed, params, run_dir, reporter)
        except KeyboardInterrupt:
            note = "interrupted (Ctrl-C)"
            raise
        except Exception as e:  # noqa: BLE001 - any crash of one trial is its result, not the search's
            note = _one_line(e)
            log.warning("trial %d failed: %s", trial.number, note)
            _free_memory()
        else:
            if metrics.get("stop_reason"):  # TerminateOnNaN ended it: a diverged trial is a failed one
                note = str(metrics["stop_reason"]).splitlines()[0][:300]
            elif reporter.pruned or reporter.out_of_time:
                state, note = TS.PRUNED, reporter.stop_reason
            else:
                state, value = (
                    TS.COMPLETE,
                    float(metrics.get("val_accuracy", reporter.last.get("val_acc", 0))),
                )
                if not math.isfinite(value):
                    state, value, note = TS.FAIL, None, "validation accuracy is not a number"
        finally:
            trial.set_user_attr("seconds", round(time.monotonic() - t0, 2))
            trial.set_user_attr("epochs_run", int(metrics.get("epochs_run", reporter.epochs)))
            val_loss = metrics.get("val_loss", reporter.last.get("val_loss"))
            if val_loss is not None and math.isfinite(val_loss):
                trial.set_user_attr("val_loss", float(val_loss))
            if note:
                trial.set_user_attr("note", note)
            study.tell(trial, value if state == TS.COMPLETE else None, state=state)
            study.set_user_attr("spent_s", spent())
        failed_in_a_row = failed_in_a_row + 1 if state == TS.FAIL else 0
        if progress:
            print(trial_line(_row(study.get_trials(deepcopy=False)[trial.number])), flush=True)
        if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
            raise TrainingError(
                f"{failed_in_a_row} trials in a row failed, the last with: {note}. Check the fixed keys "
                f"(see {run_dir / 'train.log'}); the search in {out} can be resumed after the fix"
            )


# ----------------------------------------------------------------------------- Ray Tune


def _ray_objective(config: dict[str, Any], fixed: dict[str, Any], trials_dir: str, quiet: bool) -> None:
    """One Ray Tune trial (runs in a Ray worker): the same training and callback as the Optuna path."""
    from ray import tune as rtune

    trial_id = rtune.get_context().get_trial_id()

    def report(epoch: int, value: float, logs: dict[str, float]) -> str | None:
        # ASHAScheduler stops this trial from outside when it is pruned; Ray ends the time budget.
        rtune.report(
            {"val_acc": value, "val_loss": float(logs["val_loss"]), "epoch": epoch, "finished": logs["final"]}
        )
        return None

    reporter = TrialReporter(report, planned_epochs=int(fixed["epochs"]), quiet=quiet)
    metrics = run_trial(fixed, config, Path(trials_dir) / str(trial_id), reporter)
    if metrics.get("stop_reason"):
        raise TrainingError(str(metrics["stop_reason"]).splitlines()[0])


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"  # Ray's default names hold every parameter and overflow paths


class _DefineByRun:
    """:func:`suggest` as OptunaSearch's define-by-run space (a class: Ray saves its searcher's state)."""

    def __init__(self, space: dict[str, Dim]) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> None:
        suggest(trial, self.space)


def _ray_search(
    fixed: dict[str, Any],
    space: dict[str, Dim],
    out: Path,
    budget_s: float,
    trials: int | None,
    max_epochs: int,
    min_epochs: int,
    address: str,
    cpus_per_trial: int,
    quiet: bool,
) -> tuple[list[TrialRow], float]:
    """The search on Ray Tune; results under ``out/ray``, resumed from there when it exists."""
    from imgclf.training.distributed import init_ray, require_ray

    ray = require_ray()
    optuna = _require_optuna()
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    out = out.resolve()  # Ray workers run in their own folders
    fixed = dict(fixed)
    if Path(str(fixed["data"])).exists():
        fixed["data"] = str(Path(str(fixed["data"])).resolve())
    trial_fixed = {**fixed, "threads": fixed.get("threads", cpus_per_trial)}
    gpu = 1 if str(fixed.get("device", "cpu")).startswith("cuda") else 0
    trainable = rtune.with_resources(
        rtune.with_parameters(_ray_objective, fixed=trial_fixed, trials_dir=str(out / "trials"), quiet=quiet),
        {"cpu": cpus_per_trial, "gpu": gpu},
    )
    started = init_ray(None if address == "local" else address)
    t0 = time.monotonic()
    try:
        exp = out / "ray"
        if rtune.Tuner.can_restore(str(exp)):
            tuner = rtune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=False)
        else:
            searcher = OptunaSearch(
                space=_DefineByRun(space),
                metric="val_acc",
                mode="max",
                sampler=optuna.samplers.TPESampler(seed=int(fixed.get("seed", 42)), n_startup_trials=5),
            )
            tuner = rtune.Tuner(
                trainable,
                tune_config=rtune.TuneConfig(
                    metric="val_acc",
                    mode="max",
                    search_alg=searcher,
                    scheduler=ASHAScheduler(max_t=max_epochs, grace_period=min_epochs, reduction_factor=3),
                    num_samples=trials or -1,
                    time_budget_s=budget_s,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=rtune.RunConfig(name="ray", storage_path=str(out), verbose=0 if quiet else 1),
            )
        grid = tuner.fit()
        rows = [_ray_row(i, r, space, out) for i, r in enumerate(grid)]
        return rows, time.monotonic() - t0
    finally:
        if started:
            ray.shutdown()


def _ray_row(i: int, r: Any, space: dict[str, Dim], out: Path) -> TrialRow:
    """One Ray Tune result as a trial row (``i``: its place in the result grid)."""
    m = r.metrics or {}
    epochs = int(m.get("training_iteration", 0))
    if r.error is not None:
        state, note = "failed", _one_line(r.error)
    elif m.get("finished"):
        state, note = "complete", ""
    else:
        state, note = "pruned", f"stopped by ASHA or the budget at epoch {epochs}"
    val = m.get("val_acc")
    tag = str(m.get("experiment_tag", ""))  # "3_lr=...": Ray's 1-based trial sequence
    return TrialRow(
        number=int(tag.split("_")[0]) - 1 if tag.split("_")[0].isdigit() else 10_000 + i,
        state=state,
        value=float(val) if val is not None and state != "failed" else None,
        val_loss=m.get("val_loss"),
        epochs_run=epochs,
        seconds=round(float(m.get("time_total_s", 0.0)), 2),
        params={k: v for k, v in (r.config or {}).items() if k in space},
        note=note,
        run_dir=str(out / "trials" / str(m.get("trial_id", ""))) if m.get("trial_id") else "",
    )


# ----------------------------------------------------------------------------- outputs


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """Highest validation accuracy among complete trials (ties: lower val loss); else among pruned ones."""
    for state in ("complete", "pruned"):
        cand = [r for r in rows if r.state == state and r.value is not None]
        if cand:
            return max(cand, key=lambda r: (r.value, -(r.val_loss if r.val_loss is not None else math.inf)))
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if v and abs(v) < 0.01 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


_SHORT = {"batch_size": "bs", "optimizer": "opt", "weight_decay": "wd", "label_smoothing": "ls"}


def trial_line(r: TrialRow) -> str:
    """One line for a finished trial: number, state, val acc, key params, seconds."""
    val = f"val {r.value:.4f}" if r.value is not None else "val   -   "
    keys = ("model", "img_size", "lr", "batch_size", "optimizer")
    ps = " ".join(f"{_SHORT.get(k, k)}={_fmt(r.params[k])}" for k in keys if k in r.params)
    note = f"  ({r.note})" if r.note and r.state != "complete" else ""
    return f"trial {r.number:3d}  {r.state:8s}  {val}  {r.epochs_run:3d} ep  {r.seconds:7.1f}s  {ps}{note}"


def print_table(result: TuneResult, top: int = 10) -> None:
    """The best ``top`` trials, the counts and the file to train from."""
    rows = sorted(
        (r for r in result.rows if r.value is not None),
        key=lambda r: (r.state != "complete", -(r.value or 0)),
    )
    n_complete = result.n_trials - result.n_pruned - result.n_failed
    print(
        f"\n{result.n_trials} trials ({n_complete} complete, {result.n_pruned} pruned, "
        f"{result.n_failed} failed) in {result.spent_s:.0f}s; best {min(top, len(rows))}:"
    )
    for r in rows[:top]:
        print("  " + trial_line(r))
    if result.config_path is not None:
        print(f"best: val accuracy {result.best_value:.4f} -> {result.config_path}")


def _csv_bytes(rows: list[TrialRow]) -> bytes:
    names = sorted({k for r in rows for k in r.params})
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["number", "state", "value", "val_loss", "epochs_run", "seconds", *names, "note", "run_dir"])
    for r in rows:
        w.writerow(
            [
                r.number,
                r.state,
                "" if r.value is None else r.value,
                "" if r.val_loss is None else r.val_loss,
                r.epochs_run,
                r.seconds,
                *(r.params.get(k, "") for k in names),
                r.note,
                r.run_dir,
            ]
        )
    return buf.getvalue().encode()


def _finish(
    rows: list[TrialRow],
    fixed: dict[str, Any],
    out: Path,
    budget_s: float,
    spent_s: float,
    progress: bool,
    *,
    study_path: Path,
) -> TuneResult:
    """Write trials.csv, summary.json and best.yaml (when a trial has a value); print the table."""
    import yaml

    rows = sorted(rows, key=lambda r: r.number)
    atomic_write_bytes(out / "trials.csv", _csv_bytes(rows))
    best = best_row(rows)
    config_path = None
    best_config: dict[str, Any] = {}
    if best is not None:
        best_config = {**fixed, **best.params}
        config_path = out / "best.yaml"
        header = (
            f"# imgclf tune: trial {best.number} of {len(rows)} ({best.state}), val accuracy "
            f"{best.value:.4f} at {best.epochs_run} epochs\n"
            f"# train it: imgclf train --config {config_path} --out runs/best\n"
        )
        atomic_write_bytes(config_path, (header + yaml.safe_dump(best_config, sort_keys=False)).encode())
    n_pruned = sum(r.state == "pruned" for r in rows)
    n_failed = sum(r.state == "failed" for r in rows)
    result = TuneResult(
        best_config=best_config,
        best_value=best.value if best else None,
        best_trial_dir=Path(best.run_dir) if best and best.run_dir else None,
        config_path=config_path,
        n_trials=len(rows),
        n_pruned=n_pruned,
        n_failed=n_failed,
        summary_path=out / "summary.json",
        study_path=study_path,
        trials_csv=out / "trials.csv",
        spent_s=round(spent_s, 1),
        rows=rows,
    )
    summary = {
        "best_trial": best.number if best else None,
        "best_value": result.best_value,
        "best_config": best_config,
        "config_path": str(config_path) if config_path else None,
        "n_trials": len(rows),
        "n_pruned": n_pruned,
        "n_failed": n_failed,
        "budget_s": budget_s if math.isfinite(budget_s) else None,
        "spent_s": result.spent_s,
        "trials": [asdict(r) for r in rows],
    }
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())
    if progress:
        print_table(result)
    return result
