"""K-fold cross-validated training for out-of-fold class probabilities (``imgclf inspect --labels``).

Every image is predicted by a model that never saw it: the images are split into K stratified
folds (:class:`sklearn.model_selection.StratifiedKFold`), one small model is trained per fold on the
other K-1, and its probabilities on the held-out fold are kept. Confident learning
(:mod:`imgclf.analysis.labels`) needs exactly these. The loop is a lean one over the Trainer's own
pieces (decoding, :func:`~imgclf.training.trainer.epoch_batches`, the optimizer and schedule from a
:class:`TrainConfig`): no checkpoints, callbacks or run folder, because the K models are thrown away.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.core.errors import ConfigError, DataError
from imgclf.core.preprocess import Preprocess, normalize
from imgclf.data import sources as D
from imgclf.models.registry import create_model, get_spec, logits_to_probs
from imgclf.training.config import TrainConfig
from imgclf.training.trainer import epoch_batches, lr_factor, make_augment, make_optimizer, resolve_device

log = logging.getLogger("imgclf")

# The default label-check model, measured on one held-out Sign Language Digits fold (one shared
# core): resnet10s at 24 px, 6 epochs: 98.8 % in 73 s; at 16 px 96.9 %; 4 epochs at batch 64
# 82.3 %; minivgg at 24 px 97.1 % in 54 s; lenet at 24-32 px 91.5-93 %. Out-of-fold accuracy is
# what confident learning's precision rests on, so the ResNet. bench/label_errors.py has the
# end-to-end precision/recall (README "Label errors").
DEFAULTS: dict[str, Any] = {
    "model": "resnet10s",
    "img_size": 24,
    "epochs": 6,
    "batch_size": 32,
    "optimizer": "adamw",
    "lr": 2e-3,
    "weight_decay": 0.05,
    "schedule": "cosine",
    "warmup_epochs": 0.5,
    # mild geometry only: a label check must not learn to ignore what tells classes apart
    "augment": "on",
    "rotation": 10.0,
    "shift": 0.1,
    "shear": 0.0,
    "zoom": 0.1,
    "flip": "off",
    "erase": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
}
# Small sets get smaller batches and more epochs (when not given): a model that took a handful of
# steps predicts its prior, and confident learning then flags noise, not label errors.
MIN_STEPS = 200
MAX_EPOCHS = 100


@dataclass
class OutOfFold:
    """Out-of-fold probabilities: row ``i`` comes from the model that did not train on item ``i``."""

    probs: np.ndarray  # (N, num_classes) float32
    labels: np.ndarray  # (N,) int64, the given labels
    items: list[str]  # paths / item ids, aligned with probs
    classes: list[str]
    fold: np.ndarray  # (N,) which fold held the item out
    fold_accuracy: list[float]  # held-out accuracy of each fold's model
    seconds: float
    settings: dict[str, Any]
    failed: list[tuple[str, str]] = field(default_factory=list)  # unreadable items, left out

    @property
    def accuracy(self) -> float:
        """Out-of-fold accuracy against the given labels."""
        return float((self.probs.argmax(1) == self.labels).mean()) if len(self.labels) else float("nan")


def kfold_config(data: str, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` the K models train with: :data:`DEFAULTS`, then ``overrides``.

    A model's own default size applies when ``img_size`` is None. Raises :class:`ConfigError`
    on a bad value, as ``imgclf train`` does.
    """
    given = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    if "img_size" not in overrides or overrides["img_size"] is None:
        if "model" in overrides and overrides["model"] and overrides["model"] != DEFAULTS["model"]:
            given["img_size"] = get_spec(overrides["model"]).default_size
    return TrainConfig(data=data, tensorboard=False, **given).validate()


