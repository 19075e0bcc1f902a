"""The training loop: data -> model -> callbacks -> checkpoints -> bundle.

One entry, :func:`train`. Everything it decides comes from a :class:`TrainConfig`; the run
folder receives ``model/`` (the bundle), ``history.csv``, ``metrics.json``, ``plot.png``,
``splits.json``, ``config.json``, ``train.log``, TensorBoard events and checkpoints.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.core.errors import TrainingError
from imgclf.core.preprocess import Preprocess, normalize
from imgclf.data import sources as D
from imgclf.data.augment import Augment
from imgclf.models.registry import create_model, get_spec, logits_to_probs, num_outputs
from imgclf.runtime.bundle import atomic_write_bytes, save_bundle
from imgclf.training.config import ConfigError, TrainConfig

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
    fh = logging.FileHandler(run_dir / "train.log")
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
    """Fill 'auto' values that depend on the data (model, size, channels, augmentation, splits)."""
    builtin = index.kind in ("idx", "digits")
    grey = index.native_channels == 1
    model = cfg.model or ("lenet" if grey and builtin else "smallervggnet")
    spec = get_spec(model)
    changes: dict[str, Any] = {"model": model}
    if cfg.img_size is None:
        changes["img_size"] = spec.default_size
    if cfg.channels is None:
        changes["channels"] = 1 if grey else 3
    if cfg.test_split is None:
        changes["test_split"] = 0.2 if index.kind == "digits" else 0.0
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
    return cfg.replace(**changes)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # BatchNorm weights and all biases are 1-D: decaying them hurts accuracy.
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
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


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Model + optimizer tensors in safetensors, everything else as JSON metadata; atomic."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {
        f"model/{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()
    }
    osd = opt.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pid}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}/{k}"] = v
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in osd["param_groups"]
    ]
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {"state": json.dumps(state), "param_groups": json.dumps(groups), "scalars": json.dumps(scalars)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, pid, name = k.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    for k, v in json.loads(meta["scalars"]).items():
        pid, name = k.split("/", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    # Fused optimizers walk raw memory, so state loaded as contiguous NCHW next to a
    # channels_last parameter would pair the wrong elements: give it the parameter's layout.
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p).copy_(v)
    torch.set_rng_state(tensors["rng/torch"])
    return json.loads(meta["state"])


# --------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate_arrays(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, pre: Preprocess, batch: int = 256
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on uint8 NHWC arrays."""
    model.eval()
    n = len(labels)
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    total_loss, correct = 0.0, 0
    dev = next(model.parameters()).device
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels)
    for s in range(0, n, batch):
        x = normalize(x_all[s : s + batch].to(dev), pre)
        y = y_all[s : s + batch].to(dev)
        probs = logits_to_probs(model(x)).clamp_min(1e-12)
        total_loss += float(F.nll_loss(probs.log(), y, reduction="sum"))
        correct += int((probs.argmax(1) == y).sum())
    return {"loss": total_loss / n, "accuracy": correct / n}


# --------------------------------------------------------------------------- outputs


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


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0].keys()))
        w.writeheader()
        w.writerows(history)


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
    x_all: torch.Tensor,
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
    if device is not None and device.type != "cpu":
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float()
    if aug is not None:
        x = aug(x, gen)
    return normalize(x.permute(0, 2, 3, 1), pre), y


