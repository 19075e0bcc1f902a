"""The model bundle: ``model.safetensors`` + ``model.json``. No pickle anywhere.

Loading verifies the weights' sha256 and gives a clear :class:`BundleError` for a missing,
truncated or foreign file. Every stage after training predicts through :class:`Bundle`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .imageio import ImageSource
from .preprocess import Preprocess, array_to_uint8, load_uint8, normalize

FORMAT = "imgclf-bundle"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the file and the fix."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import PIL

    from . import __version__

    v = {
        "imgclf": __version__,
        "torch": torch.__version__.split("+")[0],
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }
    return v


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def state_dict_bytes(model: torch.nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return save(sd, metadata=metadata)


def save_bundle(
    out_dir: str | Path,
    model: torch.nn.Module,
    pre: Preprocess,
    classes: Sequence[str],
    *,
    train_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/model.json``; returns ``out_dir``."""
    out = Path(out_dir)
    blob = state_dict_bytes(model)
    atomic_write_bytes(out / WEIGHTS, blob)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {"name": model.arch, "args": model.arch_args},
        "classes": list(classes),
        "input": {"size": list(pre.size), "channels": pre.channels, "color_mode": pre.color_mode},
        "preprocess": pre.to_dict(),
        "metrics": metrics or {},
        "train_config": train_config or {},
        "versions": versions(),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        meta.update(extra)
    atomic_write_bytes(out / META, (json.dumps(meta, indent=2) + "\n").encode())
    return out


def resolve_bundle_dir(path: str | Path) -> Path:
    """Accept the bundle folder, its model.json, or a run folder holding ``model/``."""
    p = Path(path)
    if p.is_file() and p.name == META:
        return p.parent
    if p.is_dir() and not (p / META).exists() and (p / "model" / META).exists():
        return p / "model"
    return p


@dataclass
class Bundle:
    """A loaded bundle: the eval-mode network, its preprocessing and class names."""

    path: Path
    model: torch.nn.Module
    pre: Preprocess
    classes: list[str]
    meta: dict[str, Any]
    _batch: int = field(default=64, repr=False)

    @property
    def sha256(self) -> str:
        return self.meta["weights_sha256"]

    def prepare(self, src: ImageSource | np.ndarray, **kw: Any) -> np.ndarray:
        """Any image source -> uint8 (H, W, C) at the model's size, by the recorded recipe."""
        if isinstance(src, np.ndarray):
            return array_to_uint8(src, self.pre)
        return load_uint8(src, self.pre, **kw)

    @torch.inference_mode()
    def logits(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = normalize(torch.as_tensor(batch), self.pre)
        return self.model(x)

    @torch.inference_mode()
    def predict_batch(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 NHWC batch -> class probabilities (N, K) as float32 numpy."""
        from .models import logits_to_probs

        outs = []
        for s in range(0, len(batch), self._batch):
            outs.append(logits_to_probs(self.logits(batch[s : s + self._batch])).float().numpy())
        if not outs:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.concatenate(outs)

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[dict[str, Any]]:
        """One result dict per row: label, probability, and the top-k list."""
        k = max(1, min(k, len(self.classes)))
        res = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]
            top = [{"label": self.classes[i], "probability": float(row[i])} for i in order]
            res.append({"label": top[0]["label"], "probability": top[0]["probability"], "top_k": top})
        return res

    def predict(self, images: ImageSource | np.ndarray | Sequence[Any], top_k: int = 5) -> list[dict]:
        """Predict paths, bytes, PIL images or arrays; one result dict per image."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        batch = np.stack([self.prepare(im) for im in images])
        return self.top_k(self.predict_batch(batch), top_k)


def load_bundle(path: str | Path) -> Bundle:
    """Load and verify a bundle folder (or run folder, or model.json path)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from .models import UnknownModelError, create_model

    d = resolve_bundle_dir(path)
    if not d.exists():
        raise BundleError(f"{d}: no such bundle. Give the folder holding {META} and {WEIGHTS}.")
    meta_p, w_p = d / META, d / WEIGHTS
    if not meta_p.exists():
        raise BundleError(f"{meta_p}: missing. Is {d} an imgclf bundle (a run's model/ folder)?")
    try:
        meta = json.loads(meta_p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_p}: not valid JSON ({e}); the file is damaged") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{meta_p}: not an imgclf bundle (format field missing or foreign)")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(
            f"{meta_p}: bundle format {meta['format_version']} is newer than this imgclf "
            f"supports ({FORMAT_VERSION}); upgrade imgclf"
        )
    if not w_p.exists():
        raise BundleError(f"{w_p}: missing weights file")
    blob = w_p.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.get("weights_sha256"):
        raise BundleError(
            f"{w_p}: sha256 {digest[:12]}... does not match model.json "
            f"({str(meta.get('weights_sha256'))[:12]}...): truncated or replaced; re-export the bundle"
        )
    try:
        sd = load(blob)
    except (SafetensorError, ValueError, OSError) as e:
        raise BundleError(f"{w_p}: not a safetensors file ({e})") from e
    arch = meta["architecture"]
    try:
        model = create_model(arch["name"], **arch["args"])
    except UnknownModelError as e:
        raise BundleError(f"{meta_p}: {e}") from e
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{w_p}: weights do not fit architecture {arch['name']}: {e}") from e
    model.eval().to(memory_format=torch.channels_last)
    pre = Preprocess.from_dict(meta["preprocess"])
    return Bundle(d, model, pre, list(meta["classes"]), meta)