def check_folds(labels: np.ndarray, classes: list[str], k: int, name: str) -> None:
    """Raise :class:`DataError` unless every class has at least ``k`` images and there are 2+ classes."""
    if k < 2:
        raise ConfigError(f"--kfold {k}: needs at least 2 folds")
    counts = np.bincount(labels, minlength=len(classes))
    present = [c for c, n in zip(classes, counts) if n > 0]
    if len(present) < 2:
        raise DataError(
            f"{name}: the label check needs at least two classes with images (found {len(present)})"
        )
    small = [f"{c} ({n})" for c, n in zip(classes, counts) if 0 < n < k]
    if small:
        raise DataError(
            f"{name}: class(es) {', '.join(small)} have fewer images than --kfold {k}; "
            "add images or use a smaller --kfold"
        )


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.shape[1] == 1:  # binary head (one logit), as the Trainer trains it
        return F.binary_cross_entropy_with_logits(out[:, 0], y.float())
    return F.cross_entropy(out, y)


@torch.inference_mode()
def predict_probs(
    model: torch.nn.Module, images: np.ndarray, pre: Preprocess, batch: int = 256
) -> np.ndarray:
    """Class probabilities of ``model`` on uint8 NHWC ``images``."""
    model.eval()
    dev = next(model.parameters()).device
    x_all = torch.from_numpy(images)
    out = [
        logits_to_probs(model(normalize(x_all[s : s + batch].to(dev), pre)).float()).cpu()
        for s in range(0, len(images), batch)
    ]
    return torch.cat(out).numpy().astype(np.float32)


