"""Transfer learning: start a model from another model's weights.

``--init-weights FILE`` loads every tensor whose name and shape match the new model from a
``.safetensors`` file, a bundle folder or a run folder (training checkpoints work too); the
rest (typically the classifier head when the class count differs, or the first dense layer when
the input size differs) keep their fresh initialisation. A first convolution trained on RGB is
adapted to greyscale input (and back), as timm's ``adapt_input_conv`` does.

``--model timm:<name>`` builds any timm architecture through the imgclf registry when the
optional ``timm`` package is installed (``pip install 'imgclf[timm]'``); ``--pretrained`` then
starts from timm's published weights, which timm downloads on first use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf.models.timm import TIMM_PREFIX, is_timm, register_timm, require_timm
from imgclf.training.config import ConfigError

log = logging.getLogger("imgclf")


class TransferError(ConfigError):
    """Weights that cannot be used to initialise the model (the message says why and what to do)."""


@dataclass
class TransferReport:
    """What :func:`load_matching` did with each tensor of the target model."""

    source: str
    loaded: list[str] = field(default_factory=list)  # same name and shape: copied
    adapted: list[str] = field(default_factory=list)  # input conv converted between 1 and 3 channels
    reinitialised: list[str] = field(default_factory=list)  # kept the fresh init (shape differs or missing)
    unused: list[str] = field(default_factory=list)  # source tensors with no counterpart

    def summary(self) -> str:
        s = f"init weights {self.source}: loaded {len(self.loaded) + len(self.adapted)} tensor(s)"
        if self.adapted:
            s += f" ({len(self.adapted)} adapted to the channel count)"
        if self.reinitialised:
            s += f"; re-initialised {len(self.reinitialised)}: {', '.join(self.reinitialised[:6])}"
            if len(self.reinitialised) > 6:
                s += ", ..."
        return s


def weights_file(path: str | Path) -> Path:
    """The safetensors file behind ``path``: a file, a bundle folder or a run folder."""
    from imgclf.runtime.bundle import WEIGHTS, resolve_bundle_dir

    p = Path(path)
    if p.is_dir():
        d = resolve_bundle_dir(p)
        for cand in (d / WEIGHTS, p / "checkpoints" / "best.safetensors"):
            if cand.exists():
                return cand
        raise TransferError(
            f"--init-weights {p}: folder holds no {WEIGHTS} (nor model/{WEIGHTS}); "
            "give a .safetensors file, a bundle folder or a run folder"
        )
    if not p.exists():
        raise TransferError(f"--init-weights {p}: no such file; give a .safetensors file or a bundle folder")
    return p


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file/bundle/run; a training checkpoint's ``model/`` part only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = weights_file(path)
    try:
        sd = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise TransferError(
            f"--init-weights {f}: not a safetensors file ({e}). Convert a PyTorch .pt with "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
        ) from e
    if any(k.startswith("model/") for k in sd):  # imgclf checkpoints: model/, optim/, rng/
        sd = {k[len("model/") :]: v for k, v in sd.items() if k.startswith("model/")}
    return sd


def _adapt_input_conv(src: torch.Tensor, target_shape: torch.Size) -> torch.Tensor | None:
    """Convert a conv kernel between 1 and 3 input channels; None when that is not the mismatch."""
    if src.ndim != 4 or len(target_shape) != 4:
        return None
    if src.shape[0] != target_shape[0] or src.shape[2:] != target_shape[2:]:
        return None
    cin_s, cin_t = src.shape[1], target_shape[1]
    if cin_s == 3 and cin_t == 1:
        # A grey image fed as RGB has three equal channels: the RGB conv equals the summed kernel.
        return src.sum(1, keepdim=True)
    if cin_s == 1 and cin_t == 3:
        return src.repeat(1, 3, 1, 1) / 3.0
    return None


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> TransferReport:
    """Copy tensors of ``state`` into ``model`` where name and shape match; report the rest.

    Raises :class:`TransferError` when nothing matches (wrong architecture).
    """
    report = TransferReport(source)
    target = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    for name, t in target.items():
        s = state.get(name)
        if s is None:
            report.reinitialised.append(name)
            continue
        if s.shape == t.shape:
            new[name] = s.to(t.dtype)
            report.loaded.append(name)
            continue
        adapted = _adapt_input_conv(s, t.shape) if t.is_floating_point() else None
        if adapted is not None:
            new[name] = adapted.to(t.dtype)
            report.adapted.append(name)
        else:
            report.reinitialised.append(name)
    report.unused = [k for k in state if k not in target]
    # Only count parameters: matching a lone BN counter (num_batches_tracked) is not a match.
    if not any(not n.endswith("num_batches_tracked") for n in report.loaded + report.adapted):
        arch = getattr(model, "arch", type(model).__name__)
        raise TransferError(
            f"--init-weights {source}: no layer matches {arch} by name and shape "
            f"(source layers: {', '.join(list(state)[:4])}...). Use weights trained with the same --model."
        )
    model.load_state_dict(new, strict=False)
    return report


def load_init_weights(model: nn.Module, path: str | Path) -> TransferReport:
    """Load matching layers from a safetensors file, bundle or run folder into ``model``."""
    f = weights_file(path)
    return load_matching(model, read_weights(f), str(f))


# ----------------------------------------------------------------------------- timm adapter


def load_timm_pretrained(model: nn.Module, name: str) -> TransferReport:
    """Copy timm's pretrained weights for ``timm:<arch>`` into ``model`` (head re-initialised)."""
    timm = require_timm()
    arch = name[len(TIMM_PREFIX) :]
    args = getattr(model, "arch_args", {})
    try:
        src = timm.create_model(
            arch,
            pretrained=True,
            num_classes=args.get("num_classes", 1000),
            in_chans=args.get("in_channels", 3),
        )
    except Exception as e:  # timm raises many kinds (HTTP, hub, missing cfg): all mean "no weights"
        raise ConfigError(
            f"--pretrained: could not get timm's pretrained weights for {arch} ({type(e).__name__}: {e}). "
            "timm downloads them on first use: run once online, or give --init-weights FILE.safetensors"
        ) from e
    return load_matching(model, src.state_dict(), f"timm:{arch} (pretrained)")


def check_config(cfg: Any) -> None:
    """Fail fast, before any data is decoded: timm available, init-weights file readable."""
    if is_timm(cfg.model):
        register_timm(cfg.model)
    elif cfg.pretrained:
        raise ConfigError(
            f"--pretrained works with --model timm:<name> only (got {cfg.model!r}); "
            "for a built-in model give --init-weights FILE.safetensors"
        )
    if cfg.init_weights:
        weights_file(cfg.init_weights)


def init_model(model: nn.Module, cfg: Any) -> list[TransferReport]:
    """Apply ``cfg.pretrained`` then ``cfg.init_weights`` to a freshly built model; logs a summary."""
    reports = []
    if cfg.pretrained and is_timm(cfg.model):
        reports.append(load_timm_pretrained(model, cfg.model))
    if cfg.init_weights:
        reports.append(load_init_weights(model, cfg.init_weights))
    for r in reports:
        log.info(r.summary())
    return reports
