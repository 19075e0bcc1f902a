"""Predict files, folders and globs with a bundle; bad files are reported, never fatal."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

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
    bundle: Bundle, files: Sequence[str], *, top_k: int = 5, batch_size: int = 64
) -> Iterator[PredictResult]:
    """Yield one result per file in order; unreadable files carry ``error`` instead of a label."""
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
            probs = bundle.predict_batch(np.stack(arrays))
            for f, r in zip(ok_paths, bundle.top_k(probs, top_k)):
                results[f] = PredictResult(f, r["label"], r["probability"], r["top_k"])
        for f in chunk:
            yield results[f]
