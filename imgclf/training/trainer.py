"""The training loop: data -> model -> callbacks -> checkpoints -> bundle.

One entry, :class:`Trainer` (``imgclf.train`` and :func:`imgclf.training.api.train` wrap it).
Everything it decides comes from a :class:`TrainConfig`; the run folder receives ``model/`` (the
bundle), ``history.csv``, ``metrics.json``, ``plot.png``, ``splits.json``, ``config.json``,
``train.log``, TensorBoard events and checkpoints.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.core.errors import TrainingError
from imgclf.core.files import atomic_write_bytes, display_path, text_bytes
from imgclf.core.preprocess import Preprocess, normalize
from imgclf.data import sources as D
from imgclf.data.augment import Augment, Mix, MixParams
from imgclf.models.registry import create_model, get_spec, logits_to_probs, num_outputs
from imgclf.runtime.bundle import save_bundle
from imgclf.runtime.calibration import MIN_IMAGES as MIN_CALIBRATION_IMAGES
from imgclf.runtime.calibration import expected_calibration_error, fit_calibration
from imgclf.runtime.ood import FeaturesAndLogits, fit_scorer, threshold_for_keep_rate
from imgclf.training.callbacks import Callback, ModelCheckpoint, default_callbacks
from imgclf.training.checkpoint import load_checkpoint, save_checkpoint
from imgclf.training.config import ConfigError, TrainConfig
from imgclf.training.transfer import check_config as check_transfer_config
from imgclf.training.transfer import init_model

if TYPE_CHECKING:
    from imgclf.data.store import StoreArray

log = logging.getLogger("imgclf")


@dataclass
class TrainResult:
    run_dir: Path
    bundle_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


class DistContext:
    """Single-process defaults of the hooks data-parallel training needs (see imgclf.training.distributed).

    Rank ``r`` of ``world_size`` trains on rows ``r::world_size`` of every global batch; only the
    main rank (0) writes to the run folder.
    """

    rank: int = 0
    world_size: int = 1
    resume_from: Path | None = None  # a checkpoint to resume from instead of run_dir/checkpoints

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def broadcast(self, obj: Any) -> Any:
        """``obj`` as rank 0 has it, so that every rank takes the same decisions."""
        return obj

    def end_epoch(self, epoch: int, row: dict[str, float], run_dir: Path) -> None:
        """Called on every rank after rank 0 wrote the epoch's checkpoint and history."""

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on every rank, rank 0 before the others (it builds the shared decoded store)."""
        return fn()

    def epoch_rows(self, x_all: Any, epoch: int, run_dir: Path) -> Any:
        """The training rows epoch ``epoch`` reads through (a debug hook may record or stop there)."""
        return x_all


# --------------------------------------------------------------------------- setup helpers


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted.

    Jupyter and pytest replace ``sys.stderr``; a handler bound to the old object would write
    to a closed stream ("--- Logging error ---") on the next training run in the same process.
    """

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(run_dir: Path) -> logging.Handler:
    log.setLevel(logging.INFO)
    if not any(isinstance(h, _CurrentStderr) for h in log.handlers):
        sh = _CurrentStderr()
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    fh = logging.FileHandler(run_dir / "train.log", errors="backslashreplace")  # non-UTF-8 file names
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    return fh


def resolve_device(name: str) -> torch.device:
    """``cpu`` | ``cuda[:N]`` | ``mps`` | ``auto`` -> a torch device that is present here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}, but this PyTorch sees no CUDA GPU; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device={name!r}, but MPS is not available here; use --device cpu")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively here (AVX512-BF16 or AMX), where autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_defaults(cfg: TrainConfig, index: D.SourceIndex) -> TrainConfig:
    """Fill 'auto' values that depend on the data (model, size, channels, augmentation, splits).

    With ``recipe: auto`` the listing-level decisions of :func:`imgclf.training.auto.plan` come
    first; the flip and the learning rate are decided in :meth:`Trainer.setup` (they need the
    decoded images and the built model).
    """
    from imgclf.training import auto

    if cfg.test_split is None:
        cfg = cfg.replace(test_split=0.2 if index.kind == "digits" else 0.0)
    if auto.auto_keys(cfg):
        p = auto.plan(cfg, index)
        left = [k for k in cfg.extra["auto"] if k in auto.LATE_KEYS and k not in p.values]
        reasons = {**cfg.extra.get("auto_reasons", {}), **p.reasons}
        cfg = cfg.replace(**p.values, extra={**cfg.extra, "auto": left, "auto_reasons": reasons})
    builtin = index.kind in ("idx", "digits")
    grey = index.native_channels == 1
    model = cfg.model or ("lenet" if grey and builtin else "smallervggnet")
    spec = get_spec(model)
    changes: dict[str, Any] = {"model": model}
    if cfg.img_size is None:
        changes["img_size"] = spec.default_size
    if cfg.channels is None:
        changes["channels"] = 1 if grey else 3
    if cfg.augment == "auto":
        changes["augment"] = "off" if builtin else "on"
    if cfg.flip == "auto":
        changes["flip"] = "off" if builtin else "on"
    if cfg.precision == "auto":
        # bf16 autocast only where the CPU computes it natively: there it trained 1.6-2x faster
        # at the same test accuracy (bench/precision.py); emulated bf16 is slower than fp32, and
        # GPU runs keep fp32 until measured.
        on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and resolve_device("auto").type == "cpu")
        changes["precision"] = "bf16" if on_cpu and cpu_has_native_bf16() else "fp32"
    if cfg.lr_decay is None:
        # The tutorials' Adam(lr, decay=lr/epochs); other optimizers keep a constant rate.
        changes["lr_decay"] = cfg.lr / cfg.epochs if cfg.optimizer == "adam" else 0.0
    return cfg.replace(**changes).validate()  # e.g. --mean with one value per resolved channel


def _param_groups(
    model: torch.nn.Module, weight_decay: float, mults: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Parameter groups: decay or not (1-D tensors: BN weights and biases), times each lr multiplier."""
    mults = mults or {}
    groups: dict[tuple[bool, bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # BatchNorm weights and all biases are 1-D: decaying them hurts accuracy.
        key = (p.ndim > 1, name in mults, mults.get(name, 1.0))
        groups.setdefault(key, []).append(p)
    if not groups:
        groups[(True, False, 1.0)] = []
    # Decayed first, then not decayed: the order of checkpoints written before fine-tuning existed.
    order = sorted(groups, key=lambda k: (not k[0], k[1], k[2]))
    return [
        {"params": groups[k], "weight_decay": weight_decay if k[0] else 0.0, "loaded": k[1], "lr_mult": k[2]}
        for k in order
    ]


def layer_lr_mults(model: torch.nn.Module, loaded: set[str], lowest: float) -> dict[str, float]:
    """Multipliers of the loaded parameters: ``lowest`` for the first up to 1 for the last, geometric."""
    names = [n for n, _ in model.named_parameters() if n in loaded]
    last = max(1, len(names) - 1)
    return {n: lowest ** (1 - i / last) for i, n in enumerate(names)}


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, mults: dict[str, float] | None = None
) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay, mults)
    # fused=True: one CPU kernel per parameter instead of ~10 elementwise ops; measured
    # 1.3-2x faster optimizer steps here (bench/train_speed.py), same update rule.
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, fused=True
        )
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(groups, lr=cfg.lr)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}")


