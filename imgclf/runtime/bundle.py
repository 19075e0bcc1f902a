"""The model bundle: ``model.safetensors`` + ``model.json``. No pickle anywhere.

Loading verifies the weights' sha256 and gives a clear :class:`BundleError` for a missing,
truncated or foreign file. Every stage after training predicts through :class:`Bundle`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf.core.errors import BundleError
from imgclf.core.files import atomic_write_bytes
from imgclf.core.imageio import ImageSource
from imgclf.core.preprocess import Preprocess, array_to_uint8, load_uint8, normalize
from imgclf.runtime.calibration import check_calibration
from imgclf.runtime.multilabel import check_thresholds

log = logging.getLogger("imgclf")

BACKENDS = ("auto", "torch", "onnxruntime")
BACKEND_ENV = "IMGCLF_BACKEND"
FORMAT = "imgclf-bundle"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import PIL

    from imgclf.core.version import __version__

    v = {
        "imgclf": __version__,
        "torch": torch.__version__.split("+")[0],
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }
    return v


def state_dict_bytes(
    model: torch.nn.Module,
    metadata: dict[str, str] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """The model's weights (plus ``extra_tensors``, e.g. the ``ood.*`` scorer arrays) as safetensors."""
    from safetensors.torch import save

    sd = {
        k: v.detach().contiguous().cpu() for k, v in {**model.state_dict(), **(extra_tensors or {})}.items()
    }
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
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/model.json``; returns ``out_dir``.

    ``extra_tensors`` (names starting ``ood.``) are stored beside the weights and covered by the hash.
    """
    out = Path(out_dir)
    blob = state_dict_bytes(model, extra_tensors=extra_tensors)
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


def update_meta(bundle: Bundle, **changes: Any) -> None:
    """Rewrite the bundle's ``model.json`` with ``changes`` (atomically); the weights stay as they are."""
    if bundle.model is None:
        raise BundleError(f"{bundle.path}: an exported .onnx file has no model.json to update")
    meta = {**bundle.meta, **changes}
    check_meta(meta, str(bundle.path / META))
    bundle.temperature = check_calibration(meta, str(bundle.path / META))
    bundle.thresholds = check_thresholds(meta, str(bundle.path / META))
    atomic_write_bytes(bundle.path / META, (json.dumps(meta, indent=2) + "\n").encode())
    bundle.meta = meta
    bundle._runner = None  # the ORT graph holds the old values


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
    """A loaded bundle: the eval-mode network, its preprocessing and class names.

    ``backend`` is how :meth:`predict_batch` runs: ``"onnxruntime"`` (an ORT session over the
    exported graph, built on first use) or ``"torch"`` (PyTorch eager). ``model`` is None for a
    bundle loaded from an exported ``.onnx`` file. ``temperature`` (from ``model.json``'s
    ``calibration``) divides the logits in every prediction path, the exported graph included.
    """

    path: Path
    model: torch.nn.Module | None
    pre: Preprocess
    classes: list[str]
    meta: dict[str, Any]
    temperature: float = 1.0
    # The unknown-image scorer (runtime.ood) and its threshold: score > threshold means "unknown".
    # An exported .onnx bundle has the threshold but no scorer object: the graph computes the score.
    ood: Any = None
    ood_threshold: float | None = None
    # Multi-label bundles: one decision threshold per label (model.json 'thresholds'); None otherwise.
    thresholds: np.ndarray | None = None
    _batch: int = field(default=64, repr=False)
    # ONNX Runtime's memory arena (faster repeated batches; keeps its peak). The server turns it off.
    ort_arena: bool = field(default=True, repr=False)
    backend: str = "torch"
    # True when the backend was chosen automatically: an ORT failure then falls back to eager.
    _auto: bool = field(default=False, repr=False)
    _runner: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def sha256(self) -> str:
        return self.meta["weights_sha256"]

    @property
    def multi_label(self) -> bool:
        """One sigmoid probability per label, thresholded per label (``model.json`` task multi-label)."""
        return self.thresholds is not None

    def prepare(self, src: ImageSource | np.ndarray, **kw: Any) -> np.ndarray:
        """Any image source -> uint8 (H, W, C) at the model's size, by the recorded recipe."""
        if isinstance(src, np.ndarray):
            return array_to_uint8(src, self.pre)
        return load_uint8(src, self.pre, **kw)

    @torch.inference_mode()
    def logits(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw network output in PyTorch eager (needs the bundle folder, not an .onnx file)."""
        if self.model is None:
            raise BundleError(
                f"{self.path}: an exported .onnx model gives probabilities only; load the bundle folder"
            )
        x = normalize(torch.as_tensor(batch), self.pre)
        return self.model(x)

    def _ort(self) -> Any:
        """The ORT runner, built once (thread-safe); None when running in eager."""
        if self.backend != "onnxruntime":
            return None
        if self._runner is None:
            with self._lock:
                if self._runner is None and self.backend == "onnxruntime":
                    try:
                        from imgclf.runtime.graph import cached_onnx_bytes
                        from imgclf.runtime.onnxrt import OrtRunner

                        self._runner = OrtRunner(cached_onnx_bytes(self), arena=self.ort_arena)
                    except Exception as e:
                        if not self._auto:
                            raise BundleError(
                                f"{self.path}: cannot run with onnxruntime ({e}); "
                                f"set {BACKEND_ENV}=torch to use PyTorch"
                            ) from e
                        warnings.warn(
                            f"{self.path}: onnxruntime unavailable ({e}); using PyTorch", stacklevel=3
                        )
                        self.backend = "torch"
        return self._runner

    def predict_batch(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 NHWC batch -> class probabilities (N, K) as float32 numpy."""
        return self._run(batch, scored=False)[0]

    def predict_scored(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 NHWC batch -> (probabilities (N, K), unknown-image scores (N,) or None when the
        bundle has no rejection configured). A score above :attr:`ood_threshold` means unknown."""
        return self._run(batch, scored=self.ood_threshold is not None)

    def _run(self, batch: np.ndarray | torch.Tensor, scored: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if len(batch) == 0:
            empty = np.zeros((0, len(self.classes)), dtype=np.float32)
            return empty, (np.zeros(0, dtype=np.float32) if scored else None)
        if isinstance(batch, torch.Tensor):
            batch = batch.cpu().numpy()
        runner = self._ort()
        if runner is not None and (batch.dtype != np.uint8 and self.model is None):
            # The exported graph takes uint8; float 0-255 input is rounded the way PIL would.
            batch = np.clip(np.rint(batch), 0, 255).astype(np.uint8)
        if runner is None or batch.dtype != np.uint8:
            return self._predict_eager(batch, scored)
        outs = [runner.run(batch[s : s + self._batch], scored) for s in range(0, len(batch), self._batch)]
        probs = np.concatenate([o[0] for o in outs])
        return probs, (np.concatenate([o[1] for o in outs]) if scored else None)

    @torch.inference_mode()
    def _predict_eager(self, batch: np.ndarray, scored: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        from imgclf.models.registry import logits_to_probs
        from imgclf.runtime.ood import FeaturesAndLogits

        if self.model is None:
            raise BundleError(f"{self.path}: an exported .onnx model takes uint8 images only")
        both = FeaturesAndLogits(self.model) if scored else None
        probs, scores = [], []
        for s in range(0, len(batch), self._batch):
            x = normalize(torch.as_tensor(batch[s : s + self._batch]), self.pre)
            if both is not None:
                feats, logits = both(x)
                scores.append(self.ood(feats, logits).float().numpy())
            else:
                logits = self.model(x)
            probs.append(logits_to_probs(logits, self.temperature, self.multi_label).float().numpy())
        return np.concatenate(probs), (np.concatenate(scores) if scored else None)

    def unknown_fields(self, score: float | None) -> dict[str, Any]:
        """The ``unknown`` / ``ood_score`` fields every prediction carries (null when not configured)."""
        if self.ood_threshold is None or score is None:
            return {"unknown": None, "ood_score": None, "ood": "no unknown-image rejection in this bundle"}
        return {"unknown": bool(score > self.ood_threshold), "ood_score": float(score)}

    def top_k(self, probs: np.ndarray, k: int = 5, scores: np.ndarray | None = None) -> list[dict[str, Any]]:
        """One result dict per row: label (always the best class), probability, the top-k list, and
        ``unknown`` / ``ood_score`` (see :meth:`unknown_fields`).

        Multi-label bundles give ``labels`` (the predicted set, most probable first) and
        ``probabilities`` (every label's) instead.
        """
        if self.thresholds is not None:
            from imgclf.runtime.multilabel import label_fields

            return [label_fields(row, self.thresholds, self.classes) for row in probs]
        k = max(1, min(k, len(self.classes)))
        res = []
        for j, row in enumerate(probs):
            order = np.argsort(-row, kind="stable")[:k]
            top = [{"label": self.classes[i], "probability": float(row[i])} for i in order]
            r = {"label": top[0]["label"], "probability": top[0]["probability"], "top_k": top}
            res.append({**r, **self.unknown_fields(None if scores is None else float(scores[j]))})
        return res

    def predict(self, images: ImageSource | np.ndarray | Sequence[Any], top_k: int = 5) -> list[dict]:
        """Predict paths, bytes, PIL images or arrays; one result dict per image."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        batch = np.stack([self.prepare(im) for im in images])
        probs, scores = self.predict_scored(batch)
        return self.top_k(probs, top_k, scores)


def resolve_backend(backend: str | None) -> tuple[str, bool]:
    """(backend, chosen automatically). None means $IMGCLF_BACKEND, else ``auto``.

    ``auto`` picks onnxruntime when it is installed: measured on smallervggnet 96x96 it is
    about 4x faster than eager for one image and 2x for a batch of 64 (docs/EXPORT.md).
    """
    from imgclf.runtime import onnxrt

    b = (backend or os.environ.get(BACKEND_ENV, "") or "auto").strip().lower()
    if b not in BACKENDS:
        src = f"{BACKEND_ENV}={b}" if backend is None else f"backend={b!r}"
        raise BundleError(f"{src}: unknown inference backend; choose one of {', '.join(BACKENDS)}")
    if b == "auto":
        return ("onnxruntime" if onnxrt.available() else "torch"), True
    if b == "onnxruntime" and not onnxrt.available():
        raise BundleError("backend onnxruntime asked for but not installed: pip install onnxruntime")
    return b, False


def _load_onnx(p: Path, backend: str | None) -> Bundle:
    """A Bundle over an exported .onnx file: preprocessing and classes from its metadata."""
    from imgclf.runtime import onnxrt

    if backend not in (None, "auto", "onnxruntime"):
        raise BundleError(f"{p}: an .onnx file runs with onnxruntime only, not backend {backend!r}")
    if not onnxrt.available():
        raise BundleError(f"{p}: running an .onnx file needs onnxruntime: pip install onnxruntime")
    try:
        props = onnxrt.read_metadata(p)
        meta = onnxrt.parse_imgclf_metadata(props, str(p))
        runner = onnxrt.OrtRunner(p)
    except ValueError as e:
        raise BundleError(str(e)) from e
    except Exception as e:  # onnx.DecodeError, ORT's InvalidGraph/Fail: all mean a bad file
        raise BundleError(f"{p}: not a loadable ONNX model ({type(e).__name__}: {e})") from e
    pre = check_preprocess(meta.get("preprocess"), str(p))
    check_classes(meta.get("classes"), str(p))
    h, w = pre.size
    if runner.input_type != "tensor(uint8)" or runner.input_shape[1:] != [h, w, pre.channels]:
        raise BundleError(
            f"{p}: graph input is {runner.input_type} {runner.input_shape}, expected uint8 "
            f"[batch, {h}, {w}, {pre.channels}]; re-export it with `imgclf export`"
        )
    meta.update(format=FORMAT, source="onnx", input={"size": [h, w], "channels": pre.channels})
    # The graph already divides by this temperature; it is kept to tell the user and to undo it.
    t = check_calibration(meta, str(p))
    threshold = check_ood_threshold(meta, str(p))
    if threshold is not None and runner.score_name is None:
        raise BundleError(f"{p}: metadata names an unknown-image threshold but the graph has no score output")
    thresholds = check_thresholds(meta, str(p))
    classes = list(meta["classes"])
    b = Bundle(p, None, pre, classes, meta, t, None, threshold, thresholds, backend="onnxruntime")
    b._runner = runner
    return b


# Largest input side a bundle may ask for: 4096x4096x3 floats are 200 MB per image already.
MAX_INPUT_SIDE = 4096
RESIZE_METHODS = ("bilinear", "bicubic", "nearest", "area", "lanczos")


def _finite_numbers(v: Any, n: int | None = None) -> bool:
    ok = isinstance(v, list) and all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v
    )
    return ok and (n is None or len(v) == n)


def check_preprocess(pre: Any, where: str) -> Preprocess:
    """A bundle's or export's ``preprocess`` record, validated, as a :class:`Preprocess`."""
    if not isinstance(pre, dict):
        raise BundleError(f"{where}: 'preprocess' is missing or not a mapping; re-export the bundle")
    size, ch = pre.get("size"), pre.get("channels")
    if ch not in (1, 3):
        raise BundleError(f"{where}: preprocess.channels={ch!r}; expected 1 or 3")
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and 8 <= x <= MAX_INPUT_SIDE for x in size)
    ):
        raise BundleError(
            f"{where}: preprocess.size={size!r}; expected [height, width], each 8..{MAX_INPUT_SIDE} pixels"
        )
    if pre.get("resize", "bilinear") not in RESIZE_METHODS:
        raise BundleError(
            f"{where}: preprocess.resize={pre.get('resize')!r}; expected one of {RESIZE_METHODS}"
        )
    scale = pre.get("scale", 1 / 255)
    if not _finite_numbers([scale]) or scale <= 0:
        raise BundleError(f"{where}: preprocess.scale={scale!r}; expected a positive number")
    for key in ("mean", "std"):
        if key in pre and not _finite_numbers(pre[key], ch):
            raise BundleError(f"{where}: preprocess.{key}={pre[key]!r}; expected {ch} finite number(s)")
    if "std" in pre and any(x <= 0 for x in pre["std"]):
        raise BundleError(f"{where}: preprocess.std={pre['std']!r}; every value must be > 0")
    return Preprocess.from_dict(pre)


