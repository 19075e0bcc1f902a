"""Likely label errors from out-of-fold probabilities, by confident learning (``cleanlab``).

:func:`find_label_issues` takes every image's held-out class probabilities (from
:mod:`imgclf.training.kfold`; this module only sees arrays) and returns a typed
:class:`LabelReport`: the images cleanlab flags (``cleanlab.filter.find_label_issues``, pruning by
the estimated noise rates), ranked worst first by cleanlab's label-quality score
(``cleanlab.rank.get_label_quality_scores``), each with the class the models suggest.
:func:`relabelled_copy` writes a copy of a folder dataset with those suggestions applied.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.core.errors import DataError

METHOD = "self_confidence"  # cleanlab's label-quality score: the probability of the given label


@dataclass
class LabelIssue:
    """One likely mislabelled image.

    ``score`` is cleanlab's label quality in [0, 1] (lower = more likely wrong);
    ``confidence`` is the out-of-fold probability of ``suggested``.
    """

    path: str
    given: str
    suggested: str
    score: float
    confidence: float
    index: int = field(default=-1, repr=False)  # position in the source's items (for thumbnails)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "given": self.given,
            "suggested": self.suggested,
            "score": round(self.score, 6),
            "confidence": round(self.confidence, 6),
        }


@dataclass
class LabelReport:
    """What the label check found and how it was run (``inspect.json``'s ``label_check``)."""

    issues: list[LabelIssue]  # flagged by cleanlab, worst first
    images: int  # images checked
    classes: list[str]
    oof_accuracy: float  # out-of-fold accuracy against the given labels
    fold_accuracy: list[float]
    seconds: float
    settings: dict[str, Any]
    per_class: dict[str, int] = field(default_factory=dict)  # flagged images per given class

    def summary(self) -> dict[str, Any]:
        return {
            "method": f"cleanlab.filter.find_label_issues (prune_by_noise_rate), ranked by {METHOD}",
            "images": self.images,
            "flagged": len(self.issues),
            "oof_accuracy": round(self.oof_accuracy, 6),
            "fold_accuracy": [round(a, 6) for a in self.fold_accuracy],
            "seconds": round(self.seconds, 3),
            "flagged_per_class": dict(self.per_class),
            **self.settings,
        }


def quality_scores(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """cleanlab's label-quality score per image (lower = more likely mislabelled)."""
    from cleanlab.rank import get_label_quality_scores

    return get_label_quality_scores(np.asarray(labels), np.asarray(probs), method=METHOD)


def flagged_indices(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices cleanlab flags as label issues, worst first."""
    from cleanlab.filter import find_label_issues as cl_find

    return np.asarray(
        cl_find(
            np.asarray(labels),
            np.asarray(probs),
            return_indices_ranked_by=METHOD,
            filter_by="prune_by_noise_rate",
            n_jobs=1,  # cleanlab's process pool costs more than it saves on a few thousand rows
        ),
        dtype=np.int64,
    )


def find_label_issues(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    paths: list[str],
    *,
    indices: list[int] | None = None,
    fold_accuracy: list[float] | None = None,
    seconds: float = 0.0,
    settings: dict[str, Any] | None = None,
) -> LabelReport:
    """Rank likely label errors from out-of-fold ``probs`` (N, K) and the given ``labels`` (N,).

    ``paths`` name the images in the report; ``indices`` are their positions in the source
    (kept for thumbnails).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels) or len(paths) != len(labels):
        raise ValueError(f"probs {probs.shape}, labels {labels.shape} and {len(paths)} paths do not line up")
    # cleanlab wants rows summing to 1 (float32 softmax is off by ~1e-7)
    probs = probs / probs.sum(1, keepdims=True)
    scores = quality_scores(labels, probs)
    flagged = flagged_indices(labels, probs)
    best = probs.argmax(1)
    issues = []
    for i in flagged:
        # the suggestion is the most probable class other than the given one
        p = probs[i].copy()
        p[labels[i]] = -1.0
        s = int(best[i]) if best[i] != labels[i] else int(p.argmax())
        issues.append(
            LabelIssue(
                path=paths[i],
                given=classes[labels[i]],
                suggested=classes[s],
                score=float(scores[i]),
                confidence=float(probs[i, s]),
                index=int(indices[i]) if indices is not None else int(i),
            )
        )
    per_class = {c: 0 for c in classes}
    for e in issues:
        per_class[e.given] += 1
    return LabelReport(
        issues=issues,
        images=len(labels),
        classes=list(classes),
        oof_accuracy=float((best == labels).mean()) if len(labels) else float("nan"),
        fold_accuracy=list(fold_accuracy or []),
        seconds=seconds,
        settings=dict(settings or {}),
        per_class=per_class,
    )


def _inside(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_fix_target(root: str | Path, dest: str | Path) -> Path:
    """``dest`` resolved; :class:`DataError` if it is inside ``root``, holds it, or is a non-empty folder."""
    src, dst = Path(root).resolve(), Path(dest).resolve()
    if _inside(dst, src):
        raise DataError(f"--fix-to {dest}: inside the source {root}; choose a folder outside it")
    if _inside(src, dst):
        raise DataError(f"--fix-to {dest}: contains the source {root}; choose another folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DataError(f"--fix-to {dest}: exists and is not an empty folder; choose a new folder")
    return dst


def relabelled_copy(root: str | Path, items: list[str], report: LabelReport, dest: str | Path) -> Path:
    """Write ``dest``: a copy of the folder dataset ``root`` with each flagged image moved to its
    suggested class folder (hard links where possible, else copies; ``root`` is never touched).

    ``items`` are every image path of the source. ``dest`` must not exist or be empty, and must not
    be inside ``root``. Also writes ``dest/relabelled.json`` listing the moves.
    """
    src, dst = Path(root).resolve(), check_fix_target(root, dest)
    moves = {e.path: (e.given, e.suggested) for e in report.issues}
    dst.mkdir(parents=True, exist_ok=True)
    record = []
    rels = [(item, Path(os.path.relpath(item, root))) for item in items]  # as SourceIndex.relpath
    # unmoved files first, so a moved one meeting a name already in its new class is the one renamed
    rels.sort(key=lambda t: str(t[1]) in moves)
    for item, rel in rels:
        target = dst / rel
        move = moves.get(str(rel))
        if move is not None:
            given, new = move
            # the class folder is the first part, or the second under train/val/test
            j = 0 if rel.parts[0] == given else 1
            target = dst.joinpath(*rel.parts[:j], new, *rel.parts[j + 1 :])
            n = 1
            while target.exists():  # a file of the same name already in the new class
                target = target.with_name(f"{rel.stem}.relabelled{n}{rel.suffix}")
                n += 1
            record.append(
                {"from": str(rel), "to": str(target.relative_to(dst)), "given": given, "suggested": new}
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(item, target)
        except FileExistsError:
            raise
        except OSError:  # another file system, or links not allowed: copy
            shutil.copy2(item, target)
    (dst / "relabelled.json").write_text(json.dumps({"source": str(src), "moved": record}, indent=1) + "\n")
    return dst
