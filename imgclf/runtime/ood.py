"""Unknown ("out-of-distribution") scores: one number per image, HIGHER = more likely unknown.

A scorer is a small ``nn.Module`` taking the network's penultimate features and raw logits, so it
runs in PyTorch and inside the exported ONNX graph alike. Four kinds:

- ``msp``: minus the maximum softmax probability of ``logits / T`` (Hendrycks & Gimpel 2017).
- ``energy``: ``-T * logsumexp(logits / T)`` (Liu et al. 2020).
- ``mahalanobis``: smallest Mahalanobis distance to a class mean, with one shared (tied)
  covariance shrunk by Ledoit-Wolf, fitted on training features (Lee et al. 2018).
- ``knn``: squared distance to the k-th nearest of at most ``MAX_BANK`` L2-normalised training
  embeddings (Sun et al. 2022); the bank is a seeded random subsample when training is larger.

``bench/ood.py`` measures them (``bench/results/ood.json``, docs/ACCURACY.md "Unknown images").
The scorer's state is ``config()`` (JSON, for model.json) plus ``tensors()`` (for safetensors);
:func:`scorer_from_state` rebuilds and validates it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from imgclf.core.errors import BundleError, ConfigError

SCORES: tuple[str, ...] = ("msp", "energy", "mahalanobis", "knn")
# Measured by bench/ood.py (bench/results/ood.json, docs/ACCURACY.md "Unknown images"): mean AUROC
# over MNIST vs Fashion-MNIST, the reverse, and Sign Language vs natural-images and vs hymenoptera:
# mahalanobis (L2-normalised features) 0.997, 99.3 % of unknowns rejected at 95 % kept; knn k=1
# 0.996 / 98.6 %; knn k=10 0.992 / 96.5 %; mahalanobis on raw features 0.983 / 89.0 %;
# msp 0.849 / 55.3 %; energy 0.740 / 41.5 % (energy: 0.739 for Fashion-MNIST's MNIST unknowns).
# Only Fashion-MNIST vs MNIST prefers raw-feature Mahalanobis (0.998 vs 0.990).
DEFAULT_SCORE: str = "mahalanobis"
# Rows of training embeddings a knn scorer keeps: 5,000 x 512 float32 is 10 MB in the bundle, and
# one image's distances are a (1, 5000) matmul.
MAX_BANK = 5000
# k=1 measured best (mean AUROC 0.996 vs 0.992 for k=10 and 0.985 for k=50, bench/ood.py); with a
# bank subsampled to 5,000 rows the paper's k=50 of 50,000 would be k=5 anyway.
DEFAULT_K = 1
# Mahalanobis on L2-normalised features: mean AUROC 0.997 vs 0.983 on raw ones (bench/ood.py; raw
# ReLU features of LeNet/MNIST gave 0.935 against Fashion-MNIST, normalised 0.998).
DEFAULT_NORMALIZE = True
# Rows the shared covariance is estimated from (a seeded sample beyond that): 50,000 x 2,048 float64
# is 800 MB already, and a D x D covariance is well estimated long before.
MAX_COV_ROWS = 50_000
STATE_VERSION = 1
# Prefix of every tensor name, so the scorer's arrays can share a safetensors file with the weights.
PREFIX = "ood."


# --------------------------------------------------------------------------- features


def _head(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (the classifier head); every registered architecture has one."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        name = getattr(model, "arch", type(model).__name__)
        raise ConfigError(f"model {name}: no nn.Linear classifier head, so no features for unknown scores")
    return last


class FeaturesAndLogits(nn.Module):
    """Wraps a classifier: ``forward(x) -> (features (N, D), logits (N, K))`` in one pass.

    The features are the input of the model's last ``nn.Linear``, captured by a forward hook
    registered only for the duration of the call (so it also traces into ONNX).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = _head(model)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        seen: list[Tensor] = []

        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            seen.append(inputs[0])
            seen.append(output)

        handle = self.head.register_forward_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if len(seen) != 2:
            raise ConfigError(
                f"model {getattr(self.model, 'arch', type(self.model).__name__)}: its last nn.Linear ran "
                f"{len(seen) // 2} times in one forward pass; cannot tell which gives the features"
            )
        feats, head_out = seen
        # The head's output must be the logits; otherwise the "last Linear" is not the classifier.
        if head_out is not logits and head_out.shape != logits.shape:
            raise ConfigError(
                f"model {getattr(self.model, 'arch', type(self.model).__name__)}: its last nn.Linear "
                f"gives {tuple(head_out.shape)}, not the logits {tuple(logits.shape)}"
            )
        return torch.flatten(feats, 1), logits