def check_classes(classes: Any, where: str) -> list[str]:
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise BundleError(f"{where}: 'classes' must be a list of at least 2 names; got {str(classes)[:80]}")
    if len(set(classes)) != len(classes):
        raise BundleError(f"{where}: 'classes' has duplicate names")
    return list(classes)


def check_meta(meta: dict[str, Any], where: str) -> tuple[Preprocess, list[str], dict[str, Any]]:
    """Schema of ``model.json``: (preprocessing, class names, architecture record), or a BundleError."""
    classes = check_classes(meta.get("classes"), where)
    pre = check_preprocess(meta.get("preprocess"), where)
    arch = meta.get("architecture")
    if not (
        isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(arch.get("args"), dict)
    ):
        raise BundleError(
            f"{where}: 'architecture' must be {{'name': str, 'args': {{...}}}}; re-export the bundle"
        )
    args = arch["args"]
    if args.get("num_classes", len(classes)) != len(classes):
        raise BundleError(
            f"{where}: {len(classes)} class names but the network was built for {args.get('num_classes')}; "
            "the classes list was edited or the bundle mixed up"
        )
    for key, want in (("in_channels", pre.channels), ("img_size", list(pre.size))):
        got = args.get(key, want)
        if (list(got) if isinstance(got, list | tuple) else got) != want:
            raise BundleError(f"{where}: architecture.args.{key}={got!r} contradicts preprocess ({want!r})")
    if bool(args.get("multi_label", False)) != (meta.get("task") == "multi-label"):
        raise BundleError(
            f"{where}: task={meta.get('task', 'single-label')!r} contradicts architecture.args.multi_label="
            f"{args.get('multi_label', False)!r}; the bundle was edited or mixed up"
        )
    if not isinstance(meta.get("weights_sha256"), str):
        raise BundleError(f"{where}: 'weights_sha256' is missing; re-export the bundle")
    return pre, classes, arch