def lr_factor(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "keras-decay":
        return 1.0 / (1.0 + (cfg.lr_decay or 0.0) * step)
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "onecycle":
        t = (step - warm) / max(1, total - warm)
        return max(0.0, 1.0 - t)
    return 1.0


# --------------------------------------------------------------------------- checkpoints


# --------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module, images: np.ndarray, pre: Preprocess, batch: int = 256
) -> torch.Tensor:
    """Raw logits of ``model`` on uint8 NHWC arrays, float32 on the CPU."""
    return predict_features(model, images, pre, batch, features=False)[1]


@torch.inference_mode()
def predict_features(
    model: torch.nn.Module, images: np.ndarray, pre: Preprocess, batch: int = 256, features: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(penultimate features or None, raw logits) of ``model`` on uint8 NHWC arrays, on the CPU."""
    model.eval()
    dev = next(model.parameters()).device
    both = FeaturesAndLogits(model) if features else None
    feats, logits = [], []
    for s in range(0, len(images), batch):
        # Slicing per batch: a StoreArray reads just these rows from disk.
        x = normalize(torch.as_tensor(images[s : s + batch]).to(dev), pre)
        f, z = both(x) if both is not None else (None, model(x))
        logits.append(z.float().cpu())
        if f is not None:
            feats.append(f.float().cpu())
    z_all = torch.cat(logits) if logits else torch.zeros(0, 1)
    return (torch.cat(feats) if feats else None), z_all


def correct(pred: torch.Tensor, y: torch.Tensor) -> int:
    """Right answers in a batch: equal labels, or (multi-label) exactly the true label set."""
    if pred.dim() == 2:
        return int((pred == y.bool()).all(dim=1).sum())
    return int((pred == y).sum())


def _truth(d: D.Decoded) -> np.ndarray:
    """What predictions are judged against: (N,) class indices, or (N, L) multi-hot targets."""
    return d.targets if d.targets is not None else d.labels


def evaluate_arrays(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, pre: Preprocess, batch: int = 256
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on uint8 NHWC arrays."""
    if len(labels) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    m = logit_metrics(predict_logits(model, images, pre, batch), labels)
    return {"loss": m["loss"], "accuracy": m["accuracy"]}


def logit_metrics(logits: torch.Tensor, labels: np.ndarray, temperature: float = 1.0) -> dict[str, float]:
    """Loss, accuracy and ECE of logits against integer labels.

    Multi-label ``labels`` ((N, L) multi-hot): binary cross-entropy and exact-match accuracy at 0.5.
    """
    if np.ndim(labels) == 2:
        y = torch.from_numpy(np.asarray(labels, dtype=np.float32))
        return {
            "loss": float(F.binary_cross_entropy_with_logits(logits, y)),
            "accuracy": float(correct(logits > 0, y)) / max(len(y), 1),
        }
    probs = logits_to_probs(logits, temperature).clamp_min(1e-12)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return {
        "loss": float(F.nll_loss(probs.log(), y)),
        "accuracy": float((probs.argmax(1) == y).float().mean()),
        "ece": expected_calibration_error(probs.numpy(), labels),
    }


# --------------------------------------------------------------------------- outputs

# Training images the unknown-image scorer is fitted on, at most (a seeded sample beyond).
MAX_OOD_FIT_IMAGES = 20000
# Forward passes the end-of-training TTA check spends on a split, at most (evenly spaced images beyond).
TTA_CHECK_MAX = 30000
# Unknown-image scores that read the penultimate features (the others read the logits only).
FEATURE_SCORES = ("mahalanobis", "knn")


def write_plot(history: list[dict[str, float]], path: Path, title: str = "") -> None:
    """Training/validation loss and accuracy per epoch, as the tutorials' figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    plt.style.use("ggplot")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train_loss")
    ax[0].plot(ep, [h["val_loss"] for h in history], label="val_loss")
    ax[1].plot(ep, [h["train_acc"] for h in history], label="train_acc")
    ax[1].plot(ep, [h["val_acc"] for h in history], label="val_acc")
    for a, name in zip(ax, ["Loss", "Accuracy"]):
        a.set_xlabel("Epoch #")
        a.set_ylabel(name)
        a.legend(loc="best")
    fig.suptitle(title or "Training loss and accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _EMA:
    """Exponential moving average of weights (and buffers copied as-is)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        import copy

        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            s.lerp_(p, 1 - self.decay)
        for s, b in zip(self.shadow.buffers(), model.buffers()):
            s.copy_(b)


# --------------------------------------------------------------------------- batches

# Prepare batch b+1 (gather, augment, normalise) in a background thread while the model
# trains on batch b. The thread runs torch ops with 1 intra-op thread so compute keeps both
# cores; batches are bit-identical to the plain path (tests/test_speed_paths.py).
# None = auto: only with augmentation. Without it a batch is a gather + one multiply-add
# (~1 % of a step) and the thread hand-off cost more than it hid (bench/train_speed.py).
PREFETCH: bool | None = None


def make_batch(
    x_all: torch.Tensor | StoreArray,
    y_all: torch.Tensor,
    idx: torch.Tensor,
    pre: Preprocess,
    aug: Augment | None,
    gen: torch.Generator | None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC rows ``idx`` -> (augmented, normalised float NCHW channels_last, labels).

    With ``device`` the uint8 rows move there first, so a GPU does the augmentation too;
    random parameters are still drawn from ``gen`` on the CPU (same stream on every device).
    """
    x, y = x_all[idx], y_all[idx]
    if isinstance(x, np.ndarray):  # rows gathered from a StoreArray (streaming)
        x = torch.from_numpy(x)
    if device is not None and device.type != "cpu":
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float()
    if aug is not None:
        x = aug(x, gen)
    return normalize(x.permute(0, 2, 3, 1), pre), y


def make_augment(cfg: TrainConfig) -> Augment | None:
    """The run's augmentation from its config (None when ``augment`` is not on)."""
    if cfg.augment != "on":
        return None
    return Augment(
        cfg.rotation,
        cfg.shift,
        cfg.shear,
        cfg.zoom,
        flip=cfg.flip == "on",
        erase=cfg.erase,
        mode=cfg.aug_interp,
    )


def epoch_batches(
    x_all: torch.Tensor | StoreArray,
    y_all: torch.Tensor,
    perm: torch.Tensor,
    bs: int,
    steps: int,
    pre: Preprocess,
    aug: Augment | None,
    gen: torch.Generator | None,
    rank: int = 0,
    world_size: int = 1,
    prefetch: bool | None = None,
    device: torch.device | None = None,
) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """Yield the ``steps`` training batches of one epoch, in order; ``close()`` it when done.

    ``gen`` is consumed in batch order in both modes, so the random stream (and a resumed
    run) is the same with and without prefetching.
    """

    def make(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = perm[b * bs : (b + 1) * bs][rank::world_size]
        return make_batch(x_all, y_all, idx, pre, aug, gen, device)

    if prefetch is None:
        prefetch = PREFETCH if PREFETCH is not None else aug is not None
    if not prefetch or steps < 2:
        for b in range(steps):
            yield make(b)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(
        1, thread_name_prefix="imgclf-prefetch", initializer=torch.set_num_threads, initargs=(1,)
    ) as ex:
        fut = ex.submit(make, 0)
        for b in range(steps):
            batch = fut.result()
            if b + 1 < steps:
                fut = ex.submit(make, b + 1)
            yield batch


# --------------------------------------------------------------------------- main entry


def prepare_data(
    cfg: TrainConfig, index: D.SourceIndex, pre: Preprocess, progress: bool, world_size: int = 1
) -> PreparedData:
    """Split (duplicate-aware) and decode every split (``world_size`` > 1 Ray ranks: into the store)."""
    groups = None
    report: dict[str, Any] = {}
    usable = np.arange(len(index))
    if index.kind in ("folder", "tar") and cfg.dedup != "off":
        try:
            from imgclf.data.dedup import dedup_for_training
        except ImportError:
            dedup_for_training = None
        if dedup_for_training is not None:
            usable, groups, report = dedup_for_training(index, cfg, progress=progress)
    if index.has_predefined_split:
        sp = index.split[usable]
        parts = {s: usable[sp == s] for s in ("train", "val", "test") if (sp == s).any()}
        if "val" not in parts and cfg.val_split > 0:
            tr = parts["train"]
            g = groups[np.searchsorted(usable, tr)] if groups is not None else None
            sub = D.split_indices(index.labels[tr], {"val": cfg.val_split}, cfg.seed, g, index.targets_at(tr))
            parts["train"], parts["val"] = tr[sub["train"]], tr[sub["val"]]
    else:
        fr = {"val": cfg.val_split}
        if cfg.test_split:
            fr["test"] = cfg.test_split
        sub = D.split_indices(index.labels[usable], fr, cfg.seed, groups, index.targets_at(usable))
        parts = {k: usable[v] for k, v in sub.items()}
    if cfg.subset:
        tr = parts["train"]
        parts["train"] = tr[D.stratified_subset(index.labels[tr], cfg.subset, cfg.seed)]
        for k in ("val", "test"):
            if k in parts and len(parts[k]) > cfg.subset:
                parts[k] = parts[k][D.stratified_subset(index.labels[parts[k]], cfg.subset, cfg.seed)]
    failed = list(index.skipped)
    decoded: dict[str, D.Decoded] = {}
    from imgclf.data.store import build_store, plan_storage

    n_all = sum(len(v) for v in parts.values())
    plan = plan_storage(n_all, pre, cfg.stream, cfg.memory_budget_mb, world_size)
    log.info("data: %s (%s)", "streaming from the decoded store" if plan.stream else "in memory", plan.reason)
    for name, idx in parts.items():
        decode = D.decode_items
        if plan.stream:
            decode = partial(build_store, shard_mb=min(cfg.shard_mb, cfg.memory_budget_mb / 2))
        dec = decode(
            index,
            idx,
            pre,
            cache_dir=cfg.cache_dir,
            workers=cfg.workers,
            max_pixels=cfg.max_pixels,
            progress=progress,
            desc=f"decode {name}",
        )
        decoded[name] = dec
        failed.extend(dec.failed)
    splits = {name: [index.relpath(i) for i in decoded[name].items] for name in parts}
    return PreparedData(decoded["train"], decoded.get("val"), decoded.get("test"), splits, failed, report)


@dataclass
class TrainState:
    """Everything the loop needs to continue from a checkpoint (callbacks keep their own state)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    lr_scale: float = 1.0  # ReduceLROnPlateau's multiplier on the schedule
    history: list[dict[str, float]] = field(default_factory=list)
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    stop_training: bool = False
    stop_reason: str = ""
    failed: bool = False  # stopped by a failure (a non-finite loss), not by a callback's decision

    def to_json(self, gen: torch.Generator) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "lr_scale": self.lr_scale,
            "history": self.history,
            "callbacks": self.callbacks,
            "gen_state": gen.get_state().tolist(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        if "plateau" in d:  # checkpoints written before callbacks kept their own state
            d = {
                "epoch": d["epoch"],
                "step": d["step"],
                "lr_scale": d["plateau"]["scale"],
                "callbacks": {
                    "ModelCheckpoint": {"best": d["best_val_loss"], "best_epoch": d["best_epoch"]},
                    "EarlyStopping": {"best": d["best_val_loss"], "bad_epochs": d["bad_epochs"]},
                    "ReduceLROnPlateau": {"best": d["plateau"]["best"], "bad": d["plateau"]["bad"]},
                },
            }
        return cls(
            epoch=int(d["epoch"]),
            step=int(d["step"]),
            lr_scale=float(d.get("lr_scale", 1.0)),
            history=list(d.get("history", [])),
            callbacks=dict(d.get("callbacks", {})),
        )


@dataclass
class PreparedData:
    """The decoded splits of one run, and what was left out on the way."""

    train: D.Decoded
    val: D.Decoded | None
    test: D.Decoded | None
    splits: dict[str, list[str]]
    failed: list[tuple[str, str]]
    report: dict[str, Any]


def _first_ten(names: list[str]) -> str:
    """Up to ten names for a log line, then how many more (odd file names shown as \\xNN)."""
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return display_path(", ".join(names[:10]) + more)


class Trainer:
    """One training run: ``Trainer(cfg, run_dir).fit() -> TrainResult``.

    The loop is a few short methods (:meth:`setup`, :meth:`train_epoch`, :meth:`validate`,
    :meth:`finish`); what happens around it (logging, checkpoints, early stopping, plateau,
    TensorBoard, NaN) are :mod:`imgclf.training.callbacks` objects, built from the config by
    :func:`~imgclf.training.callbacks.default_callbacks` plus any the caller passes.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path | None = None,
        *,
        callbacks: list[Callback] | None = None,
        progress: bool | None = None,
        resuming: bool = False,
        dist: DistContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.out)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.resuming = resuming
        self.dist = dist or DistContext()
        self.callbacks = default_callbacks(cfg) + list(callbacks or [])
        keys = [cb.key for cb in self.callbacks]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ConfigError(f"callbacks: two callbacks share the key {dup[0]!r}; give one a distinct `key`")
        self.state = TrainState()
        self.ck_dir = self.run_dir / "checkpoints"
        self.best_path = self.ck_dir / "best.safetensors"
        self.last_path = self.ck_dir / "last.safetensors"

    # ------------------------------------------------------------------ public surface for callbacks

    @property
    def history(self) -> list[dict[str, float]]:
        return self.state.history

    @property
    def has_val(self) -> bool:
        return self.data.val is not None and len(self.data.val.labels) > 0

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are evaluated and saved: the EMA copy when EMA is on."""
        return self.ema.shadow if self.ema is not None else self.model

    def monitor(self, logs: dict[str, float]) -> float:
        """The value checkpointing, early stopping and plateau watch: val loss, else train loss."""
        return logs["val_loss"] if self.has_val else logs["train_loss"]

    def stop(self, reason: str, *, failed: bool = False) -> None:
        """End training: after this batch when ``failed`` (its update is skipped), else after this epoch."""
        self.state.stop_training = True
        self.state.stop_reason = reason
        self.state.failed = self.state.failed or failed

    def save_weights(self, path: Path) -> None:
        from imgclf.runtime.bundle import state_dict_bytes

        atomic_write_bytes(path, state_dict_bytes(self.eval_model))

    def run_callbacks(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # ------------------------------------------------------------------ the run

    def fit(self) -> TrainResult:
        """Train, checkpoint every epoch, and write the bundle and reports into the run folder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fh = _setup_logging(self.run_dir) if self.dist.is_main else None
        try:
            self.setup()
            self.run_callbacks("on_train_begin")
            for epoch in range(self.state.epoch + 1, self.cfg.epochs + 1):
                self.run_callbacks("on_epoch_begin", epoch)
                logs = self.train_epoch(epoch)
                if self.state.failed:
                    break
                logs.update(self.validate())
                self.end_epoch(epoch, logs)
                if self.state.stop_training:
                    break
            return self.finish()
        finally:
            if fh is not None:
                log.removeHandler(fh)
                fh.close()

    def setup(self) -> None:
        """Data, model, optimizer, augmentation; a resumed run restores its state here."""
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.t_start = time.time()
        check_transfer_config(cfg)  # timm installed, --init-weights readable: fail before decoding
        if cfg.negatives and not Path(cfg.negatives).is_dir():
            raise ConfigError(
                f"negatives={cfg.negatives}: no such folder; give a folder of 'none of these' images"
            )
        model = self._index_and_decode()
        self._place_model(model)
        self._batches()
        self._decide_auto()  # recipe auto: flip and learning rate, then the config is final
        cfg = self.cfg
        if self.dist.is_main:
            atomic_write_bytes(
                self.run_dir / "config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode()
            )
        self.aug = make_augment(self.cfg)
        self.mix = Mix(cfg.mixup, cfg.cutmix) if cfg.mixup > 0 or cfg.cutmix > 0 else None
        self.mix_gen = torch.Generator()
        self._optimizer()
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.ck_dir.mkdir(exist_ok=True)
        if self.resuming:
            self._restore()

    def _index_and_decode(self) -> torch.nn.Module:
        """Index the source, fill the config's data-dependent defaults, build the model, decode the
        splits (``self.data``) and load ``--init-weights``; returns the model."""
        cfg = self.cfg
        self.index = D.index_source(
            cfg.data, cfg.cache_dir, multi_label=cfg.multi_label, label_sep=cfg.label_sep
        )
        self.multi = self.index.multi_label
        cfg = self.cfg = resolve_defaults(cfg, self.index)
        size = int(cfg.img_size)
        self.pre = Preprocess(
            (size, size), int(cfg.channels), mean=tuple(cfg.mean or ()), std=tuple(cfg.std or ())
        )
        log.info(
            "data %s: %d items, %d %s; model %s at %dx%dx%d",
            self.index.name,
            len(self.index),
            len(self.index.classes),
            "labels (multi-label)" if self.multi else "classes",
            cfg.model,
            size,
            size,
            self.pre.channels,
        )
        # Built before decoding so a bad --model-args fails at once; nothing in between draws from
        # torch's RNG, so the initial weights are those of a model built after decoding.
        model = self._build_model()
        prep = partial(prepare_data, cfg, self.index, self.pre, self.progress, self.dist.world_size)
        self.data = self.dist.main_first(prep)  # Ray: rank 0 builds the shared store first
        self._write_data_records()
        # --init-weights / --pretrained; a resumed run loads them too (its checkpoint then replaces
        # them) so that fine-tuning knows which layers were loaded.
        reports = init_model(model, cfg)
        self.loaded = {n for r in reports for n in r.loaded + r.adapted}
        return model

    def _place_model(self, model: torch.nn.Module) -> None:
        """Device, memory format, loss weights and precision."""
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        if self.dist.world_size > 1 and self.device.type != "cpu":
            raise ConfigError("--ray-workers trains on CPUs (gloo); leave --device at cpu")
        self.model = model.to(device=self.device, memory_format=torch.channels_last)
        if self.device.type != "cpu":
            log.info("training on %s", self.device)
        self.binary = num_outputs(len(self.index.classes), get_spec(cfg.model), self.multi) == 1
        self._loss_weights()
        self.bf16 = cfg.precision == "bf16"
        if self.bf16 and self.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning(
                "--precision bf16: this CPU has no native bf16 (AVX512-BF16/AMX); expect it to be slower"
            )

    def _batches(self) -> None:
        """Batch size, steps and the training tensors."""
        n = len(self.data.train.labels)
        bs = min(self.cfg.batch_size, n)
        self.batch_size = bs - bs % self.dist.world_size  # equal shards, so DDP's mean is the global mean
        # Drop the last partial batch: BatchNorm is unstable on tiny ones.
        self.steps_per_epoch = n // self.batch_size
        self.total_steps = self.steps_per_epoch * self.cfg.epochs
        imgs = self.data.train.images  # a StoreArray when streaming: rows are read per batch
        self.x_all = torch.from_numpy(imgs) if isinstance(imgs, np.ndarray) else imgs
        y = self.data.train.targets if self.multi else self.data.train.labels
        self.y_all = torch.from_numpy(y).float() if self.multi else torch.from_numpy(y)

    def _optimizer(self) -> None:
        """Optimizer and per-group rates, fine-tuning's freeze, EMA and the stepped (DDP/compiled) model."""
        cfg = self.cfg
        self.opt = make_optimizer(self.model, cfg, layer_lr_mults(self.model, self.loaded, cfg.layer_lr_min))
        self.base_lrs = [cfg.lr * g["lr_mult"] for g in self.opt.param_groups]
        # Freezing needs new layers to train: with every tensor loaded there is nothing to warm up.
        new_layers = any(n not in self.loaded for n, _ in self.model.named_parameters())
        self.freeze_epochs = cfg.freeze_epochs if self.loaded and new_layers else 0
        if self.freeze_epochs:
            log.info(
                "fine-tuning: %d loaded tensors frozen for %d epoch(s), then lr x%g (first) to x1",
                len(self.loaded),
                cfg.freeze_epochs,
                cfg.layer_lr_min,
            )
        self.ema = _EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        self.step_model = self.dist.wrap_model(self.model)  # DDP: averages gradients across ranks
        if cfg.compile:
            self.step_model = torch.compile(self.model)

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        try:
            return create_model(
                cfg.model,
                num_classes=len(self.index.classes),
                in_channels=self.pre.channels,
                img_size=int(cfg.img_size),
                **({"multi_label": True} if self.multi else {}),
                **cfg.model_args,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--model {cfg.model} --model-args {json.dumps(cfg.model_args)}: {e}") from None

    def _decide_auto(self) -> None:
        """``recipe: auto``: decide the flip from the decoded images and the rate by a range test."""
        from imgclf.training import auto

        keys = auto.auto_keys(self.cfg)
        reasons = dict(self.cfg.extra.get("auto_reasons", {}))
        changes: dict[str, Any] = {}
        if "flip" in keys:
            on, why = auto.flip_test(self.data.train.images, self.data.train.labels, self.cfg.seed)
            changes["flip"], reasons["flip"] = ("on" if on else "off"), why
        if "lr" in keys:
            self.cfg = self.cfg.replace(**changes)
            lr, why = None, ""
            if self.dist.is_main:
                lr, why = self._range_test()
            lr, why = self.dist.broadcast((lr, why))
            changes["lr"], reasons["lr"] = lr, why
        if not reasons:
            return
        extra = {k: v for k, v in self.cfg.extra.items() if k not in ("auto", "auto_reasons")}
        self.cfg = self.cfg.replace(**changes, extra={**extra, "auto_reasons": reasons}).validate()
        for key, why in reasons.items():
            log.info("auto: %s=%s (%s)", key, getattr(self.cfg, key), why)

    def _range_test(self) -> tuple[float, str]:
        from imgclf.training import auto

        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        aug = make_augment(self.cfg)
        n, bs = len(self.y_all), self.batch_size

        def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(0, n, (bs,), generator=gen)
            return make_batch(self.x_all, self.y_all, idx, self.pre, aug, gen, self.device)

        def make_opt(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
            return make_optimizer(model, self.cfg.replace(lr=lr))

        t0 = time.time()
        # At most a few epochs' worth on tiny sets, where the test would cost more than training.
        steps = min(auto.LR_STEPS, max(30, 4 * self.steps_per_epoch))
        lr, why, _ = auto.find_lr(
            self.model, make_opt, batch, lambda m, x, y: self.loss(m, x, y)[0], self.cfg.optimizer, steps
        )
        return lr, f"{why}; {time.time() - t0:.0f} s"

    def loss(
        self, model: torch.nn.Module, x: torch.Tensor, yb: torch.Tensor, mix: MixParams | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, predictions) of ``model`` on one batch, as every step computes them.

        A mixed batch (``mix``) weighs the loss against each image's own label by ``mix.lam`` and
        against its partner's by the rest, as MixUp and CutMix do.
        """
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = model(x)
        out = out.float()
        loss, pred = self._criterion(out, yb)
        if mix is not None:
            loss = mix.lam * loss + (1.0 - mix.lam) * self._criterion(out, yb[mix.perm])[0]
        return loss, pred

    def _criterion(self, out: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, predictions) of logits ``out`` against labels ``yb`` for this run's label kind."""
        w = self.class_weights
        if self.multi:
            loss = F.binary_cross_entropy_with_logits(out, yb, pos_weight=self.pos_weight)
            return loss, out > 0
        if self.binary:
            loss = F.binary_cross_entropy_with_logits(
                out[:, 0], yb.float(), weight=None if w is None else w[yb]
            )
            return loss, (out[:, 0] > 0).long()
        return F.cross_entropy(out, yb, weight=w, label_smoothing=self.cfg.label_smoothing), out.argmax(1)

    def _loss_weights(self) -> None:
        """``class_weights`` (single-label, ``auto``: inverse class frequency) or ``pos_weight``."""
        self.class_weights = None
        self.pos_weight = None
        if self.multi:
            self._multi_label_weights()
        elif self.cfg.class_weights == "auto":
            k = len(self.index.classes)
            counts = np.bincount(self.data.train.labels, minlength=k).astype(np.float64)
            w = counts.sum() / (k * np.maximum(counts, 1))
            self.class_weights = torch.tensor(w, dtype=torch.float32, device=self.device)

    def _multi_label_weights(self) -> None:
        """Multi-label: per-label counts in the log; ``pos_weight auto`` = negatives / positives."""
        y = self.data.train.targets
        pos = y.sum(axis=0).astype(np.float64)
        rare = [c for c, n in zip(self.index.classes, pos) if n < D.MIN_CLASS_IMAGES]
        log.info(
            "multi-label: %d labels, %.2f labels per training image; %d image(s) with no label",
            y.shape[1], float(y.sum(axis=1).mean()), int((y.sum(axis=1) == 0).sum()),
        )  # fmt: skip
        if rare:
            log.warning(
                "multi-label: label(s) with fewer than %d training images: %s",
                D.MIN_CLASS_IMAGES,
                ", ".join(rare[:10]),
            )
        if self.cfg.class_weights == "auto":
            log.info("multi-label: class_weights ignored; use pos_weight auto for rare labels")
        if self.cfg.pos_weight == "auto":
            # Capped so a label seen a handful of times does not dominate the loss.
            w = np.clip((len(y) - pos) / np.maximum(pos, 1), 1.0, 100.0)
            self.pos_weight = torch.tensor(w, dtype=torch.float32, device=self.device)

    def _write_data_records(self) -> None:
        ds = self.data
        if ds.failed and self.dist.is_main:
            lines = [f"{p}\t{r}" for p, r in ds.failed]
            atomic_write_bytes(self.run_dir / "skipped_files.txt", text_bytes("\n".join(lines) + "\n"))
            log.warning(
                "skipped %d unreadable file(s); listed in %s (first: %s)",
                len(lines),
                self.run_dir / "skipped_files.txt",
                display_path(lines[0].replace("\t", ": ")),
            )
        if self.dist.is_main:
            atomic_write_bytes(
                self.run_dir / "splits.json", (json.dumps(ds.splits, indent=1) + "\n").encode()
            )
        if len(ds.train.labels) == 0:
            raise TrainingError("no readable training images left after decoding; see skipped_files.txt")
        log.info(
            "split: train %d, val %d, test %d",
            len(ds.train.labels),
            len(ds.val.labels) if ds.val else 0,
            len(ds.test.labels) if ds.test else 0,
        )
        if not self.multi and self.dist.is_main:
            self._warn_class_balance()

    def _warn_class_balance(self) -> None:
        """Single-label: say once when a class is too small to learn or is missing from a held-out
        split (whose accuracy then says nothing about it), and when classes are strongly imbalanced."""
        ds, classes = self.data, self.index.classes
        k = len(classes)
        train = np.bincount(ds.train.labels, minlength=k)
        rare = [f"{c} ({n})" for c, n in zip(classes, train) if n < D.MIN_CLASS_IMAGES]
        if rare:
            log.warning(
                "class(es) with fewer than %d training images: %s; too few to learn: add images or "
                "merge classes",
                D.MIN_CLASS_IMAGES,
                _first_ten(rare),
            )
        for name, d in (("val", ds.val), ("test", ds.test)):
            if d is not None and len(d.labels):
                missing = [c for c, n in zip(classes, np.bincount(d.labels, minlength=k)) if n == 0]
                if missing:
                    log.warning(
                        "%s split has no image of %d class(es) (%s): its accuracy says nothing about them",
                        name,
                        len(missing),
                        _first_ten(missing),
                    )
        if train.max() >= D.SEVERE_IMBALANCE * max(int(train.min()), 1) and self.cfg.class_weights == "none":
            log.warning(
                "classes are imbalanced (%d to %d training images): accuracy favours the large ones; "
                "--class-weights auto weights the loss by inverse class frequency",
                int(train.max()),
                int(train.min()),
            )

    def _restore(self) -> None:
        path = self.dist.resume_from or self.last_path
        raw = load_checkpoint(path, self.model, self.opt)
        self.gen.set_state(torch.tensor(raw["gen_state"], dtype=torch.uint8))
        self.state = TrainState.from_json(raw)
        if not self.state.history:  # older checkpoints kept the history in history.csv only
            hist_csv = path.parent.parent / "history.csv"
            if hist_csv.exists():
                with open(hist_csv) as f:
                    rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
                self.state.history = rows[: self.state.epoch]
        for cb in self.callbacks:
            if cb.key in self.state.callbacks:
                cb.load_state_dict(self.state.callbacks[cb.key])
        log.info("resuming %s from epoch %d", self.run_dir, self.state.epoch)
        if self.ema is not None:
            self.ema = _EMA(self.model, self.cfg.ema)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; returns the epoch's training logs."""
        from tqdm import tqdm

        cfg, dist = self.cfg, self.dist
        self.model.train()
        t0 = time.time()
        perm = torch.randperm(len(self.y_all), generator=self.gen)
        # Ranks share `gen` for the permutation; each draws its augmentation from its own stream.
        aug_gen = self.gen
        if dist.world_size > 1:
            aug_gen = torch.Generator().manual_seed(cfg.seed + 7919 * epoch + dist.rank)
        # Its own stream, seeded per epoch: mixing leaves the augmentation draws as they were, and
        # a run resumed at an epoch boundary mixes as the uninterrupted one did.
        self.mix_gen.manual_seed(cfg.seed * 1_000_003 + 7919 * epoch + dist.rank)
        run_loss, run_correct, seen = 0.0, 0, 0
        bar = tqdm(
            range(self.steps_per_epoch),
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not self.progress,
            leave=False,
            unit="batch",
        )
        batches = epoch_batches(
            dist.epoch_rows(self.x_all, epoch, self.run_dir),
            self.y_all,
            perm,
            self.batch_size,
            self.steps_per_epoch,
            self.pre,
            self.aug,
            aug_gen,
            dist.rank,
            dist.world_size,
            device=self.device,
        )
        try:
            for b, (x, yb) in zip(bar, batches):
                loss, pred = self.train_step(b, x, yb)
                if loss is None:
                    break
                run_loss += loss * len(yb)
                run_correct += int(correct(pred, yb))
                seen += len(yb)
                if self.progress and (b % 10 == 0 or b == self.steps_per_epoch - 1):
                    bar.set_postfix(loss=f"{run_loss / seen:.4f}", acc=f"{run_correct / seen:.4f}")
        finally:
            bar.close()
            batches.close()  # joins the prefetch thread (a NaN stop leaves one batch pending)
        if dist.world_size > 1:
            run_loss, run_correct, seen = dist.all_reduce_sum([run_loss, float(run_correct), float(seen)])
        return {
            "epoch": epoch,
            "train_loss": run_loss / max(seen, 1),
            "train_acc": run_correct / max(seen, 1),
            "lr": self.opt.param_groups[0]["lr"],
            "time_s": time.time() - t0,
            "seen": seen,
        }

    def train_step(self, b: int, x: torch.Tensor, yb: torch.Tensor) -> tuple[float | None, torch.Tensor]:
        """Forward, loss, callbacks' veto, backward, update. Returns (loss, predictions); loss None = stop."""
        f = lr_factor(self.cfg, self.state.step, self.total_steps, self.steps_per_epoch) * self.state.lr_scale
        # Fine-tuning's first epochs train only the new layers: the loaded ones get a zero rate,
        # which also stops their weight decay.
        frozen = self.state.epoch < self.freeze_epochs
        for g, lr0 in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = 0.0 if frozen and g.get("loaded", False) else lr0 * f
        mix = None
        if self.mix is not None:
            mix = self.mix.draw(len(yb), x.shape[2], x.shape[3], self.mix_gen)
            x = self.mix.apply(x, mix)
        loss, pred = self.loss(self.step_model, x, yb, mix)
        if mix is not None and mix.lam < 0.5:
            # Training accuracy counts the dominant label, here the partner's: predictions put back
            # in partner order match ``yb`` as often as the originals match ``yb[perm]``.
            pred = pred[torch.argsort(mix.perm)]
        value = loss.item()
        self.run_callbacks("on_loss", b, value)
        if self.state.failed:
            return None, pred
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.state.step += 1
        self.run_callbacks("on_batch_end", b, {"loss": value, "lr": self.opt.param_groups[0]["lr"]})
        return value, pred

    def validate(self) -> dict[str, float]:
        """Validation loss and accuracy of :attr:`eval_model` (NaN without a validation split)."""
        vm = None
        if self.has_val and self.dist.is_main:
            val = self.data.val
            vm = evaluate_arrays(self.eval_model, val.images, _truth(val), self.pre)
        vm = self.dist.broadcast(vm)
        return {
            "val_loss": vm["loss"] if vm else float("nan"),
            "val_acc": vm["accuracy"] if vm else float("nan"),
        }

    def end_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        """Record the epoch, run the callbacks, then write the resume point."""
        row = {
            k: logs[k] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "time_s")
        }
        self.state.history.append(row)
        self.state.epoch = epoch
        self.run_callbacks("on_epoch_end", epoch, {**row, "seen": logs.get("seen", 0)})
        if self.dist.is_main:
            self.state.callbacks = {cb.key: cb.state_dict() for cb in self.callbacks}
            save_checkpoint(self.last_path, self.model, self.opt, self.state.to_json(self.gen))
        self.dist.end_epoch(epoch, row, self.run_dir)

    def _calibrate(self, logits: dict[str, tuple[torch.Tensor, np.ndarray]]) -> dict[str, Any] | None:
        """Temperature scaling fitted on the validation logits; None when off or too few images."""
        if self.cfg.calibrate == "none":
            return None
        if "val" not in logits or len(logits["val"][1]) < MIN_CALIBRATION_IMAGES:
            need = MIN_CALIBRATION_IMAGES
            log.info("calibration: skipped (needs a validation split of at least %d images)", need)
            return None
        z, y = logits["val"]
        return fit_calibration(z, y, fit_on="val")

    def _fit_unknown(
        self, model: torch.nn.Module, outputs: dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]]
    ) -> tuple[Any, dict[str, Any] | None]:
        """The unknown-image scorer, fitted on training features, and its threshold from validation.

        ``outputs``: split name -> (features, logits, labels) of the final model on val and test.
        Returns (scorer, the ``ood`` block of model.json), or (None, None) when off or impossible.
        """
        cfg, data = self.cfg, self.data
        if cfg.ood_score == "none":
            return None, None
        if cfg.ood_score in FEATURE_SCORES and outputs and outputs.get("val", (None,))[0] is None:
            return None, None  # the features could not be read; said above
        if "val" not in outputs or len(outputs["val"][2]) < MIN_CALIBRATION_IMAGES:
            log.info(
                "unknown images: no rejection (needs a validation split of %d+ images)",
                MIN_CALIBRATION_IMAGES,
            )
            return None, None
        t0 = time.time()
        # A seeded sample bounds the cost on big sets: the scorers need class means or a bank, not all rows.
        tr = data.train
        pick = np.arange(len(tr.labels))
        if len(pick) > MAX_OOD_FIT_IMAGES:
            pick = np.sort(np.random.default_rng(cfg.seed).choice(pick, MAX_OOD_FIT_IMAGES, replace=False))
        # msp and energy read the logits only: no pass over the training images.
        needs_feats = cfg.ood_score in FEATURE_SCORES
        # A StoreArray's subset is a view: the rows are read a batch at a time, not gathered at once.
        imgs = tr.images.subset(pick) if hasattr(tr.images, "subset") else tr.images[pick]
        feats = predict_features(model, imgs, self.pre)[0] if needs_feats else None
        scorer = fit_scorer(cfg.ood_score, feats, torch.from_numpy(tr.labels[pick]), len(self.index.classes))

        def scores(f: torch.Tensor, z: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return scorer(f, z).float().numpy()

        val = scores(*outputs["val"][:2])
        neg = self._negative_images()
        neg_scores = (
            scores(*predict_features(model, neg, self.pre, features=needs_feats)) if neg is not None else None
        )
        threshold = threshold_for_keep_rate(val, cfg.keep_rate, neg_scores)
        rec: dict[str, Any] = {
            "scorer": scorer.config(),
            "threshold": float(threshold),
            "keep_rate": cfg.keep_rate,
            "fit_on": f"train ({len(pick)} images), threshold on val ({len(val)} images)",
            "val_keep_rate": float((val <= threshold).mean()),
        }
        if "test" in outputs:
            rec["test_keep_rate"] = float((scores(*outputs["test"][:2]) <= threshold).mean())
        if neg_scores is not None:
            rec["negatives"] = {"folder": cfg.negatives, "images": len(neg_scores),
                                "rejected": float((neg_scores > threshold).mean())}  # fmt: skip
        neg_note = ""
        if neg_scores is not None:
            neg_note = f", rejects {100 * rec['negatives']['rejected']:.1f}% of {cfg.negatives}"
        log.info(
            "unknown images: %s score, threshold %.4g keeps %.1f%% of validation images%s (%.1fs)",
            cfg.ood_score, threshold, 100 * rec["val_keep_rate"], neg_note, time.time() - t0,
        )  # fmt: skip
        return scorer.cpu(), rec

    def _negative_images(self) -> np.ndarray | None:
        """The ``negatives`` folder decoded with the run's preprocessing (unreadable files skipped)."""
        if not self.cfg.negatives:
            return None
        from imgclf.core.files import walk_files
        from imgclf.core.imageio import ImageDecodeError
        from imgclf.core.preprocess import load_uint8

        files, _ = walk_files(self.cfg.negatives)
        arrays = []
        for f in files[:MAX_OOD_FIT_IMAGES]:
            try:
                arrays.append(load_uint8(f, self.pre))
            except ImageDecodeError as e:
                log.warning("negatives: skipped %s", e)
        if not arrays:  # checked before training; a folder emptied since must not lose the run
            log.warning(
                "negatives: no readable image in %s; threshold from validation alone", self.cfg.negatives
            )
            return None
        return np.stack(arrays)

    @staticmethod
    def _split_metrics(
        logits: dict[str, tuple[torch.Tensor, np.ndarray]], calibration: dict[str, Any] | None,
        metrics: dict[str, Any],
    ) -> None:  # fmt: skip
        """Single-label: loss, accuracy and ECE (calibrated, and before when calibrated) per split."""
        t = calibration["temperature"] if calibration else 1.0
        for name, (z, y) in logits.items():
            m = logit_metrics(z, y, t)
            metrics[f"{name}_loss"], metrics[f"{name}_accuracy"] = m["loss"], m["accuracy"]
            metrics[f"{name}_size"] = len(y)
            metrics[f"{name}_ece"] = m["ece"]
            if calibration:
                metrics[f"{name}_ece_uncalibrated"] = logit_metrics(z, y)["ece"]

    def _tta_metrics(
        self,
        model: torch.nn.Module,
        splits: list[tuple[str, D.Decoded]],
        logits: dict[str, tuple[torch.Tensor, np.ndarray]],
        calibration: dict[str, Any] | None,
        metrics: dict[str, Any],
    ) -> None:
        """What ``--tta`` (the views ``auto`` picks from this run's augmentation) scores on val and
        test, beside one view on the same images, so the log says whether it pays on this data.
        Predictions stay one view unless the user asks; at most TTA_CHECK_MAX forward passes a split."""
        from types import SimpleNamespace

        from tqdm import tqdm

        from imgclf.runtime.tta import config_views, predict_tta, views_for

        if not self.cfg.tta_check or (name := config_views(self.cfg.to_dict())) == "identity":
            return
        views = views_for(name, self.cfg.img_size)
        t = calibration["temperature"] if calibration else 1.0
        # The trained torch model as the bundle predict_tta averages over: (N, K) probabilities,
        # two columns for a one-logit binary head, as the bundle gives.
        torch_bundle = SimpleNamespace(
            predict_batch=lambda x: logits_to_probs(predict_logits(model, x, self.pre), t, False).numpy()
        )
        said = []
        for split, d in splits:
            n = len(d.labels)
            keep = np.unique(np.linspace(0, n - 1, min(n, TTA_CHECK_MAX // len(views))).astype(int))
            y = torch.as_tensor(logits[split][1][keep])
            parts = []
            starts = range(0, len(keep), 256)
            for s in tqdm(starts, desc=f"TTA check ({split})", disable=not self.progress, leave=False):
                rows = np.asarray(d.images[keep[s : s + 256]])  # a StoreArray reads just these rows
                parts.append(torch.as_tensor(predict_tta(torch_bundle, rows, views)))
            probs = torch.cat(parts)
            one_view = logits_to_probs(logits[split][0][keep], t, False)
            one = float((one_view.argmax(1) == y).float().mean())
            acc = float((probs.argmax(1) == y).float().mean())
            metrics[f"{split}_accuracy_tta"] = acc
            metrics[f"{split}_accuracy_tta_base"] = one
            metrics[f"{split}_tta_size"] = len(keep)
            gain = (acc - one) * 100
            said.append(f"{split} {acc:.4f} vs {one:.4f} ({gain:+.2f} points, {len(keep)} images)")
        metrics["tta_views"] = name
        log.info(
            "TTA check: --tta (%s, %d views, %dx the prediction cost) scores %s; predictions stay one view "
            "unless you pass --tta",
            name,
            len(views),
            len(views),
            "; ".join(said),
        )

    def _thresholds_and_metrics(
        self, logits: dict[str, tuple[torch.Tensor, np.ndarray]], metrics: dict[str, Any]
    ) -> dict[str, Any]:
        """Multi-label: per-label thresholds (best F1 on validation), then every split's metrics.

        Returns the bundle's ``task`` / ``thresholds`` record; ``metrics`` gains the figures.
        """
        from imgclf.runtime.multilabel import TASK, best_f1_thresholds, multilabel_metrics

        classes = self.index.classes
        probs = {n: torch.sigmoid(z).numpy() for n, (z, _) in logits.items()}
        if "val" in logits:
            th, _ = best_f1_thresholds(probs["val"], logits["val"][1])
            how = f"best F1 per label on validation ({len(logits['val'][1])} images)"
        else:
            th = np.full(len(classes), 0.5, dtype=np.float32)
            how = "0.5 (no validation split to tune on)"
        shown = ", ".join(f"{c} {t:.2f}" for c, t in zip(classes, th))
        log.info("multi-label thresholds: %s; %s", how, shown)
        if self.cfg.calibrate != "none" or self.cfg.ood_score != "none":
            log.info("multi-label: no temperature scaling or unknown-image rejection (single-label only)")
        per_split = {}
        for name, (z, y) in logits.items():
            m = per_split[name] = multilabel_metrics(probs[name], y, th, classes)
            metrics[f"{name}_loss"] = logit_metrics(z, y)["loss"]  # binary cross-entropy
            metrics[f"{name}_accuracy"] = m["exact_match"]  # exact match: the whole label set right
            metrics[f"{name}_size"] = len(y)
            for k in ("mAP", "micro_f1", "macro_f1", "hamming_loss"):
                metrics[f"{name}_{k}"] = m[k]
        where = "test" if "test" in logits else "val" if "val" in logits else None
        if where:
            metrics["per_label"] = per_split[where]["per_label"]
            metrics["per_label_split"] = where
        return {"task": TASK, "thresholds": [float(t) for t in th], "thresholds_fit_on": how}

    def finish(self) -> TrainResult:
        """Pick the final weights, test them, and write the bundle, metrics and plot."""
        cfg, history, data = self.cfg, self.state.history, self.data
        if not history:
            raise TrainingError(self.state.stop_reason or "no epoch completed")
        if not self.dist.is_main:
            return TrainResult(self.run_dir, self.run_dir / "model", {}, history)
        final = self.eval_model
        if cfg.keep == "best" and self.best_path.exists():
            from safetensors.torch import load_file

            final.load_state_dict(load_file(str(self.best_path)))
        final.eval()
        best = next((cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)), None)
        failed_reason = self.state.stop_reason if self.state.failed else ""
        metrics: dict[str, Any] = {
            "best_epoch": best.best_epoch if best else len(history),
            "epochs_run": len(history),
            "train_time_s": round(sum(h["time_s"] for h in history), 2),
            "wall_time_s": round(time.time() - self.t_start, 2),
            "stopped_early": bool(failed_reason) or len(history) < cfg.epochs,
        }
        # One pass over val and test serves the metrics, the calibration and the unknown-image fit.
        splits = [
            (n, d) for n, d in (("val", data.val), ("test", data.test)) if d is not None and len(d.labels)
        ]

        def run(feats: bool) -> dict[str, tuple[Any, torch.Tensor, np.ndarray]]:
            return {
                n: (*predict_features(final, d.images, self.pre, features=feats), _truth(d))
                for n, d in splits
            }

        try:
            outputs = run(cfg.ood_score in FEATURE_SCORES and not self.multi)
        except ConfigError as e:
            # No usable penultimate layer (some timm heads): keep the finished run, skip rejection.
            log.warning("unknown images: no rejection (%s)", e)
            outputs = run(False)
        logits = {name: (z, y) for name, (_, z, y) in outputs.items()}
        extra: dict[str, Any] = {}
        calibration, scorer, ood = None, None, None
        if self.multi:
            extra = self._thresholds_and_metrics(logits, metrics)
        else:
            calibration = self._calibrate(logits)
            scorer, ood = self._fit_unknown(final, outputs)
            self._split_metrics(logits, calibration, metrics)
            self._tta_metrics(final, splits, logits, calibration, metrics)
        if calibration:
            # Headline figures on the held-out test split when there is one, else validation.
            where = "test" if "test" in logits else "val"
            metrics["temperature"] = calibration["temperature"]
            metrics["ece_uncalibrated"] = metrics[f"{where}_ece_uncalibrated"]
            metrics["ece"] = metrics[f"{where}_ece"]
        if ood:
            metrics["ood_score"] = ood["scorer"]["kind"]
            metrics.update(
                {f"ood_{k}": ood[k] for k in ("threshold", "val_keep_rate", "test_keep_rate") if k in ood}
            )
        if failed_reason:
            metrics["stop_reason"] = failed_reason
        self.run_callbacks("on_train_end", metrics)
        final = final.cpu()  # bundles are device-free: predict/serve/export run on the CPU
        bundle_dir = save_bundle(
            self.run_dir / "model",
            final,
            self.pre,
            self.index.classes,
            train_config=cfg.to_dict(),
            metrics=metrics,
            extra={
                "run_dir": str(self.run_dir.resolve()),
                "data_source": self.index.name,
                **({"calibration": calibration} if calibration else {}),
                **({"ood": ood} if ood else {}),
                **extra,
            },
            extra_tensors=scorer.tensors() if scorer is not None else None,
        )
        atomic_write_bytes(self.run_dir / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
        write_plot(history, self.run_dir / "plot.png", f"{cfg.model} on {Path(self.index.name).name}")
        keys = ("val_accuracy", "test_accuracy") + (("val_mAP", "test_mAP") if self.multi else ())
        summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
        log.info("done in %.1fs: %s; bundle %s", metrics["wall_time_s"], summary, bundle_dir)
        return TrainResult(self.run_dir, bundle_dir, metrics, history)
