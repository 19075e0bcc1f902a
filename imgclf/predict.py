"""Predict files, folders and globs with a bundle; bad files are reported, never fatal."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle
from .imageio import ImageDecodeError, is_candidate_file


@dataclass
class PredictResult:
    path: str
    label: str | None
    probability: float | None
    top_k: list[dict[str, Any]]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"path": self.path, "label": self.label, "probability": self.probability, "top_k": self.top_k}
        if self.error:
            d["error"] = self.error
        return d


def expand_paths(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Files, folders (recursive, sorted) and glob patterns -> (files, inputs that matched nothing)."""
    files: list[str] = []
    missing: list[str] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files.extend(
                    str(Path(dirpath) / f) for f in sorted(filenames) if is_candidate_file(Path(dirpath) / f)
                )
        elif p.exists():
            files.append(str(p))
        elif any(c in s for c in "*?["):
            hits = sorted(h for h in glob.glob(s, recursive=True) if Path(h).is_file())
            files.extend(hits) if hits else missing.append(s)
        else:
            missing.append(s)
    return files, missing


def predict_files(
    bundle: Bundle, files: Sequence[str], *, top_k: int = 5, batch_size: int = 64, tta: str | None = None
) -> Iterator[PredictResult]:
    """Yield one result per file in order; unreadable files carry ``error`` instead of a label.

    ``tta``: a test-time-augmentation view set (:mod:`imgclf.tta`), ``auto`` or None (off).
    """
    if tta:
        from .tta import predict_tta
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
            probs = predict_tta(bundle, batch, tta) if tta else bundle.predict_batch(batch)
            for f, r in zip(ok_paths, bundle.top_k(probs, top_k)):
                results[f] = PredictResult(f, r["label"], r["probability"], r["top_k"])
        for f in chunk:
            yield results[f]


# --------------------------------------------------------------------------- annotate, CSV, gallery


def annotation_lines(bundle: Bundle, result: PredictResult, extra: int = 0) -> list[str]:
    """Caption for an annotated image: ``label: 85.42% (correct)`` then ``extra`` runner-up lines.

    "correct"/"incorrect" appears only when the file name names a class (the tutorial's rule).
    """
    from .visualize import annotation_text, judge_from_filename

    if result.label is None or result.probability is None:
        return []
    verdict = judge_from_filename(result.path, bundle.classes, result.label)
    lines = [annotation_text(result.label, result.probability, verdict)]
    lines += [f"{t['label']}: {t['probability'] * 100:.2f}%" for t in result.top_k[1 : 1 + extra]]
    return lines


def write_annotated(
    bundle: Bundle, result: PredictResult, out_dir: str | Path, *, extra: int = 0, width: int = 400
) -> Path:
    """Save ``out_dir/<name>.png``: the image resized to ``width`` px wide with its caption drawn on."""
    from .imageio import open_image
    from .visualize import GREEN, RED, annotate

    lines = annotation_lines(bundle, result, extra)
    img = open_image(result.path, channels=3)
    color = RED if lines and lines[0].endswith("(incorrect)") else GREEN
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{Path(result.path).stem}.png"
    n = 1
    while dest.exists():  # same file name in two folders: keep both
        dest = out / f"{Path(result.path).stem}-{n}.png"
        n += 1
    annotate(img, lines, width=width, color=color).save(dest)
    return dest


def write_csv(results: Sequence[PredictResult], path: str | Path, classes: Sequence[str], k: int) -> None:
    """One row per file: path, label, probability, verdict from the file name, top-k, error."""
    import csv

    from .visualize import judge_from_filename

    k = max(1, min(k, len(classes)))
    header = ["path", "label", "probability", "filename_verdict"]
    for r in range(1, k + 1):
        header += [f"top{r}_label", f"top{r}_probability"]
    header.append("error")
    with open(path, "w", newline="") as f:
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


def gallery(
    bundle: Bundle, data: str, n: int = 16, *, seed: int | None = None, split: str | None = None
) -> tuple[bytes, int, int]:
    """The tutorial's random test-sample view: a PNG grid titled "Predicted: 5, Actual: 5".

    Samples come from the same split ``imgclf evaluate`` uses. Returns (PNG, correct, shown).
    """
    from . import data as D
    from .evaluate import select_items
    from .visualize import montage, source_image

    index = D.index_source(data)
    if list(index.classes) != list(bundle.classes):
        raise D.DataError(f"{data}: classes {index.classes} do not match the bundle's {bundle.classes}")
    sel = select_items(bundle, index, split)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(sel.idx, size=min(n, len(sel.idx)), replace=False))
    dec = D.decode_items(index, pick, bundle.pre, progress=False)
    pos = {index.items[i]: int(i) for i in pick}
    pred = bundle.predict_batch(dec.images).argmax(1)
    titles = [
        f"Predicted: {bundle.classes[p]}, Actual: {bundle.classes[t]}" for p, t in zip(pred, dec.labels)
    ]
    colors = ["green" if p == t else "red" for p, t in zip(pred, dec.labels)]
    images = [source_image(index, pos[it]) for it in dec.items]
    png = montage(images, titles, colors=colors, cell_inches=2.2)
    return png, int((pred == dec.labels).sum()), len(pred)
