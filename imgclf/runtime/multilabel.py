"""Multi-label answers: per-label decision thresholds, label sets and the metrics that judge them.

A multi-label bundle (``model.json``: ``"task": "multi-label"``) has one sigmoid output per label;
a label is predicted when its probability reaches that label's threshold, which training picks
on the validation split (best F1 per label) and stores in ``model.json['thresholds']``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from imgclf.core.errors import BundleError

TASK = "multi-label"
DEFAULT_THRESHOLD = 0.5
# Candidate thresholds are the validation probabilities themselves, bounded to keep a label from
# being always on (tiny threshold) or unreachable (threshold above every probability).
MIN_THRESHOLD, MAX_THRESHOLD = 0.02, 0.98


def is_multi_label(meta: dict[str, Any]) -> bool:
    return meta.get("task") == TASK


def check_thresholds(meta: dict[str, Any], where: str) -> np.ndarray | None:
    """The per-label thresholds of a multi-label ``model.json`` (None for single-label), or a BundleError."""
    task = meta.get("task", "single-label")
    if task not in ("single-label", TASK):
        raise BundleError(f"{where}: task={task!r}; expected 'single-label' or '{TASK}'")
    if task != TASK:
        return None
    classes = meta.get("classes") or []
    t = meta.get("thresholds")
    ok = (
        isinstance(t, list)
        and len(t) == len(classes)
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in t)
        and all(0 <= v <= 1 for v in t)
    )
    if not ok:
        raise BundleError(
            f"{where}: 'thresholds' must be {len(classes)} numbers in [0, 1], one per label; got "
            f"{str(t)[:80]}. Retrain, or set them all to 0.5"
        )
    return np.asarray(t, dtype=np.float32)


def best_f1_thresholds(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per label, the threshold with the best F1 on (probs, targets); (thresholds, their F1).

    A label without a positive example keeps :data:`DEFAULT_THRESHOLD` (F1 undefined: NaN).
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    n_labels = probs.shape[1]
    th = np.full(n_labels, DEFAULT_THRESHOLD, dtype=np.float32)
    f1 = np.full(n_labels, np.nan)
    for j in range(n_labels):
        y, p = targets[:, j], probs[:, j]
        pos = int(y.sum())
        if pos == 0:
            continue
        order = np.argsort(-p, kind="stable")
        ps, ys = p[order], y[order]
        tp = np.cumsum(ys)
        k = np.arange(1, len(ps) + 1)
        # Predicting the top k: precision tp/k, recall tp/pos; ties must go together.
        last_of_tie = np.r_[ps[1:] != ps[:-1], True]
        scores = np.where(last_of_tie, 2 * tp / (k + pos), -1.0)
        scores[(ps < MIN_THRESHOLD) | (ps > MAX_THRESHOLD)] = -1.0
        best = int(np.argmax(scores))
        if scores[best] < 0:
            continue
        # Midway to the next lower probability keeps the same decisions on val and is less brittle.
        nxt = ps[best + 1] if best + 1 < len(ps) else ps[best]
        mid = (ps[best] + nxt) / 2 if nxt < ps[best] else ps[best]
        th[j] = float(np.clip(mid, MIN_THRESHOLD, MAX_THRESHOLD))
        f1[j] = float(scores[best])
    return th, f1


def predicted_sets(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(N, L) bool: label j is predicted when its probability reaches threshold j."""
    return np.asarray(probs) >= np.asarray(thresholds)[None, :]


def label_fields(row: np.ndarray, thresholds: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """What a multi-label prediction carries: the set (most probable first) and every probability."""
    on = np.flatnonzero(row >= thresholds)
    on = on[np.argsort(-row[on], kind="stable")]
    return {
        "labels": [classes[i] for i in on],
        "probabilities": {c: float(p) for c, p in zip(classes, row)},
    }


def _average_precision(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, p)) if y.any() else float("nan")


def multilabel_metrics(
    probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """mAP, micro/macro F1, exact-match accuracy, Hamming loss, and per-label P/R/F1/AP/support."""
    from sklearn.metrics import precision_recall_fscore_support

    y = np.asarray(targets).astype(bool)
    pred = predicted_sets(probs, thresholds)
    p, r, f, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    ap = [_average_precision(y[:, j], probs[:, j]) for j in range(y.shape[1])]
    micro = precision_recall_fscore_support(y, pred, average="micro", zero_division=0)
    present = support > 0
    aps = [a for a in ap if not math.isnan(a)]
    return {
        "mAP": float(np.mean(aps)) if aps else float("nan"),
        "micro_f1": float(micro[2]),
        "micro_precision": float(micro[0]),
        "micro_recall": float(micro[1]),
        "macro_f1": float(np.mean(f[present])) if present.any() else float("nan"),
        "exact_match": float((pred == y).all(axis=1).mean()) if len(y) else float("nan"),
        "hamming_loss": float((pred != y).mean()) if len(y) else float("nan"),
        "per_label": {
            c: {
                "precision": float(p[j]),
                "recall": float(r[j]),
                "f1": float(f[j]),
                "ap": ap[j],
                "support": int(support[j]),
                "threshold": float(thresholds[j]),
            }
            for j, c in enumerate(classes)
        },
    }


def co_occurrence(targets: np.ndarray) -> np.ndarray:
    """(L, L) counts: images holding both label i and label j (the diagonal: label counts)."""
    y = np.asarray(targets).astype(np.int64)
    return y.T @ y
