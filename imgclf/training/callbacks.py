"""Keras-style training callbacks on one small protocol.

The :class:`~imgclf.training.trainer.Trainer` calls every hook of every callback in list order:

- ``on_train_begin(trainer)`` once, after the data, model and optimizer exist (and a resumed
  run has restored its state);
- ``on_epoch_begin(trainer, epoch)``;
- ``on_loss(trainer, batch, loss)`` with each batch's loss *before* the update: a callback may
  call ``trainer.stop(reason, failed=True)`` to skip the update and end training (TerminateOnNaN);
- ``on_batch_end(trainer, batch, logs)`` after the update (``logs``: ``loss``, ``lr``);
- ``on_epoch_end(trainer, epoch, logs)`` with the epoch's row (``epoch``, ``train_loss``,
  ``train_acc``, ``val_loss``, ``val_acc``, ``lr``, ``time_s``); ``trainer.stop(reason)`` ends
  training after this epoch (EarlyStopping);
- ``on_train_end(trainer, logs)`` once, after the final weights are chosen and before the bundle
  is written.

A callback's ``state_dict()`` is saved in every checkpoint under its ``key`` and handed back to
``load_state_dict`` on resume, so counters such as EarlyStopping's survive a kill.
:func:`default_callbacks` builds the ones a :class:`TrainConfig` asks for; a Python user adds
their own with ``imgclf.train(..., callbacks=[...])``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from imgclf.core.files import atomic_write_bytes

if TYPE_CHECKING:  # annotations only
    from imgclf.training.config import TrainConfig

log = logging.getLogger("imgclf")


class Trainer(Protocol):
    """What callbacks read and call of :class:`imgclf.training.trainer.Trainer` (a protocol, not
    an import, because the trainer module imports this one)."""

    cfg: TrainConfig
    run_dir: Path
    best_path: Path
    state: Any  # TrainState: epoch, step, lr_scale, stop_reason, history
    dist: Any  # the process group view: is_main, world_size, all_reduce_sum

    @property
    def history(self) -> list[dict[str, float]]: ...

    @property
    def has_val(self) -> bool: ...

    def monitor(self, logs: dict[str, float]) -> float: ...

    def stop(self, reason: str, *, failed: bool = False) -> None: ...

    def save_weights(self, path: Path) -> None: ...


# The improvement that counts for EarlyStopping and ReduceLROnPlateau (Keras' min_delta).
MIN_DELTA = 1e-4


class Callback:
    """Base class: every hook does nothing. Subclass and override the hooks you need."""

    @property
    def key(self) -> str:
        """Name of this callback's state in checkpoints (unique per callback in a run)."""
        return type(self).__name__

    def on_train_begin(self, trainer: Trainer) -> None:
        pass

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        pass

    def on_loss(self, trainer: Trainer, batch: int, loss: float) -> None:
        pass

    def on_batch_end(self, trainer: Trainer, batch: int, logs: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        pass

    def on_train_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state restored on resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TerminateOnNaN(Callback):
    """Stop before a non-finite loss touches the weights; the last good checkpoint is kept."""

    def on_loss(self, trainer: Trainer, batch: int, loss: float) -> None:
        bad = not math.isfinite(loss)
        if trainer.dist.world_size > 1:  # every rank must stop at the same step, or the others hang
            bad = trainer.dist.all_reduce_sum([float(bad)])[0] > 0
        if bad:
            trainer.stop(
                f"loss became {loss} at epoch {trainer.state.epoch + 1}, batch {batch}: training "
                f"diverged. Lower --lr (now {trainer.cfg.lr}) or check the data; the last good "
                "checkpoint is kept.",
                failed=True,
            )
            log.error("TerminateOnNaN: %s", trainer.state.stop_reason)


class EpochLogger(Callback):
    """One log line per epoch (train.log and stderr)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        has_val = trainer.has_val
        val_part = f"  val_loss {logs['val_loss']:.4f}  val_acc {logs['val_acc']:.4f}" if has_val else ""
        log.info(
            "epoch %d/%d  loss %.4f  acc %.4f%s  lr %.2e  %.1fs (%.0f img/s)",
            epoch,
            trainer.cfg.epochs,
            logs["train_loss"],
            logs["train_acc"],
            val_part,
            logs["lr"],
            logs["time_s"],
            logs.get("seen", 0) / max(logs["time_s"], 1e-9),
        )


class ModelCheckpoint(Callback):
    """``checkpoints/best.safetensors``: the evaluated weights at the lowest monitored loss.

    The monitored value is the validation loss, or the training loss without a validation split.
    ``checkpoints/last.safetensors`` (the resume point) is written by the Trainer itself.
    """

    def __init__(self) -> None:
        self.best = math.inf
        self.best_epoch = 0

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        value = trainer.monitor(logs)
        if value < self.best:
            self.best, self.best_epoch = value, epoch
            if trainer.dist.is_main:
                trainer.save_weights(trainer.best_path)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs whose monitored loss did not improve by :data:`MIN_DELTA`."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = math.inf
        self.bad_epochs = 0

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        value = trainer.monitor(logs)
        if value < self.best - MIN_DELTA:
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.best = min(self.best, value)
        if self.bad_epochs >= self.patience:
            log.info("EarlyStopping: val loss did not improve for %d epochs", self.patience)
            trainer.stop(f"EarlyStopping after {self.patience} epochs without improvement")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement."""

    def __init__(self, patience: int, factor: float) -> None:
        self.patience, self.factor = patience, factor
        self.best = math.inf
        self.bad = 0

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        value = trainer.monitor(logs)
        if value < self.best - MIN_DELTA:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            trainer.state.lr_scale *= self.factor
            self.bad = 0
            log.info("ReduceLROnPlateau: lr scaled by %g", trainer.state.lr_scale)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad = float(state["best"]), int(state["bad"])


class CSVLogger(Callback):
    """``history.csv``: one row per epoch, rewritten atomically so a kill never leaves half a file."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        if not trainer.dist.is_main or not trainer.history:
            return
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=list(trainer.history[0].keys()), extrasaction="ignore")
        w.writeheader()
        w.writerows(trainer.history)
        atomic_write_bytes(trainer.run_dir / "history.csv", buf.getvalue().encode())


class TensorBoard(Callback):
    """TensorBoard scalars per epoch in ``run_dir/tensorboard`` (skipped with a warning if missing)."""

    def __init__(self) -> None:
        self.writer: Any = None

    def on_train_begin(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard not installed: no TensorBoard logs (pip install tensorboard)")
            return
        self.writer = SummaryWriter(str(trainer.run_dir / "tensorboard"))

    def on_epoch_end(self, trainer: Trainer, epoch: int, logs: dict[str, float]) -> None:
        if self.writer is None:
            return
        keys = (
            ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
            if trainer.has_val
            else ("train_loss", "train_acc", "lr")
        )
        for k in keys:
            self.writer.add_scalar(k.replace("_", "/", 1) if "_" in k else k, logs[k], epoch)
        self.writer.flush()

    def on_train_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def default_callbacks(cfg: TrainConfig) -> list[Callback]:
    """The callbacks ``cfg`` asks for, in the order they run at each epoch's end."""
    cbs: list[Callback] = [TerminateOnNaN(), EpochLogger()]
    if cfg.tensorboard:
        cbs.append(TensorBoard())
    cbs.append(ModelCheckpoint())
    if cfg.patience:
        cbs.append(EarlyStopping(cfg.patience))
    if cfg.reduce_lr_patience:
        cbs.append(ReduceLROnPlateau(cfg.reduce_lr_patience, cfg.reduce_lr_factor))
    cbs.append(CSVLogger())
    return cbs