def epoch_batches(
    x_all: torch.Tensor,
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


def prepare_data(cfg: TrainConfig, index: D.SourceIndex, pre: Preprocess, progress: bool) -> dict[str, Any]:
    """Split and decode: returns {'train'|'val'|'test': Decoded, 'splits': {name: [items]}, ...}."""
    groups = None
    report: dict[str, Any] = {}
    usable = np.arange(len(index))
    if index.kind == "folder" and cfg.dedup != "off":
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
            sub = D.split_indices(index.labels[tr], {"val": cfg.val_split}, cfg.seed, g)
            parts["train"], parts["val"] = tr[sub["train"]], tr[sub["val"]]
    else:
        fr = {"val": cfg.val_split}
        if cfg.test_split:
            fr["test"] = cfg.test_split
        sub = D.split_indices(index.labels[usable], fr, cfg.seed, groups)
        parts = {k: usable[v] for k, v in sub.items()}
    if cfg.subset:
        tr = parts["train"]
        parts["train"] = tr[D.stratified_subset(index.labels[tr], cfg.subset, cfg.seed)]
        for k in ("val", "test"):
            if k in parts and len(parts[k]) > cfg.subset:
                parts[k] = parts[k][D.stratified_subset(index.labels[parts[k]], cfg.subset, cfg.seed)]
    out: dict[str, Any] = {"report": report, "failed": list(index.skipped)}
    for name, idx in parts.items():
        dec = D.decode_items(
            index,
            idx,
            pre,
            cache_dir=cfg.cache_dir,
            workers=cfg.workers,
            max_pixels=cfg.max_pixels,
            progress=progress,
            desc=f"decode {name}",
        )
        out[name] = dec
        out["failed"].extend(dec.failed)
    out["splits"] = {name: [index.relpath(i) for i in out[name].items] for name in parts}
    return out


def train(cfg: TrainConfig, *, progress: bool | None = None) -> TrainResult:
    """Train ``cfg`` into the run folder ``cfg.out``; refuses to overwrite an existing run."""
    run_dir = Path(cfg.out)
    if (run_dir / "model").exists() or (run_dir / "checkpoints").exists():
        raise TrainingError(
            f"{run_dir} already holds a run. Use --resume {run_dir} to continue it, or choose another --out."
        )
    if cfg.ray_workers:
        from imgclf.training.distributed import train_distributed  # only here: nothing else imports Ray

        return train_distributed(cfg.validate(), progress=progress)
    return _run(cfg.validate(), run_dir, progress, resuming=False)


def resume(run_dir: str | Path, *, epochs: int | None = None, progress: bool | None = None) -> TrainResult:
    """Continue an interrupted run from ``run_dir/checkpoints/last.safetensors``.

    ``epochs`` raises the total epoch count (to train longer than first planned).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints" / "last.safetensors").exists():
        raise TrainingError(f"{run_dir}: no checkpoints/last.safetensors to resume from")
    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    if epochs is not None:
        cfg = cfg.replace(epochs=epochs)
    if cfg.ray_workers:
        from imgclf.training.distributed import train_distributed

        return train_distributed(cfg.validate(), progress=progress, resuming=True)
    return _run(cfg.validate(), run_dir, progress, resuming=True)


def _run(
    cfg: TrainConfig, run_dir: Path, progress: bool | None, resuming: bool, dist: DistContext | None = None
) -> TrainResult:
    from tqdm import tqdm

    if progress is None:
        progress = sys.stderr.isatty()
    dist = dist or DistContext()
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = _setup_logging(run_dir) if dist.is_main else None
    try:
        return _train(cfg, run_dir, progress, resuming, tqdm, dist)
    finally:
        if fh is not None:
            log.removeHandler(fh)
            fh.close()


def _train(
    cfg: TrainConfig, run_dir: Path, progress: bool, resuming: bool, tqdm: Any, dist: DistContext
) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    from imgclf.training.transfer import check_config, init_model

    check_config(cfg)  # timm installed, --init-weights readable: fail before decoding data
    index = D.index_source(cfg.data, cfg.cache_dir)
    cfg = resolve_defaults(cfg, index)
    if dist.is_main:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    size = int(cfg.img_size)
    pre = Preprocess((size, size), int(cfg.channels), mean=tuple(cfg.mean or ()), std=tuple(cfg.std or ()))
    log.info(
        "data %s: %d items, %d classes; model %s at %dx%dx%d",
        index.name,
        len(index),
        len(index.classes),
        cfg.model,
        size,
        size,
        pre.channels,
    )
    # Built before decoding so a bad --model-args fails at once; nothing in between draws from
    # torch's RNG, so the initial weights are those of a model built after decoding.
    try:
        model = create_model(
            cfg.model,
            num_classes=len(index.classes),
            in_channels=pre.channels,
            img_size=size,
            **cfg.model_args,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--model {cfg.model} --model-args {json.dumps(cfg.model_args)}: {e}") from None
    ds = prepare_data(cfg, index, pre, progress)
    if ds["failed"] and dist.is_main:
        lines = [f"{p}\t{r}" for p, r in ds["failed"]]
        (run_dir / "skipped_files.txt").write_text("\n".join(lines) + "\n")
        log.warning(
            "skipped %d unreadable file(s); listed in %s (first: %s)",
            len(lines),
            run_dir / "skipped_files.txt",
            lines[0].replace("\t", ": "),
        )
    if dist.is_main:
        (run_dir / "splits.json").write_text(json.dumps(ds["splits"], indent=1) + "\n")
    tr, va, te = ds["train"], ds.get("val"), ds.get("test")
    if len(tr.labels) == 0:
        raise TrainingError("no readable training images left after decoding; see skipped_files.txt")
    log.info(
        "split: train %d, val %d, test %d",
        len(tr.labels),
        len(va.labels) if va else 0,
        len(te.labels) if te else 0,
    )

    classes = index.classes
    if not resuming:
        init_model(model, cfg)  # --init-weights / --pretrained (a resumed run loads its checkpoint)
    device = resolve_device(cfg.device)
    if dist.world_size > 1 and device.type != "cpu":
        raise ConfigError("--ray-workers trains on CPUs (gloo); leave --device at cpu")
    model = model.to(device=device, memory_format=torch.channels_last)
    if device.type != "cpu":
        log.info("training on %s", device)
    binary = num_outputs(len(classes), get_spec(cfg.model)) == 1
    opt = make_optimizer(model, cfg)
    aug = None
    if cfg.augment == "on":
        aug = Augment(cfg.rotation, cfg.shift, cfg.shear, cfg.zoom, flip=cfg.flip == "on", erase=cfg.erase)
    weights = None
    if cfg.class_weights == "auto":
        counts = np.bincount(tr.labels, minlength=len(classes)).astype(np.float64)
        w = counts.sum() / (len(classes) * np.maximum(counts, 1))
        weights = torch.tensor(w, dtype=torch.float32, device=device)
    ema = _EMA(model, cfg.ema) if cfg.ema > 0 else None
    step_model = dist.wrap_model(model)  # DDP when data-parallel: averages gradients across ranks
    if cfg.compile:
        step_model = torch.compile(model)

    bf16 = cfg.precision == "bf16"
    if bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("--precision bf16: this CPU has no native bf16 (AVX512-BF16/AMX); expect it to be slower")
    n = len(tr.labels)
    bs = min(cfg.batch_size, n)
    bs -= bs % dist.world_size  # equal shards per rank, so DDP's mean equals the global-batch mean
    steps_per_epoch = n // bs  # drop the last partial batch: BN is unstable on tiny batches
    total_steps = steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(cfg.seed)
    ck_dir = run_dir / "checkpoints"
    ck_dir.mkdir(exist_ok=True)
    history: list[dict[str, float]] = []
    state = {"epoch": 0, "step": 0, "best_val_loss": float("inf"), "best_epoch": 0, "bad_epochs": 0}
    plateau = {"best": float("inf"), "bad": 0, "scale": 1.0}
    if resuming:
        state = load_checkpoint(dist.resume_from or ck_dir / "last.safetensors", model, opt)
        gen.set_state(torch.tensor(state.pop("gen_state"), dtype=torch.uint8))
        plateau = state.pop("plateau")
        hist_csv = (dist.resume_from or ck_dir).parent / "history.csv"
        if hist_csv.exists():
            with open(hist_csv) as f:
                history = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
            history = history[: state["epoch"]]
        log.info("resuming %s from epoch %d", run_dir, state["epoch"])
        if ema is not None:
            ema = _EMA(model, cfg.ema)

    writer = None
    if cfg.tensorboard and dist.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            log.warning("tensorboard not installed: no TensorBoard logs (pip install tensorboard)")

    x_all = torch.from_numpy(tr.images)
    y_all = torch.from_numpy(tr.labels)
    # The schedule is a function of (config, step): base rates come from the config, never from
    # a restored optimizer, whose rates are already scaled (that applied the decay twice).
    base_lrs = [cfg.lr for _ in opt.param_groups]
    stop_reason = ""
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        model.train()
        t0 = time.time()
        perm = torch.randperm(n, generator=gen)
        # Ranks share `gen` for the permutation; each draws its augmentation from its own stream.
        aug_gen = gen
        if dist.world_size > 1:
            aug_gen = torch.Generator().manual_seed(cfg.seed + 7919 * epoch + dist.rank)
        run_loss, run_correct, seen = 0.0, 0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not progress,
            leave=False,
            unit="batch",
        )
        batches = epoch_batches(
            x_all,
            y_all,
            perm,
            bs,
            steps_per_epoch,
            pre,
            aug,
            aug_gen,
            dist.rank,
            dist.world_size,
            device=device,
        )
        for b, (x, yb) in zip(bar, batches):
            f = lr_factor(cfg, state["step"], total_steps, steps_per_epoch) * plateau["scale"]
            for g, lr0 in zip(opt.param_groups, base_lrs):
                g["lr"] = lr0 * f
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = step_model(x)
            out = out.float()
            if binary:
                loss = F.binary_cross_entropy_with_logits(
                    out[:, 0], yb.float(), weight=None if weights is None else weights[yb]
                )
                pred = (out[:, 0] > 0).long()
            else:
                loss = F.cross_entropy(out, yb, weight=weights, label_smoothing=cfg.label_smoothing)
                pred = out.argmax(1)
            finite = bool(torch.isfinite(loss))
            if dist.world_size > 1:  # every rank must stop at the same step, or the others hang
                finite = dist.all_reduce_sum([float(not finite)])[0] == 0
            if not finite:
                stop_reason = (
                    f"loss became {loss.item()} at epoch {epoch}, batch {b}: training diverged. "
                    f"Lower --lr (now {cfg.lr}) or check the data; the last good checkpoint is kept."
                )
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update(model)
            state["step"] += 1
            run_loss += loss.item() * len(yb)
            run_correct += int((pred == yb).sum())
            seen += len(yb)
            if progress and (b % 10 == 0 or b == steps_per_epoch - 1):
                bar.set_postfix(loss=f"{run_loss / seen:.4f}", acc=f"{run_correct / seen:.4f}")
        bar.close()
        batches.close()  # joins the prefetch thread (a NaN stop leaves one batch pending)
        if stop_reason:
            log.error("TerminateOnNaN: %s", stop_reason)
            break
        if dist.world_size > 1:
            run_loss, run_correct, seen = dist.all_reduce_sum([run_loss, float(run_correct), float(seen)])
        eval_model = ema.shadow if ema is not None else model
        vm = None
        if va and len(va.labels) and dist.is_main:
            vm = evaluate_arrays(eval_model, va.images, va.labels, pre)
        vm = dist.broadcast(vm)
        row = {
            "epoch": epoch,
            "train_loss": run_loss / max(seen, 1),
            "train_acc": run_correct / max(seen, 1),
            "val_loss": vm["loss"] if vm else float("nan"),
            "val_acc": vm["accuracy"] if vm else float("nan"),
            "lr": opt.param_groups[0]["lr"],
            "time_s": time.time() - t0,
        }
        history.append(row)
        val_part = f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}" if vm else ""
        log.info(
            "epoch %d/%d  loss %.4f  acc %.4f%s  lr %.2e  %.1fs (%.0f img/s)",
            epoch,
            cfg.epochs,
            row["train_loss"],
            row["train_acc"],
            val_part,
            row["lr"],
            row["time_s"],
            seen / max(row["time_s"], 1e-9),
        )
        if writer is not None:
            for k in (
                ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
                if vm
                else ("train_loss", "train_acc", "lr")
            ):
                writer.add_scalar(k.replace("_", "/", 1) if "_" in k else k, row[k], epoch)
            writer.flush()
        monitor = row["val_loss"] if vm else row["train_loss"]
        state["epoch"] = epoch
        if monitor < state["best_val_loss"]:
            # EarlyStopping counts only real improvements (min_delta 1e-4, as ReduceLROnPlateau)
            if monitor < state["best_val_loss"] - 1e-4:
                state["bad_epochs"] = 0
            else:
                state["bad_epochs"] += 1
            state["best_val_loss"], state["best_epoch"] = monitor, epoch
            from imgclf.runtime.bundle import state_dict_bytes

            if dist.is_main:
                atomic_write_bytes(ck_dir / "best.safetensors", state_dict_bytes(eval_model))
        else:
            state["bad_epochs"] += 1
        if cfg.reduce_lr_patience:
            if monitor < plateau["best"] - 1e-4:
                plateau["best"], plateau["bad"] = monitor, 0
            else:
                plateau["bad"] += 1
                if plateau["bad"] >= cfg.reduce_lr_patience:
                    plateau["scale"] *= cfg.reduce_lr_factor
                    plateau["bad"] = 0
                    log.info("ReduceLROnPlateau: lr scaled by %g", plateau["scale"])
        if dist.is_main:
            _write_history(run_dir / "history.csv", history)
            st = dict(state, gen_state=gen.get_state().tolist(), plateau=plateau)
            save_checkpoint(ck_dir / "last.safetensors", model, opt, st)
        dist.end_epoch(epoch, row, run_dir)
        if cfg.patience and state["bad_epochs"] >= cfg.patience:
            log.info("EarlyStopping: val loss did not improve for %d epochs", cfg.patience)
            break
    if writer is not None:
        writer.close()

    if not history:
        raise TrainingError(stop_reason or "no epoch completed")
    if not dist.is_main:
        return TrainResult(run_dir, run_dir / "model", {}, history)
    final = ema.shadow if ema is not None else model
    best_path = ck_dir / "best.safetensors"
    if cfg.keep == "best" and best_path.exists():
        from safetensors.torch import load_file

        final.load_state_dict(load_file(str(best_path)))
    final.eval()
    metrics: dict[str, Any] = {
        "best_epoch": state["best_epoch"],
        "epochs_run": len(history),
        "train_time_s": round(sum(h["time_s"] for h in history), 2),
        "wall_time_s": round(time.time() - t_start, 2),
        "stopped_early": bool(stop_reason) or len(history) < cfg.epochs,
    }
    for name, dec in (("val", va), ("test", te)):
        if dec is not None and len(dec.labels):
            m = evaluate_arrays(final, dec.images, dec.labels, pre)
            metrics[f"{name}_loss"], metrics[f"{name}_accuracy"] = m["loss"], m["accuracy"]
            metrics[f"{name}_size"] = len(dec.labels)
    if stop_reason:
        metrics["stop_reason"] = stop_reason
    final = final.cpu()  # bundles are device-free: predict/serve/export run on the CPU
    bundle_dir = save_bundle(
        run_dir / "model",
        final,
        pre,
        classes,
        train_config=cfg.to_dict(),
        metrics=metrics,
        extra={"run_dir": str(run_dir.resolve()), "data_source": index.name},
    )
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_plot(history, run_dir / "plot.png", f"{cfg.model} on {Path(index.name).name}")
    summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("val_accuracy", "test_accuracy") if k in metrics)
    log.info("done in %.1fs: %s; bundle %s", metrics["wall_time_s"], summary, bundle_dir)
    return TrainResult(run_dir, bundle_dir, metrics, history)
