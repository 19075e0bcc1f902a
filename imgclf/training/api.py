"""The training entry points: :func:`train` a config into a run folder, :func:`resume` one.

They choose between this process (:class:`~imgclf.training.trainer.Trainer`) and Ray
(:mod:`imgclf.training.distributed`, imported only when ``ray_workers`` is set).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from imgclf.core.errors import ConfigError, TrainingError
from imgclf.core.files import atomic_write_bytes
from imgclf.training.callbacks import Callback
from imgclf.training.config import TrainConfig
from imgclf.training.trainer import Trainer, TrainResult

log = logging.getLogger("imgclf")

# What a run writes before its first checkpoint: removed when such a run is restarted.
_PARTIAL_OUTPUTS = ("checkpoints", "tensorboard", "history.csv", "splits.json", "skipped_files.txt")


def _has_run(run_dir: Path) -> bool:
    return (run_dir / "model").exists() or (run_dir / "checkpoints" / "last.safetensors").exists()


def _remove_stale(run_dir: Path) -> None:
    """Temporaries of writes interrupted by a kill (``.NAME.*.tmp``, see core.files)."""
    for p in run_dir.rglob(".*.tmp"):
        p.unlink(missing_ok=True)


def train(
    cfg: TrainConfig, *, progress: bool | None = None, callbacks: list[Callback] | None = None
) -> TrainResult:
    """Train ``cfg`` into the run folder ``cfg.out``; refuses to overwrite a run that has a checkpoint.

    A folder left by a run killed before its first checkpoint is reused from scratch.
    """
    cfg = cfg.validate()
    run_dir = Path(cfg.out)
    if _has_run(run_dir):
        raise TrainingError(
            f"{run_dir} already holds a run. Use --resume {run_dir} to continue it, or choose another --out."
        )
    if run_dir.exists():
        _remove_stale(run_dir)
        for name in _PARTIAL_OUTPUTS:
            p = run_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    # First thing on disk: the config as given, so a kill at any later moment leaves a folder that
    # `--resume` can restart (the Trainer replaces it with the resolved config).
    atomic_write_bytes(run_dir / "config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    if cfg.ray_workers:
        if callbacks:
            raise ConfigError("callbacks= runs in this process only; leave out ray_workers to use them")
        from imgclf.training.distributed import train_distributed  # only here: nothing else imports Ray

        return train_distributed(cfg, progress=progress)
    return Trainer(cfg, run_dir, progress=progress, callbacks=callbacks).fit()


def resume(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    progress: bool | None = None,
    callbacks: list[Callback] | None = None,
) -> TrainResult:
    """Continue a run from ``run_dir/checkpoints/last.safetensors``.

    The learning-rate schedule is a function of the config and the step count, so a resumed run
    follows exactly the rates of an uninterrupted one. ``epochs`` raises the planned total: a
    per-step decay (``keras-decay``) continues where it was, while ``cosine`` and ``onecycle``
    are stretched to end at the new total from the current step. A run killed before its first
    checkpoint restarts from its ``config.json``.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise TrainingError(
            f"{run_dir}: no config.json, so nothing to resume (a run killed in its first moment, or not "
            f"an imgclf run folder); start it again with imgclf train --out {run_dir}"
        )
    try:
        cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as e:
        raise TrainingError(f"{cfg_path}: not valid JSON ({e}); start a new run with imgclf train") from None
    if epochs is not None:
        cfg = cfg.replace(epochs=epochs)
    cfg = cfg.replace(out=str(run_dir)).validate()
    _remove_stale(run_dir)
    if not (run_dir / "checkpoints" / "last.safetensors").exists():
        if (run_dir / "model").exists():
            raise TrainingError(f"{run_dir}: the run finished but its checkpoints/last.safetensors is gone")
        log.info("%s: killed before its first checkpoint; starting it again", run_dir)
        return train(cfg, progress=progress, callbacks=callbacks)
    if cfg.ray_workers:
        if callbacks:
            raise ConfigError("callbacks= runs in this process only; leave out ray_workers to use them")
        from imgclf.training.distributed import train_distributed

        return train_distributed(cfg, progress=progress, resuming=True)
    return Trainer(cfg, run_dir, progress=progress, resuming=True, callbacks=callbacks).fit()