def check_ood_threshold(meta: dict[str, Any], where: str) -> float | None:
    """The unknown-image threshold recorded in ``meta['ood']`` (None when there is none), or a BundleError."""
    rec = meta.get("ood")
    if rec is None:
        return None
    t = rec.get("threshold") if isinstance(rec, dict) else None
    if not (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)):
        raise BundleError(
            f"{where}: ood.threshold={t!r}; expected a finite number. Retrain, or delete the 'ood' block "
            "to predict without unknown-image rejection"
        )
    return float(t)


def load_ood(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> tuple[Any, float | None]:
    """(scorer, threshold) from ``model.json``'s ``ood`` block and the ``ood.*`` tensors; (None, None)."""
    threshold = check_ood_threshold(meta, where)
    if threshold is None:
        if tensors:
            raise BundleError(f"{where}: the weights hold ood.* arrays but model.json has no 'ood' block")
        return None, None
    from imgclf.runtime.ood import scorer_from_state

    return scorer_from_state(meta["ood"].get("scorer"), tensors, f"{where}: ood.scorer"), threshold


def load_bundle(path: str | Path, backend: str | None = None) -> Bundle:
    """Load and verify a bundle folder (or run folder, or model.json path), or an exported .onnx file.

    ``backend``: ``"auto"`` (onnxruntime when installed, else PyTorch), ``"torch"`` or
    ``"onnxruntime"``; None reads $IMGCLF_BACKEND and defaults to auto.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    from imgclf.core.errors import ConfigError
    from imgclf.models.registry import UnknownModelError, create_model

    if Path(path).suffix.lower() == ".onnx":
        if not Path(path).is_file():
            raise BundleError(f"{path}: no such ONNX file")
        return _load_onnx(Path(path), backend)
    chosen, auto = resolve_backend(backend)
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
    if not isinstance(meta.get("format_version", 0), int):
        raise BundleError(f"{meta_p}: format_version={meta.get('format_version')!r} is not a number")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(
            f"{meta_p}: bundle format {meta['format_version']} is newer than this imgclf "
            f"supports ({FORMAT_VERSION}); upgrade imgclf"
        )
    pre, classes, arch = check_meta(meta, str(meta_p))
    temperature = check_calibration(meta, str(meta_p))
    thresholds = check_thresholds(meta, str(meta_p))
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
    bad = [k for k, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise BundleError(
            f"{w_p}: {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]}); retrain or re-export"
        )
    try:
        if str(arch["name"]).startswith("timm:"):
            from imgclf.models.timm import register_timm  # timm models enter the registry on demand

            register_timm(arch["name"])
        model = create_model(arch["name"], **arch["args"])
    except (UnknownModelError, ConfigError) as e:  # ConfigError: timm needed but missing
        raise BundleError(f"{meta_p}: {e}") from e
    except (TypeError, ValueError) as e:  # the factory refused the recorded arguments
        raise BundleError(f"{meta_p}: architecture {arch['name']} with args {arch['args']}: {e}") from e
    from imgclf.runtime.ood import PREFIX as OOD_PREFIX

    ood_tensors = {k: sd.pop(k) for k in [k for k in sd if k.startswith(OOD_PREFIX)]}
    scorer, threshold = load_ood(meta, ood_tensors, str(meta_p))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{w_p}: weights do not fit architecture {arch['name']}: {e}") from e
    model.eval().to(memory_format=torch.channels_last)
    return Bundle(
        d, model, pre, classes, meta, temperature, scorer, threshold, thresholds, backend=chosen, _auto=auto
    )


def recorded_splits(bundle: Bundle) -> tuple[dict[str, list[str]] | None, Path | None]:
    """The training run's ``splits.json`` (relative paths per split), if the run folder still exists."""
    rd = bundle.meta.get("run_dir")
    if not rd:
        return None, None
    p = Path(rd) / "splits.json"
    if not p.exists():
        return None, p
    try:
        rec = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable (%s); ignoring the recorded split", p, e)
        return None, p
    return (rec if isinstance(rec, dict) else None), p