def train_fold(
    cfg: TrainConfig,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    pre: Preprocess,
    *,
    seed: int,
    device: torch.device,
    on_epoch: Any = None,
) -> torch.nn.Module:
    """Train one fresh ``cfg.model`` on uint8 NHWC ``images``; ``on_epoch(epoch, loss)`` after each epoch."""
    torch.manual_seed(seed)
    model = create_model(
        cfg.model, num_classes=num_classes, in_channels=pre.channels, img_size=pre.size, **cfg.model_args
    ).to(device=device, memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    base = [cfg.lr * g["lr_mult"] for g in opt.param_groups]
    aug = make_augment(cfg)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    n = len(labels)
    bs = min(cfg.batch_size, n)
    steps = max(1, n // bs)  # drop the last partial batch (BatchNorm), as the Trainer does
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        batches = epoch_batches(x_all, y_all, perm, bs, steps, pre, aug, gen, device=device)
        try:
            for x, y in batches:
                f = lr_factor(cfg, step, steps * cfg.epochs, steps)
                for g, lr0 in zip(opt.param_groups, base):
                    g["lr"] = lr0 * f
                loss = _loss(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                total += loss.item() * len(y)
                seen += len(y)
        finally:
            batches.close()
        if on_epoch is not None:
            on_epoch(epoch, total / max(seen, 1))
    return model


def out_of_fold_probs(
    data: str | D.SourceIndex,
    *,
    folds: int = 5,
    subset: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
    **overrides: Any,
) -> OutOfFold:
    """Train ``folds`` models, each on the other folds, and return every item's held-out probabilities.

    ``data`` is a ``--data`` value or an already indexed source; ``subset`` restricts it to those
    item indices; ``labels`` (aligned with ``subset`` or the whole source) replaces the given labels,
    e.g. to plant label noise in memory. ``overrides`` are :class:`TrainConfig` keys (``model``,
    ``img_size``, ``epochs``, ...) over :data:`DEFAULTS`. ``threads`` sets PyTorch's compute
    threads for the call (restored after).
    """
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _out_of_fold(data, folds, subset, labels, seed, progress, overrides)
    finally:
        torch.set_num_threads(threads_before)


def _decode_labelled(
    index: D.SourceIndex, idx: np.ndarray, given: np.ndarray, cfg: TrainConfig, progress: bool
) -> tuple[Preprocess, D.Decoded, np.ndarray]:
    """(preprocessing, decoded images, their given labels); unreadable items are dropped from both."""
    channels = cfg.channels or index.native_channels
    pre = Preprocess((int(cfg.img_size), int(cfg.img_size)), int(channels))
    k = len(index.classes)
    try:  # a bad --label-model / --label-size fails here, before decoding
        create_model(cfg.model, num_classes=k, in_channels=pre.channels, img_size=pre.size, **cfg.model_args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"label check model {cfg.model} at {cfg.img_size} px: {e}") from None
    dec = D.decode_items(
        index,
        idx,
        pre,
        cache_dir=cfg.cache_dir,
        workers=cfg.workers,
        max_pixels=cfg.max_pixels,
        progress=progress,
        desc="decode",
    )
    # decode_items keeps the order and drops unreadable items; re-align the given labels
    pos = {it: j for j, it in enumerate(index.items[i] for i in idx)}
    keep = np.asarray([pos[it] for it in dec.items], dtype=np.int64)
    return pre, dec, given[keep]


def _fit_schedule(cfg: TrainConfig, n_train: int, overrides: dict[str, Any]) -> TrainConfig:
    """Batch size and epochs for a fold of ``n_train`` images, unless the caller gave them."""
    if overrides.get("batch_size") is None and n_train // 8 < cfg.batch_size:
        cfg = cfg.replace(batch_size=max(8, n_train // 8))  # at least 8 steps an epoch
    if overrides.get("epochs") is None:
        per_epoch = max(1, n_train // min(cfg.batch_size, n_train))
        want = min(MAX_EPOCHS, -(-MIN_STEPS // per_epoch))
        if want > cfg.epochs:
            cfg = cfg.replace(epochs=want)
    return cfg


def _out_of_fold(
    data: str | D.SourceIndex,
    folds: int,
    subset: np.ndarray | None,
    labels: np.ndarray | None,
    seed: int,
    progress: bool,
    overrides: dict[str, Any],
) -> OutOfFold:
    from sklearn.model_selection import StratifiedKFold
    from tqdm import tqdm

    t0 = time.perf_counter()
    index = data if isinstance(data, D.SourceIndex) else D.index_source(str(data))
    cfg = kfold_config(index.name, **overrides)
    idx = np.arange(len(index)) if subset is None else np.asarray(subset, dtype=np.int64)
    given = index.labels[idx] if labels is None else np.asarray(labels, dtype=np.int64)
    if len(given) != len(idx):
        raise ValueError(f"labels has {len(given)} entries for {len(idx)} items")
    k = len(index.classes)
    check_folds(given, index.classes, folds, index.name)
    pre, dec, y = _decode_labelled(index, idx, given, cfg, progress)
    check_folds(y, index.classes, folds, index.name)
    cfg = _fit_schedule(cfg, len(y) - len(y) // folds, overrides)
    device = resolve_device(cfg.device)
    probs = np.zeros((len(y), max(k, 2)), dtype=np.float32)
    fold_of = np.full(len(y), -1, dtype=np.int64)
    accs: list[float] = []
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    bar = tqdm(total=folds * cfg.epochs, desc="label check", unit="epoch", disable=not progress, leave=False)

    def tick(f: int) -> Any:
        def on_epoch(epoch: int, loss: float) -> None:
            bar.set_postfix(fold=f"{f + 1}/{folds}", epoch=epoch, loss=f"{loss:.3f}")
            bar.update(1)

        return on_epoch

    try:
        for f, (tr, te) in enumerate(skf.split(np.zeros(len(y)), y)):
            model = train_fold(
                cfg,
                dec.images[tr],
                y[tr],
                k,
                pre,
                seed=seed * 1000 + f,
                device=device,
                on_epoch=tick(f),
            )
            probs[te] = predict_probs(model, dec.images[te], pre)
            fold_of[te] = f
            accs.append(float((probs[te].argmax(1) == y[te]).mean()))
            log.info("label check: fold %d/%d held-out accuracy %.4f", f + 1, folds, accs[-1])
    finally:
        bar.close()
    settings = {
        "folds": folds,
        "seed": seed,
        "model": cfg.model,
        "img_size": int(cfg.img_size),
        "channels": int(pre.channels),
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "augment": cfg.augment,
    }
    return OutOfFold(
        probs=probs[:, :k],
        labels=y,
        items=list(dec.items),
        classes=list(index.classes),
        fold=fold_of,
        fold_accuracy=accs,
        seconds=time.perf_counter() - t0,
        settings=settings,
        failed=list(dec.failed),
    )
