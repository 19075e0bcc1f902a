"""Predict files, folders and globs with a bundle; bad files are reported, never fatal."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.core.files import glob_files, walk_files
from imgclf.core.imageio import ImageDecodeError
from imgclf.runtime.bundle import Bundle


@dataclass
class PredictResult:
    path: str
    label: str | None
    probability: float | None
    top_k: list[dict[str, Any]]
    error: str | None = None
    # unknown / ood_score (and a note when the bundle has no rejection): Bundle.unknown_fields.
    unknown: dict[str, Any] = field(default_factory=dict)
    # Multi-label bundles: the predicted label set (most probable first) and every label's probability;
    # ``label`` is then the set joined with ", " for display.
    labels: list[str] | None = None
    probabilities: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.labels is not None:
            d: dict[str, Any] = {
                "path": self.path,
                "labels": self.labels,
                "probabilities": self.probabilities,
            }
        else:
            d = {"path": self.path, "label": self.label, "probability": self.probability, "top_k": self.top_k}
        d.update(self.unknown)
        if self.error:
            d["error"] = self.error
        return d

    @property
    def is_unknown(self) -> bool:
        return bool(self.unknown.get("unknown"))


def expand_paths(
    inputs: Sequence[str], skipped: list[tuple[str, str]] | None = None
) -> tuple[list[str], list[str]]:
    """Files, folders (recursive, sorted) and glob patterns -> (files, inputs that matched nothing:
    missing paths, empty folders, globs without a hit).

    ``skipped`` (when given) collects ``(path, why)`` for what walking the folders left out:
    symbolic link loops, broken links, unreadable folders, folders named like images.
    """
    files: list[str] = []
    missing: list[str] = []
    seen: set[str] = set()

    def add(paths: Sequence[str]) -> None:
        # The same file reached twice (a glob through a symlink loop, overlapping inputs) counts once.
        for f in paths:
            real = os.path.realpath(f)
            if real not in seen:
                seen.add(real)
                files.append(f)

    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found, bad = walk_files(p)
            add([str(f) for f in found]) if found else missing.append(s)  # an empty folder matched nothing
            if skipped is not None:
                skipped.extend(bad)
        elif p.exists():
            add([str(p)])
        elif any(c in s for c in "*?["):
            hits = [str(h) for h in glob_files(s, skipped)]
            add(hits) if hits else missing.append(s)
        else:
            missing.append(s)
    return files, missing


def why_missing(path: str) -> str:
    """Why an input of :func:`expand_paths` matched no file, in a few words."""
    return "folder holds no files" if os.path.isdir(path) else "no such file, folder or matching glob"


def predict_files(
    bundle: Bundle, files: Sequence[str], *, top_k: int = 5, batch_size: int = 64, tta: str | None = None
) -> Iterator[PredictResult]:
    """Yield one result per file in order; unreadable files carry ``error`` instead of a label.

    ``tta``: a test-time-augmentation view set (:mod:`imgclf.runtime.tta`), ``auto`` or None (off).
    """
    if tta:
        from imgclf.runtime.tta import predict_tta
    for s in range(0, len(files), batch_size):
        chunk = files[s : s + batch_size]
        arrays, ok_paths, results = [], [], {}
        for f in chunk:
            try:
                arrays.append(bundle.prepare(f))
                ok_paths.append(f)
            except ImageDecodeError as e:
                results[f] = PredictResult(f, None, None, [], error=str(e))
        if arrays:
            batch = np.stack(arrays)
            probs, scores = bundle.predict_scored(batch)
            if tta:  # the unknown score stays that of the image as given
                probs = predict_tta(bundle, batch, tta)
            for f, r in zip(ok_paths, bundle.top_k(probs, top_k, scores)):
                if bundle.multi_label:
                    label = ", ".join(r["labels"])
                    results[f] = PredictResult(
                        f, label, None, [], labels=r["labels"], probabilities=r["probabilities"]
                    )
                    continue
                unknown = {k: r[k] for k in r if k not in ("label", "probability", "top_k")}
                results[f] = PredictResult(f, r["label"], r["probability"], r["top_k"], unknown=unknown)
        for f in chunk:
            yield results[f]


# --------------------------------------------------------------------------- annotate, CSV, gallery


def write_csv(results: Sequence[PredictResult], path: str | Path, classes: Sequence[str], k: int) -> None:
    """One row per file: path, label, probability, verdict from the file name, top-k, error.

    Multi-label results: path, labels (joined with ``|``), one probability column per label, error.
    """
    import csv

    if results and any(r.labels is not None for r in results):
        with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            w = csv.writer(f)
            w.writerow(["path", "labels", *(f"p_{c}" for c in classes), "error"])
            for res in results:
                probs = res.probabilities or {}
                cells = [f"{probs[c]:.6f}" if c in probs else "" for c in classes]
                w.writerow([res.path, "|".join(res.labels or []), *cells, res.error or ""])
        return

    k = max(1, min(k, len(classes)))
    header = ["path", "label", "probability", "filename_verdict"]
    for r in range(1, k + 1):
        header += [f"top{r}_label", f"top{r}_probability"]
    header.append("error")
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:  # keeps odd names
        w = csv.writer(f)
        w.writerow(header)
        for res in results:
            row: list[Any] = [
                res.path,
                res.label or "",
                "" if res.probability is None else f"{res.probability:.6f}",
            ]
            row.append((judge_from_filename(res.path, classes, res.label) or "") if res.label else "")
            for r in range(k):
                t = res.top_k[r] if r < len(res.top_k) else None
                row += [t["label"], f"{t['probability']:.6f}"] if t else ["", ""]
            row.append(res.error or "")
            w.writerow(row)


def judge_from_filename(path: str | Path, classes: Sequence[str], predicted: str) -> str | None:
    """'correct' / 'incorrect' when the file name names exactly one class, else None.

    A class counts only as a whole token (bounded by non-alphanumerics), so ``IMG_1118.jpg``
    names no digit class while ``charmander_0042.png`` names ``charmander``.
    """
    stem = Path(path).stem.lower()
    found = [
        c for c in classes if c and re.search(r"(?<![a-z0-9])" + re.escape(c.lower()) + r"(?![a-z0-9])", stem)
    ]
    # A name inside another found name does not count ("shirt" within "t-shirt"); two
    # separate names (pikachu_vs_bulbasaur) are ambiguous, so no verdict.
    found = [c for c in found if not any(c != d and c.lower() in d.lower() for d in found)]
    if len(found) != 1:
        return None
    return "correct" if found[0] == predicted else "incorrect"