def features_and_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Penultimate features (N, D) and logits (N, K) in one forward pass, for any registered model."""
    return FeaturesAndLogits(model)(x)


# --------------------------------------------------------------------------- scorers


def _full_logits(logits: Tensor) -> Tensor:
    # A single-logit (sigmoid) head is the two-class softmax over [0, z].
    if logits.shape[1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], dim=1)
    return logits


class OodScorer(nn.Module):
    """``forward(features, logits) -> (N,)`` float score, HIGHER = more likely unknown.

    ``logits`` are the raw (uncalibrated) ones; ``temperature`` divides them for msp/energy.
    """

    kind: str = ""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def config(self) -> dict[str, Any]:
        """JSON-able settings (goes into model.json)."""
        return {"kind": self.kind, "version": STATE_VERSION, "temperature": self.temperature}

    def tensors(self) -> dict[str, Tensor]:
        """Fitted arrays, named ``ood.*`` (goes into safetensors)."""
        return {}

    def forward(self, features: Tensor, logits: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class MspScorer(OodScorer):
    kind = "msp"

    def forward(self, features: Tensor, logits: Tensor) -> Tensor:
        z = _full_logits(logits.float()) / self.temperature
        return -torch.softmax(z, dim=1).amax(dim=1)


class EnergyScorer(OodScorer):
    kind = "energy"

    def forward(self, features: Tensor, logits: Tensor) -> Tensor:
        z = _full_logits(logits.float()) / self.temperature
        return -self.temperature * torch.logsumexp(z, dim=1)


def _l2(x: Tensor) -> Tensor:
    # x / max(||x||, eps), written out (F.normalize exports fine too, this is explicit about eps).
    return x / torch.sqrt((x * x).sum(dim=1, keepdim=True)).clamp_min(1e-12)


class MahalanobisScorer(OodScorer):
    """min over classes of ``||(f - mu_c) W||^2`` with ``W W^T`` the shrunk shared precision."""

    kind = "mahalanobis"

    def __init__(
        self,
        center: Tensor,
        whiten: Tensor,
        means: Tensor,
        normalize: bool = DEFAULT_NORMALIZE,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(temperature)
        self.normalize = bool(normalize)
        self.register_buffer("center", center.float())
        self.register_buffer("whiten", whiten.float())
        # Class means already centred and whitened: (K, D).
        self.register_buffer("means", means.float())

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "normalize": self.normalize,
            "dims": int(self.whiten.shape[0]),
            "classes": int(self.means.shape[0]),
        }

    def tensors(self) -> dict[str, Tensor]:
        return {PREFIX + "center": self.center, PREFIX + "whiten": self.whiten, PREFIX + "means": self.means}

    def forward(self, features: Tensor, logits: Tensor) -> Tensor:
        f = features.float()
        if self.normalize:
            f = _l2(f)
        z = (f - self.center) @ self.whiten
        m = self.means
        # ||z - m||^2 expanded: a (N, K) matmul instead of an (N, K, D) difference tensor.
        d = (z * z).sum(1, keepdim=True) - 2.0 * z @ m.T + (m * m).sum(1)[None, :]
        return d.amin(dim=1).clamp_min(0.0)


class KnnScorer(OodScorer):
    """Squared Euclidean distance from the L2-normalised feature to its k-th nearest bank embedding.

    Squared (``2 - 2 cos``) rather than the distance itself: the same order, and no square root
    to magnify float32 rounding near zero (which broke exact ONNX parity).
    """

    kind = "knn"

    def __init__(self, bank: Tensor, k: int = DEFAULT_K, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.k = int(k)
        self.register_buffer("bank", bank.float())

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "k": self.k,
            "dims": int(self.bank.shape[1]),
            "bank": int(self.bank.shape[0]),
        }

    def tensors(self) -> dict[str, Tensor]:
        return {PREFIX + "bank": self.bank}

    def forward(self, features: Tensor, logits: Tensor) -> Tensor:
        z = _l2(features.float())
        # Unit vectors: ||z - b||^2 = 2 - 2 z.b, so the k-th nearest is the k-th largest similarity.
        sim = z @ self.bank.T
        kth = torch.topk(sim, self.k, dim=1, largest=True, sorted=True).values[:, self.k - 1]
        return (2.0 - 2.0 * kth).clamp_min(0.0)


# --------------------------------------------------------------------------- fitting


def _check_kind(kind: str) -> str:
    if kind not in SCORES:
        raise ConfigError(f"unknown-image score {kind!r}: choose one of {', '.join(SCORES)}")
    return kind


def _check_temperature(t: Any, where: str, err: type[Exception]) -> float:
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise err(f"{where}: temperature={t!r}; expected a finite number > 0")
    return float(t)


def fit_scorer(
    kind: str,
    feats: Tensor,
    labels: Tensor,
    num_classes: int,
    temperature: float = 1.0,
    **kw: Any,
) -> OodScorer:
    """Fit a scorer from TRAINING-split features (N, D) and labels (N,).

    Options: mahalanobis ``normalize`` (L2-normalise features first, default True); knn ``k``
    (default ``DEFAULT_K``), ``max_bank`` (default ``MAX_BANK``) and ``seed`` (bank subsample).
    """
    _check_kind(kind)
    temperature = _check_temperature(temperature, "fit_scorer", ConfigError)
    allowed = {"msp": set(), "energy": set(), "mahalanobis": {"normalize"}, "knn": {"k", "max_bank", "seed"}}
    extra = set(kw) - allowed[kind]
    if extra:
        raise ConfigError(
            f"{kind} scorer: unknown option(s) {sorted(extra)}; accepted: {sorted(allowed[kind])}"
        )
    if kind == "msp":
        return MspScorer(temperature)
    if kind == "energy":
        return EnergyScorer(temperature)
    f = torch.as_tensor(feats).detach().float().cpu()
    y = torch.as_tensor(labels).detach().cpu().long().ravel()
    if f.ndim < 2 or len(f) != len(y) or len(f) < 2:
        raise ConfigError(
            f"fit_scorer: need (N, D) features and N labels, N >= 2; got {tuple(f.shape)}, {len(y)}"
        )
    f = f.flatten(1)
    if not bool(torch.isfinite(f).all()):
        raise ConfigError("fit_scorer: the training features hold NaN or inf")
    if kind == "knn":
        k = kw.get("k", DEFAULT_K)
        max_bank = kw.get("max_bank", MAX_BANK)
        bank = _l2(f)
        if len(bank) > max_bank:
            g = torch.Generator().manual_seed(int(kw.get("seed", 0)))
            bank = bank[torch.randperm(len(bank), generator=g)[:max_bank]]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(bank):
            raise ConfigError(f"knn scorer: k={k!r}; expected an int from 1 to the bank size {len(bank)}")
        return KnnScorer(bank, k, temperature)
    # mahalanobis
    from sklearn.covariance import LedoitWolf

    normalize = bool(kw.get("normalize", DEFAULT_NORMALIZE))
    x = (_l2(f) if normalize else f).double().numpy()
    yn = y.numpy()
    present = np.unique(yn)
    if len(present) < 2 or yn.min() < 0 or yn.max() >= num_classes:
        raise ConfigError(
            f"mahalanobis scorer: labels must cover at least 2 of {num_classes} classes in range; "
            f"got {present.tolist()[:10]}"
        )
    # Only classes seen in training get a mean (a stand-in mean would pull unknowns in).
    means = np.stack([x[yn == c].mean(0) for c in present])
    centred = x - means[np.searchsorted(present, yn)]
    if len(centred) > MAX_COV_ROWS:  # bounded memory and time; the means above use every row
        centred = centred[np.random.default_rng(0).choice(len(centred), MAX_COV_ROWS, replace=False)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    precision = (precision + precision.T) / 2
    # W with W W^T = precision: distances become plain squared norms after "z = (f - c) W".
    whiten = np.linalg.cholesky(precision)
    center = x.mean(0)
    mw = (means - center) @ whiten
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    return MahalanobisScorer(t(center), t(whiten), t(mw), normalize, temperature)


# --------------------------------------------------------------------------- state


def _tensor(tensors: dict[str, Tensor], name: str, shape: tuple[int | None, ...], where: str) -> Tensor:
    key = PREFIX + name
    t = tensors.get(key)
    if not isinstance(t, Tensor):
        raise BundleError(f"{where}: tensor {key!r} is missing; retrain or re-export the bundle")
    if t.ndim != len(shape) or any(s is not None and s != got for s, got in zip(shape, t.shape)):
        raise BundleError(
            f"{where}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape}; bundle damaged"
        )
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise BundleError(f"{where}: tensor {key!r} is not finite floating point; retrain or re-export")
    return t


def _int(config: dict[str, Any], key: str, where: str, lo: int = 1) -> int:
    v = config.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise BundleError(f"{where}: {key}={v!r}; expected an int >= {lo}")
    return v


def scorer_from_state(config: dict[str, Any], tensors: dict[str, Tensor], where: str = "ood") -> OodScorer:
    """Rebuild a scorer from :meth:`OodScorer.config` and :meth:`OodScorer.tensors`, validated.

    Raises :class:`BundleError` (one line, naming ``where``) for anything missing or inconsistent.
    """
    if not isinstance(config, dict):
        raise BundleError(
            f"{where}: the unknown-image score settings are not a mapping; re-export the bundle"
        )
    kind = config.get("kind")
    if kind not in SCORES:
        raise BundleError(f"{where}: kind={kind!r}; expected one of {', '.join(SCORES)} (upgrade imgclf?)")
    version = config.get("version", STATE_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > STATE_VERSION:
        raise BundleError(f"{where}: version={version!r} is newer than this imgclf supports; upgrade imgclf")
    temperature = _check_temperature(config.get("temperature", 1.0), where, BundleError)
    tensors = dict(tensors or {})
    if kind == "msp":
        return MspScorer(temperature)
    if kind == "energy":
        return EnergyScorer(temperature)
    if kind == "knn":
        dims, n = _int(config, "dims", where), _int(config, "bank", where)
        k = _int(config, "k", where)
        if k > n:
            raise BundleError(f"{where}: k={k} exceeds the bank of {n} embeddings; bundle damaged")
        return KnnScorer(_tensor(tensors, "bank", (n, dims), where), k, temperature)
    dims, classes = _int(config, "dims", where), _int(config, "classes", where)
    normalize = config.get("normalize")
    if not isinstance(normalize, bool):
        raise BundleError(f"{where}: normalize={normalize!r}; expected true or false")
    return MahalanobisScorer(
        _tensor(tensors, "center", (dims,), where),
        _tensor(tensors, "whiten", (dims, dims), where),
        _tensor(tensors, "means", (classes, dims), where),
        normalize,
        temperature,
    )


# --------------------------------------------------------------------------- thresholds, metrics


def _scores(a: Any, name: str) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64).ravel()
    if x.size == 0:
        raise ConfigError(f"{name}: no scores (an empty split?)")
    if not np.isfinite(x).all():
        raise ConfigError(f"{name}: scores hold NaN or inf")
    return x


def threshold_for_keep_rate(
    val_scores: np.ndarray, keep_rate: float, negative_scores: np.ndarray | None = None
) -> float:
    """Threshold on the score: an image is unknown when ``score > threshold``.

    Without negatives: the smallest threshold keeping at least ``keep_rate`` of the
    in-distribution validation scores. With ``negative_scores`` (images known to be "none of
    these"), ``keep_rate`` is a floor: among thresholds keeping at least that share, the one
    maximising (share of validation kept + share of negatives rejected) (Youden's J). It moves
    the threshold up only where that keeps more known images than it lets negatives through.
    """
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, int | float) or not 0 < keep_rate <= 1:
        raise ConfigError(f"--keep-rate {keep_rate!r}: expected a number in (0, 1], e.g. 0.95")
    v = np.sort(_scores(val_scores, "validation"))
    n = len(v)
    # Keep = score <= threshold: the ceil(keep_rate * n)-th smallest score keeps >= keep_rate of n.
    i0 = max(0, min(n - 1, math.ceil(keep_rate * n - 1e-9) - 1))
    if negative_scores is None:
        return float(v[i0])
    neg = np.sort(_scores(negative_scores, "negatives"))
    cand = v[i0:]
    kept = np.searchsorted(v, cand, side="right") / n
    rejected = 1.0 - np.searchsorted(neg, cand, side="right") / len(neg)
    j = kept + rejected
    return float(cand[int(np.argmax(j))])  # argmax takes the first (lowest) of ties


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling unknowns (positives, higher scores) from known images."""
    from sklearn.metrics import roc_auc_score

    a, b = _scores(in_scores, "in-distribution"), _scores(out_scores, "unknowns")
    y = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    return float(roc_auc_score(y, np.concatenate([a, b])))


__all__ = [
    "DEFAULT_SCORE",
    "MAX_BANK",
    "SCORES",
    "EnergyScorer",
    "FeaturesAndLogits",
    "KnnScorer",
    "MahalanobisScorer",
    "MspScorer",
    "OodScorer",
    "auroc",
    "features_and_logits",
    "fit_scorer",
    "scorer_from_state",
    "threshold_for_keep_rate",
]
