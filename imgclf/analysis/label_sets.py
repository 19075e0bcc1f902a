"""The dataset doctor for multi-label data: label counts, co-occurrence, rare labels, empty and
contradictory label sets (the same image content under two different label sets)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgclf.data import sources as D
from imgclf.runtime.multilabel import co_occurrence

# Below this many images a label is flagged: a few examples rarely teach a sigmoid output much.
MIN_IMAGES = 10


@dataclass
class LabelSetReport:
    """What :func:`check_label_sets` found; ``to_dict`` is what inspect.json holds under ``multi_label``."""

    labels: list[str]
    counts: dict[str, int]
    co_occurrence: list[list[int]]
    images: int
    mean_labels_per_image: float
    label_sets: int  # distinct label sets
    rare: dict[str, int]  # label -> images, below min_images
    empty: list[str]  # images with no label at all
    contradictory: list[dict[str, Any]] = field(default_factory=list)  # {"files", "label_sets"}
    min_images: int = MIN_IMAGES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary_lines(self) -> list[str]:
        out = [
            f"multi-label: {len(self.labels)} labels over {self.images} images, "
            f"{self.mean_labels_per_image:.2f} labels an image, {self.label_sets} distinct label sets"
        ]
        top = sorted(self.counts.items(), key=lambda kv: -kv[1])
        out.append(
            "  label counts: "
            + ", ".join(f"{k} {v}" for k, v in top[:20])
            + (" ..." if len(top) > 20 else "")
        )
        if self.rare:
            out.append(
                f"  {len(self.rare)} label(s) with fewer than {self.min_images} images (too few to learn "
                "well): "
                + ", ".join(f"{k} ({v})" for k, v in self.rare.items())
                + "; collect more, or train with --pos-weight auto"
            )
        if self.empty:
            out.append(f"  {len(self.empty)} image(s) with no label (first: {self.empty[0]})")
        if self.contradictory:
            c = self.contradictory[0]
            out.append(
                f"  {len(self.contradictory)} image(s) appear with contradictory label sets (first: "
                + "; ".join(f"{f} = {s}" for f, s in zip(c["files"], c["label_sets"]))
                + ")"
            )
        return out


def check_label_sets(
    index: D.SourceIndex, digests: Sequence[str], *, min_images: int = MIN_IMAGES
) -> LabelSetReport:
    """Counts, co-occurrence, rare labels, empty sets and contradictory sets of a multi-label index.

    ``digests``: each item's content hash from the doctor's scan ("" when unreadable), so files
    are not read a second time; equal digests under different label sets are contradictory.
    """
    if index.targets is None:
        raise D.DataError(f"{index.name}: not a multi-label source (give --multi-label)")
    y = index.targets.astype(np.int64)
    counts = y.sum(axis=0)
    rels = [index.relpath(it) for it in index.items]
    sets = ["|".join(c for c, k in zip(index.classes, row) if k) for row in y]
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(digests):
        if h:
            by_hash.setdefault(h, []).append(i)
    contradictory = [
        {"files": [rels[i] for i in members], "label_sets": [sets[i] or "(none)" for i in members]}
        for members in by_hash.values()
        if len({sets[i] for i in members}) > 1
    ]
    return LabelSetReport(
        labels=list(index.classes),
        counts={c: int(n) for c, n in zip(index.classes, counts)},
        co_occurrence=co_occurrence(y).tolist(),
        images=len(y),
        mean_labels_per_image=float(y.sum(axis=1).mean()) if len(y) else 0.0,
        label_sets=len(set(sets)),
        rare={c: int(n) for c, n in zip(index.classes, counts) if n < min_images},
        empty=[rels[i] for i in np.flatnonzero(y.sum(axis=1) == 0)],
        contradictory=contradictory,
        min_images=min_images,
    )


def as_label_set_classes(index: D.SourceIndex) -> D.SourceIndex:
    """A single-label view of a multi-label index: each distinct label set is one class
    (``red|dress``, ``(none)``), so the general doctor checks duplicates and conflicts across sets."""
    sets = ["|".join(c for c, k in zip(index.classes, row) if k) or "(none)" for row in index.targets]
    names = sorted(set(sets))
    col = {n: i for i, n in enumerate(names)}
    return D.SourceIndex(
        name=index.name,
        kind=index.kind,
        classes=names,
        items=list(index.items),
        labels=np.asarray([col[s] for s in sets], dtype=np.int64),
        split=index.split,
        native_channels=index.native_channels,
        root=index.root,
        arrays=index.arrays,
        skipped=list(index.skipped),
    )
