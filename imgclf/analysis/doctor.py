"""The dataset doctor: unreadable files, format lies, odd sizes, duplicates, label conflicts, leakage.

:func:`scan` reads every item once (content hash, header probe, a real decode through
:func:`imgclf.core.imageio.open_image`, a perceptual hash); :func:`analyse` runs one check per
problem (``check_*``) and returns a typed :class:`DoctorReport` whose ``to_dict()`` is
``inspect.json``; :func:`inspect_source` does both for a ``--data`` source and
:func:`write_report` writes inspect.json and inspect.html. The fast path ``train`` runs before
splitting is :func:`imgclf.data.dedup.dedup_for_training`; how near-duplicates are found (and
the measurements behind the threshold) is in :mod:`imgclf.data.dedup`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgclf.analysis.label_sets import LabelSetReport, as_label_set_classes, check_label_sets
from imgclf.analysis.labels import LabelReport
from imgclf.core.files import display_path
from imgclf.core.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image
from imgclf.data import sources as D
from imgclf.data.dedup import EXT_FORMATS, HASH_SIZE, NEAR_THRESHOLD, Groups, ItemInfo, find_groups, scan

log = logging.getLogger("imgclf")

MIN_SIDE = 16  # images with a side below this many pixels are "tiny"
HUGE_PIXELS = 25_000_000  # images above this many pixels (e.g. 5000x5000) are "enormous"
IMBALANCE_RATIO = 1.5  # largest/smallest class count above which we suggest --class-weights auto


# --------------------------------------------------------------------------- typed report


@dataclass
class Unreadable:
    """A file that could not be decoded, with :class:`ImageDecodeError`'s reason and detail."""

    path: str
    cls: str
    reason: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "class": self.cls, "reason": self.reason, "detail": self.detail}


@dataclass
class Skipped:
    """Something listing the folders left out: a symbolic link loop, a broken link, an unreadable
    folder, a folder named like an image file (``x.jpg/``)."""

    path: str
    cls: str  # the class folder it was found under ("" when none)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "class": self.cls, "reason": self.reason}


@dataclass
class FormatMismatch:
    """A file whose content format does not match its extension (a PNG named .gif)."""

    path: str
    cls: str
    extension: str  # lower-case with the dot, or "(none)"
    format: str  # the format the content sniffing found

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "class": self.cls, "extension": self.extension, "format": self.format}


@dataclass
class SizedFile:
    """A file and its size in pixels: a tiny/enormous image, or a member of a group."""

    path: str
    cls: str
    size: tuple[int, int]  # (width, height)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "class": self.cls, "size": list(self.size)}


@dataclass
class Group:
    """Images that are copies of each other (exact or near), possibly across classes or splits."""

    kind: str  # "exact" (identical bytes) or "near" (perceptual hash within the threshold)
    items: list[SizedFile]
    classes: list[str]  # sorted distinct classes of the items
    max_distance: int | None = None  # largest phash distance of a near pair; near groups only
    splits: list[str] | None = None  # sorted distinct splits; leakage groups only
    split_of: list[str] | None = None  # split per item; leakage groups only

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "items": [e.to_dict() for e in self.items],
            "classes": list(self.classes),
        }
        if self.kind == "near":
            d["max_distance"] = self.max_distance
        if self.splits is not None:
            d["splits"] = list(self.splits)
            d["split_of"] = list(self.split_of or [])
        return d


@dataclass
class ClassStats:
    """Counts for one class (or, as :class:`Totals`, the whole source)."""

    images: int = 0
    readable: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    width_range: list[int] | None = None  # [min, max] over readable images
    height_range: list[int] | None = None
    bytes: int = 0
    unreadable: int = 0
    extension_mismatch: int = 0
    tiny: int = 0
    enormous: int = 0
    exact_duplicate_copies: int = 0  # copies beyond the first of each exact group
    near_duplicate_images: int = 0
    conflict_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(ClassStats)}


_TOTALS_KEYS = (
    "images",
    "readable",
    "formats",
    "modes",
    "width_range",
    "height_range",
    "bytes",
    "unreadable",
    "extension_mismatch",
    "tiny",
    "enormous",
    "exact_duplicate_groups",
    "exact_duplicate_copies",
    "near_duplicate_groups",
    "near_duplicate_images",
    "conflict_images",
    "label_conflicts",
    "leakage_groups",
)


@dataclass
class Totals(ClassStats):
    """:class:`ClassStats` over all classes, plus group counts."""

    exact_duplicate_groups: int = 0
    near_duplicate_groups: int = 0
    label_conflicts: int = 0
    leakage_groups: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(getattr(self, k)) for k in _TOTALS_KEYS}


@dataclass
class Imbalance:
    """Largest/smallest class ratio (readable images) and what to do about it."""

    ratio: float | None
    largest: str | None
    smallest: str | None
    suggestion: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "largest": self.largest,
            "smallest": self.smallest,
            "suggestion": self.suggestion,
        }


@dataclass
class Settings:
    """The thresholds the checks used (``near_threshold`` None: near-duplicates not checked)."""

    near_threshold: int | None
    min_side: int
    huge_pixels: int
    near_hash: str = f"imagehash.phash hash_size={HASH_SIZE} ({HASH_SIZE**2} bits)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "near_hash": self.near_hash,
            "near_threshold": self.near_threshold,
            "min_side": self.min_side,
            "huge_pixels": self.huge_pixels,
        }


@dataclass(eq=False)
class DoctorReport:
    """The dataset doctor's findings; :meth:`to_dict` is exactly ``inspect.json``.

    ``index`` and ``infos`` (the source and its scan) are kept for :func:`write_html`'s
    thumbnails; they are not part of the JSON. ``labels`` (set by ``inspect --labels``) adds
    ``label_check`` (how it ran) and ``label_issues`` (path, given, suggested, score, confidence).
    """

    source: str
    kind: str
    classes: list[str]
    seconds: float
    settings: Settings
    totals: Totals
    per_class: dict[str, ClassStats]
    imbalance: Imbalance
    unreadable: list[Unreadable]
    extension_mismatch: list[FormatMismatch]
    tiny: list[SizedFile]
    enormous: list[SizedFile]
    exact_duplicates: list[Group]
    near_duplicates: list[Group]
    label_conflicts: list[Group]
    leakage: list[Group]
    splits_checked: list[str]
    index: D.SourceIndex | None = field(default=None, repr=False)
    infos: list[ItemInfo] | None = field(default=None, repr=False)
    skipped: list[Skipped] = field(default_factory=list)
    labels: LabelReport | None = None  # ``inspect --labels``: likely label errors
    label_sets: LabelSetReport | None = None  # ``inspect --multi-label``: counts, co-occurrence, ...

    @property
    def problems(self) -> int:
        """Unreadable files + label conflicts + leakage groups (what ``--strict`` fails on)."""
        t = self.totals
        return t.unreadable + t.label_conflicts + t.leakage_groups

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report, key for key as ``inspect.json``."""

        def each(xs: list[Any]) -> list[dict[str, Any]]:
            return [x.to_dict() for x in xs]

        d = {
            "source": self.source,
            "kind": self.kind,
            "classes": list(self.classes),
            "seconds": self.seconds,
            "settings": self.settings.to_dict(),
            "totals": self.totals.to_dict(),
            "per_class": {c: v.to_dict() for c, v in self.per_class.items()},
            "imbalance": self.imbalance.to_dict(),
            "unreadable": each(self.unreadable),
            "skipped": each(self.skipped),
            "extension_mismatch": each(self.extension_mismatch),
            "tiny": each(self.tiny),
            "enormous": each(self.enormous),
            "exact_duplicates": each(self.exact_duplicates),
            "near_duplicates": each(self.near_duplicates),
            "label_conflicts": each(self.label_conflicts),
            "leakage": each(self.leakage),
            "splits_checked": list(self.splits_checked),
        }
        if self.labels is not None:
            d["label_check"] = self.labels.summary()
            d["label_issues"] = each(self.labels.issues)
        if self.label_sets is not None:
            d["multi_label"] = self.label_sets.to_dict()
        return d

    def to_json(self) -> str:
        """``inspect.json``'s text."""
        return json.dumps(self.to_dict(), indent=1) + "\n"


def _plain(v: Any) -> Any:
    return dict(v) if isinstance(v, dict) else list(v) if isinstance(v, (list, tuple)) else v


def _as_dict(report: DoctorReport | dict[str, Any]) -> dict[str, Any]:
    return report.to_dict() if isinstance(report, DoctorReport) else report


# --------------------------------------------------------------------------- checks


@dataclass
class ScanView:
    """A scan lined up with its source: relative path, class and split per item, and the groups."""

    rel: list[str]
    cls: list[str]
    split: np.ndarray  # split name per item ("" when none)
    infos: list[ItemInfo]
    groups: Groups

    @classmethod
    def of(
        cls, index: D.SourceIndex, infos: list[ItemInfo], groups: Groups, split: np.ndarray | None = None
    ) -> ScanView:
        return cls(
            rel=[index.relpath(it) for it in index.items],
            cls=[index.classes[int(y)] for y in index.labels],
            split=np.asarray(index.split if split is None else split, dtype=object),
            infos=infos,
            groups=groups,
        )

    def sized(self, i: int) -> SizedFile:
        return SizedFile(self.rel[i], self.cls[i], (self.infos[i].width, self.infos[i].height))

    def group(self, g: list[int], kind: str | None = None) -> Group:
        """Group of items ``g``; ``kind`` None: exact when all members have the same bytes."""
        if kind is None:
            kind = "exact" if len({self.infos[i].digest for i in g}) == 1 else "near"
        dist = self.groups.max_dist.get(int(self.groups.component[g[0]]), 0) if kind == "near" else None
        return Group(kind, [self.sized(i) for i in g], sorted({self.cls[i] for i in g}), dist)


def check_unreadable(v: ScanView) -> list[Unreadable]:
    """Files that did not decode."""
    return [Unreadable(v.rel[i.index], v.cls[i.index], i.error, i.detail) for i in v.infos if not i.ok]


def check_skipped(index: D.SourceIndex) -> list[Skipped]:
    """What listing the folders left out (``index.skipped``), with the class folder it was under."""
    out = []
    for path, reason in index.skipped:
        rel = index.relpath(path)
        cls = next((c for c in Path(rel).parts[:-1] if c in index.classes), "")
        out.append(Skipped(rel, cls, reason))
    return out


def check_format_mismatch(v: ScanView) -> list[FormatMismatch]:
    """Files whose sniffed format is not one their extension allows (built-in arrays are skipped)."""
    out = []
    for i in v.infos:
        ext = Path(v.rel[i.index]).suffix.lower()
        if i.format and i.format != "array":
            allowed = EXT_FORMATS.get(ext)
            if allowed is None or i.format not in allowed:
                out.append(FormatMismatch(v.rel[i.index], v.cls[i.index], ext or "(none)", i.format))
    return out


def check_sizes(
    v: ScanView, min_side: int = MIN_SIDE, huge_pixels: int = HUGE_PIXELS
) -> tuple[list[SizedFile], list[SizedFile]]:
    """(tiny, enormous): readable images with a side below ``min_side``, or over ``huge_pixels``."""
    ok = [i for i in v.infos if i.ok]
    tiny = [v.sized(i.index) for i in ok if min(i.width, i.height) < min_side]
    huge = [v.sized(i.index) for i in ok if i.width * i.height > huge_pixels]
    return tiny, huge


def check_duplicates(v: ScanView) -> tuple[list[Group], list[Group]]:
    """(exact, near): byte-identical groups, and merged groups that are not just one exact group."""
    return [v.group(g, "exact") for g in v.groups.exact], [v.group(g, "near") for g in v.groups.near]


def check_label_conflicts(v: ScanView) -> list[Group]:
    """Groups of copies filed under more than one class."""
    return [v.group(g) for g in v.groups.merged if len({v.cls[i] for i in g}) > 1]


def check_leakage(v: ScanView) -> list[Group]:
    """Groups of copies spread over more than one split."""
    out = []
    for g in v.groups.merged:
        names = sorted({str(v.split[i]) for i in g if v.split[i]})
        if len(names) > 1:
            grp = v.group(g)
            grp.splits, grp.split_of = names, [str(v.split[i]) for i in g]
            out.append(grp)
    return out


def imbalance(counts: dict[str, int]) -> Imbalance:
    """Largest/smallest class ratio and what to do about it."""
    nz = {k: n for k, n in counts.items() if n > 0}
    if not nz:
        return Imbalance(None, None, None, "no readable images")
    big, small = max(nz, key=nz.get), min(nz, key=nz.get)
    ratio = nz[big] / nz[small]
    empty = sorted(k for k, n in counts.items() if n == 0)
    if empty:
        tip = f"classes with no readable images: {', '.join(empty)}; add images or remove the folders"
    elif ratio > D.SEVERE_IMBALANCE:
        tip = (
            "severe imbalance: collect more images of the small classes, and train with --class-weights auto"
        )
    elif ratio > IMBALANCE_RATIO:
        tip = "imbalanced: train with --class-weights auto"
    else:
        tip = "balanced enough; nothing to do"
    return Imbalance(round(ratio, 3), big, small, tip)


def _range(vals: list[int]) -> list[int] | None:
    return [int(min(vals)), int(max(vals))] if vals else None


def _image_stats(infos: list[ItemInfo], stats: ClassStats) -> ClassStats:
    """Fill images, readable, formats, modes, size ranges and bytes of ``stats`` from ``infos``."""
    ok = [i for i in infos if i.ok]
    stats.images, stats.readable = len(infos), len(ok)
    stats.formats = dict(Counter(i.format for i in infos if i.format))
    stats.modes = dict(Counter(i.mode or "?" for i in ok))
    stats.width_range = _range([i.width for i in ok])
    stats.height_range = _range([i.height for i in ok])
    stats.bytes = sum(i.nbytes for i in infos)
    return stats


def _members(groups: list[Group], c: str) -> list[int]:
    """Per group, how many of its items are in class ``c``."""
    return [sum(1 for e in g.items if e.cls == c) for g in groups]


def class_stats(v: ScanView, classes: list[str], r: DoctorReport) -> dict[str, ClassStats]:
    """Per class: image statistics and how many of its files each check found."""
    by_class: dict[str, list[ItemInfo]] = {c: [] for c in classes}
    for i in v.infos:
        by_class[v.cls[i.index]].append(i)
    out = {}
    for c in classes:
        st = _image_stats(by_class[c], ClassStats())
        st.unreadable = sum(1 for e in r.unreadable if e.cls == c)
        st.extension_mismatch = sum(1 for e in r.extension_mismatch if e.cls == c)
        st.tiny = sum(1 for e in r.tiny if e.cls == c)
        st.enormous = sum(1 for e in r.enormous if e.cls == c)
        # copies beyond the first of each group, counted in the class that holds them
        st.exact_duplicate_copies = sum(max(0, n - 1) for n in _members(r.exact_duplicates, c))
        st.near_duplicate_images = sum(_members(r.near_duplicates, c))
        st.conflict_images = sum(_members(r.label_conflicts, c))
        out[c] = st
    return out


def totals(v: ScanView, r: DoctorReport) -> Totals:
    """Image statistics over the whole source and the size of each finding."""
    t = _image_stats(v.infos, Totals())
    t.modes = dict(Counter(i.mode for i in v.infos if i.ok and i.mode))
    t.unreadable, t.extension_mismatch = len(r.unreadable), len(r.extension_mismatch)
    t.tiny, t.enormous = len(r.tiny), len(r.enormous)
    t.exact_duplicate_groups = len(r.exact_duplicates)
    t.exact_duplicate_copies = sum(len(g.items) - 1 for g in r.exact_duplicates)
    t.near_duplicate_groups = len(r.near_duplicates)
    t.near_duplicate_images = sum(len(g.items) for g in r.near_duplicates)
    t.conflict_images = sum(len(g.items) for g in r.label_conflicts)
    t.label_conflicts, t.leakage_groups = len(r.label_conflicts), len(r.leakage)
    return t


def _split_of(index: D.SourceIndex, splits_file: str | None) -> np.ndarray:
    """Split name per item: the source's own layout, or a run's splits.json when given."""
    if not splits_file:
        return np.asarray(index.split, dtype=object)
    p = Path(splits_file)
    try:
        spec = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise D.DataError(f"{p}: cannot read splits file ({e}); give a run's splits.json") from e
    if not isinstance(spec, dict) or not all(isinstance(v, list) for v in spec.values()):
        raise D.DataError(f"{p}: expected {{split: [relative paths]}} as in a run's splits.json")
    where = {str(rel): name for name, rels in spec.items() for rel in rels}
    out = np.asarray([where.get(index.relpath(it), "") for it in index.items], dtype=object)
    if not (out != "").any():
        raise D.DataError(f"{p}: none of its paths are items of {index.name}; was it made from this --data?")
    return out


def analyse(
    index: D.SourceIndex,
    infos: list[ItemInfo],
    groups: Groups,
    *,
    split: np.ndarray | None = None,
    threshold: int | None = NEAR_THRESHOLD,
    min_side: int = MIN_SIDE,
    huge_pixels: int = HUGE_PIXELS,
    seconds: float = 0.0,
) -> DoctorReport:
    """Run every check on a scan; ``threshold`` None records that near-duplicates were not checked."""
    v = ScanView.of(index, infos, groups, split)
    tiny, huge = check_sizes(v, min_side, huge_pixels)
    exact, near = check_duplicates(v)
    r = DoctorReport(
        source=index.name,
        kind=index.kind,
        classes=list(index.classes),
        seconds=round(seconds, 3),
        settings=Settings(threshold, min_side, huge_pixels),
        totals=Totals(),
        per_class={},
        imbalance=Imbalance(None, None, None, ""),
        unreadable=check_unreadable(v),
        extension_mismatch=check_format_mismatch(v),
        tiny=tiny,
        enormous=huge,
        exact_duplicates=exact,
        near_duplicates=near,
        label_conflicts=check_label_conflicts(v),
        leakage=check_leakage(v),
        splits_checked=sorted({str(s) for s in v.split if s}),
        index=index,
        infos=infos,
        skipped=check_skipped(index),
    )
    r.per_class = class_stats(v, r.classes, r)
    r.totals = totals(v, r)
    r.imbalance = imbalance({c: st.readable for c, st in r.per_class.items()})
    return r


def inspect_source(
    spec: str | Path,
    *,
    near: bool = True,
    threshold: int = NEAR_THRESHOLD,
    splits_file: str | Path | None = None,
    workers: int = 2,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
    huge_pixels: int = HUGE_PIXELS,
    cache_dir: str | None = None,
    progress: bool = True,
    multi_label: bool = False,
    label_sep: str = "_",
) -> DoctorReport:
    """Index, scan and analyse a ``--data`` source (the scan stays on ``report.index``/``.infos``).

    ``multi_label``: every label set is a class for the general checks (duplicates, conflicts across
    sets), and ``report.label_sets`` adds label counts, co-occurrence, rare labels, empty and
    contradictory sets.
    """
    t0 = time.perf_counter()
    ml_index = D.index_source(str(spec), cache_dir, multi_label=multi_label, label_sep=label_sep)
    index = as_label_set_classes(ml_index) if multi_label else ml_index
    split = _split_of(index, str(splits_file) if splits_file else None)
    infos = scan(index, near=near, workers=workers, max_pixels=max_pixels, progress=progress)
    groups = find_groups(infos, near=near, threshold=threshold, progress=progress)
    report = analyse(
        index,
        infos,
        groups,
        split=split,
        threshold=threshold if near else None,
        min_side=min_side,
        huge_pixels=huge_pixels,
        seconds=time.perf_counter() - t0,
    )
    if multi_label:
        digests = [""] * len(index)
        for info in infos:
            digests[info.index] = info.digest
        report.label_sets = check_label_sets(ml_index, digests)
    return report


def write_report(
    report: DoctorReport, out_dir: str | Path, *, html: bool = True, progress: bool = False
) -> list[Path]:
    """Write ``inspect.json`` (and ``inspect.html`` unless ``html`` is False) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "inspect.json"]
    paths[0].write_text(report.to_json())
    if html:
        paths.append(out / "inspect.html")
        write_html(report, None, paths[1], progress=progress)
    return paths


# --------------------------------------------------------------------------- outputs


def summary_text(report: DoctorReport | dict[str, Any], max_list: int = 10) -> str:
    """The human summary: a per-class table, then each problem with up to ``max_list`` files."""
    report = _as_dict(report)
    lines = [
        f"imgclf inspect: {report['source']} ({report['totals']['images']} files, {report['seconds']:.1f} s)",
        *_class_table(report),
        "",
        *_totals_lines(report),
        *_problem_lines(report, max_list),
    ]
    return "\n".join(lines)


# Columns of the per-class table: heading and the per-class key (None: formatted specially).
_TABLE_COLS = [
    ("class", None),
    ("images", "images"),
    ("unread", "unreadable"),
    ("ext!=fmt", "extension_mismatch"),
    ("tiny", "tiny"),
    ("huge", "enormous"),
    ("exact+", "exact_duplicate_copies"),
    ("near", "near_duplicate_images"),
    ("conflict", "conflict_images"),
    ("size (w x h)", None),
    ("formats", None),
]


def _size_range(d: dict[str, Any]) -> str:
    w, h = d["width_range"], d["height_range"]
    if not w:
        return "-"
    fw = f"{w[0]}" if w[0] == w[1] else f"{w[0]}-{w[1]}"
    fh = f"{h[0]}" if h[0] == h[1] else f"{h[0]}-{h[1]}"
    return f"{fw} x {fh}"


def _class_table(report: dict[str, Any]) -> list[str]:
    """One row a class and a TOTAL row, columns padded to width."""
    rows = []
    for name, d in [*report["per_class"].items(), ("TOTAL", report["totals"])]:
        row = [name] + [str(d.get(key, "")) for _, key in _TABLE_COLS[1:-2]]
        if name == "TOTAL":
            row[6] = str(d["exact_duplicate_copies"])
        fmts = ",".join(f"{k}:{v}" for k, v in sorted(d["formats"].items())) or "-"
        rows.append([*row, _size_range(d), fmts])
    head = [c for c, _ in _TABLE_COLS]
    widths = [max(len(head[k]), *(len(r[k]) for r in rows)) for k in range(len(head))]
    rule = "  ".join("-" * w for w in widths)
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), rule]
    for r in rows:
        if r[0] == "TOTAL":
            lines.append(rule)
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    return lines


def _totals_lines(report: dict[str, Any]) -> list[str]:
    """Class imbalance and the duplicate / conflict / leakage counts."""
    t, im, lines = report["totals"], report["imbalance"], []
    if im["ratio"] is not None:
        lines.append(
            f"class imbalance: {im['largest']}/{im['smallest']} = {im['ratio']:.2f}x -> {im['suggestion']}"
        )
    thr = report["settings"]["near_threshold"]
    near = (
        f"(phash distance <= {thr}): {t['near_duplicate_groups']} group(s); "
        if thr is not None
        else "not checked (--no-near); "
    )
    lines.append(
        f"exact duplicates: {t['exact_duplicate_groups']} group(s); near-duplicates {near}"
        f"label conflicts: {t['label_conflicts']}; cross-split leakage: {t['leakage_groups']}"
        + ("" if report["splits_checked"] else " (no splits to check)")
    )
    return lines


def _group_line(g: dict[str, Any]) -> str:
    s = " = ".join(e["path"] for e in g["items"][:4]) + (" ..." if len(g["items"]) > 4 else "")
    extra = f" [distance <= {g['max_distance']}]" if g["kind"] == "near" else ""
    if "splits" in g:
        extra += f" [splits: {', '.join(g['splits'])}]"
    return s + extra


def _problem_lines(report: dict[str, Any], max_list: int) -> list[str]:
    """Each problem's section (up to ``max_list`` entries), label sets and the label check."""
    lines: list[str] = []

    def section(title: str, entries: list[dict[str, Any]], fmt: Any) -> None:
        if not entries:
            return
        lines.append(f"\n{title} ({len(entries)}):")
        lines.extend("  " + fmt(e) for e in entries[:max_list])
        if len(entries) > max_list:
            lines.append(f"  ... {len(entries) - max_list} more in inspect.json")

    section("unreadable", report["unreadable"], lambda e: f"{e['path']}: {e['reason']}")
    section("skipped while listing", report.get("skipped", []), lambda e: f"{e['path']}: {e['reason']}")
    section(
        "extension does not match content",
        report["extension_mismatch"],
        lambda e: f"{e['path']}: named {e['extension']}, is {e['format']}",
    )
    section("tiny", report["tiny"], lambda e: f"{e['path']}: {e['size'][0]}x{e['size'][1]}")
    section("enormous", report["enormous"], lambda e: f"{e['path']}: {e['size'][0]}x{e['size'][1]}")
    section("label conflicts (same image in several classes)", report["label_conflicts"], _group_line)
    section("train/val/test leakage", report["leakage"], _group_line)
    section("exact duplicate groups", report["exact_duplicates"], _group_line)
    section("near-duplicate groups", report["near_duplicates"], _group_line)
    if "multi_label" in report:
        lines.append("")
        lines += LabelSetReport(**report["multi_label"]).summary_lines()
    if "label_check" in report:
        lc = report["label_check"]
        lines.append(
            f"\nlabel check: {lc['folds']}-fold {lc['model']} at {lc['img_size']} px, {lc['epochs']} epochs, "
            f"{lc['seconds']:.0f} s; out-of-fold accuracy {lc['oof_accuracy']:.3f}; "
            f"{lc['flagged']} of {lc['images']} images flagged"
        )
        section(
            "likely label errors, worst first (score = probability of the given label)",
            report["label_issues"],
            lambda e: (
                f"{e['path']}: {e['given']} -> {e['suggested']} "
                f"(score {e['score']:.3f}, {e['suggested']} {e['confidence']:.3f})"
            ),
        )
    return lines


def _thumb(index: D.SourceIndex, i: int, side: int = 96) -> str:
    """A small inline JPEG (data: URI) of item ``i``; empty when it cannot be decoded."""
    try:
        if index.arrays is not None:
            img = Image.fromarray(index.arrays[i]).convert("RGB")
        else:
            src = index.reader(index.items[i]) if index.reader else index.items[i]
            img = open_image(src, channels=3, size=(side, side))
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
    except (ImageDecodeError, OSError, ValueError):
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _label_html(
    report: dict[str, Any], index: D.SourceIndex, pos: dict[str, int], max_items: int
) -> list[str]:
    """The "likely label errors" section: one card per flagged image, worst first."""
    esc = html.escape
    lc, issues = report["label_check"], report["label_issues"]
    out = [
        f"<h2>Likely label errors ({len(issues)})</h2>",
        f"<p>{esc(lc['method'])}; out-of-fold probabilities of {lc['folds']} {esc(lc['model'])} models "
        f"({lc['img_size']} px, {lc['epochs']} epochs), out-of-fold accuracy {lc['oof_accuracy']:.3f}, "
        f"{lc['seconds']:.0f} s. Score: the held-out probability of the given label (lower = more "
        "likely wrong).</p><div class='g'>",
    ]
    for e in issues[:max_items]:
        i = pos.get(e["path"])
        src = _thumb(index, i) if i is not None else ""
        im = f"<img src='{src}' alt=''>" if src else "<div class='miss'></div>"
        out.append(
            f"<div class='c'>{im}{esc(e['path'])}<br>given <b>{esc(e['given'])}</b> &rarr; "
            f"<b>{esc(e['suggested'])}</b><br>score {e['score']:.3f} &middot; {e['confidence']:.2f}</div>"
        )
    out.append("</div>")
    if len(issues) > max_items:
        out.append(f"<p>... {len(issues) - max_items} more in inspect.json</p>")
    return out


def _label_sets_html(ml: dict[str, Any]) -> list[str]:
    """The multi-label section: label counts, rare labels, empty and contradictory sets, co-occurrence."""
    esc = html.escape
    labels = ml["labels"]
    out = [
        f"<h2>Labels ({len(labels)}, multi-label)</h2>",
        f"<p>{ml['images']} images, {ml['mean_labels_per_image']:.2f} labels an image, "
        f"{ml['label_sets']} distinct label sets.</p><table><tr><th>label</th><th>images</th></tr>",
    ]
    for c in labels:
        low = " style='background:#fde8e8'" if c in ml["rare"] else ""
        out.append(f"<tr{low}><td>{esc(c)}</td><td>{ml['counts'][c]}</td></tr>")
    out.append("</table>")
    if ml["rare"]:
        out.append(f"<p>Fewer than {ml['min_images']} images (too few to learn well): "
                   + esc(", ".join(f"{k} ({v})" for k, v in ml["rare"].items())) + "</p>")  # fmt: skip
    head = "".join(f"<th>{esc(c)}</th>" for c in labels)
    out.append(f"<h3>Co-occurrence (images holding both)</h3><table><tr><th></th>{head}</tr>")
    for c, row in zip(labels, ml["co_occurrence"]):
        out.append(f"<tr><th>{esc(c)}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>")
    out.append("</table>")
    if ml["empty"]:
        out.append(f"<h3>No label ({len(ml['empty'])})</h3><p>" + esc(", ".join(ml["empty"][:50])) + "</p>")
    if ml["contradictory"]:
        out.append(f"<h3>Contradictory label sets ({len(ml['contradictory'])})</h3><ul>")
        for g in ml["contradictory"][:50]:
            out.append(
                "<li>" + esc("; ".join(f"{f} = {s}" for f, s in zip(g["files"], g["label_sets"]))) + "</li>"
            )
        out.append("</ul>")
    return out


def write_html(
    report: DoctorReport | dict[str, Any],
    index: D.SourceIndex | None,
    path: str | Path,
    max_groups: int = 200,
    progress: bool = False,
) -> None:
    """A self-contained page (no network): the class table and thumbnails of each group.

    ``index`` None: the source kept on the :class:`DoctorReport`.
    """
    from tqdm import tqdm

    if index is None:
        index = report.index if isinstance(report, DoctorReport) else None
        if index is None:
            raise ValueError("write_html needs the source index for a report given as a dict")
    report = _as_dict(report)

    pos = {index.relpath(it): i for i, it in enumerate(index.items)}
    esc = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>imgclf inspect</title><style>",
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
        ".g{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0 14px;padding:6px;border:1px solid #ddd}"
        ".c{width:110px;font-size:11px;word-break:break-all}.c img{display:block;max-width:96px}"
        ".miss{width:96px;height:96px;background:#eee}",
        "</style></head><body>",
        f"<h1>imgclf inspect: {esc(report['source'])}</h1>",
        f"<p>{report['totals']['images']} files, {report['seconds']:.1f} s. "
        f"Near-duplicates: {esc(report['settings']['near_hash'])}, "
        f"distance &lt;= {report['settings']['near_threshold']}.</p>",
        f"<p>Class imbalance: {esc(str(report['imbalance']['ratio']))}x &mdash; "
        f"{esc(report['imbalance']['suggestion'])}</p>",
    ]
    keys = list(next(iter(report["per_class"].values())).keys()) if report["per_class"] else []
    out.append("<table><tr><th>class</th>" + "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>")
    for name, d in [*report["per_class"].items(), ("TOTAL", report["totals"])]:
        cells = "".join(f"<td>{esc(json.dumps(d.get(k, '')))}</td>" for k in keys)
        out.append(f"<tr><td><b>{esc(name)}</b></td>{cells}</tr>")
    out.append("</table>")
    sections = [
        ("Label conflicts", report["label_conflicts"]),
        ("Train/val/test leakage", report["leakage"]),
        ("Exact duplicates", report["exact_duplicates"]),
        ("Near-duplicates", report["near_duplicates"]),
    ]
    n_thumbs = sum(min(len(g), max_groups) for _, g in sections)
    bar = tqdm(total=n_thumbs, desc="thumbnails", disable=not progress, leave=False)
    for title, groups in sections:
        out.extend(_groups_html(title, groups, index, pos, max_groups, bar))
    bar.close()
    if "label_issues" in report:
        out.extend(_label_html(report, index, pos, max_groups))
    if "multi_label" in report:
        out.extend(_label_sets_html(report["multi_label"]))
    out.extend(_file_tables_html(report))
    out.append("</body></html>")
    Path(path).write_text(display_path("\n".join(out)), encoding="utf-8")  # odd file names as \\xNN


def _groups_html(
    title: str,
    groups: list[dict[str, Any]],
    index: D.SourceIndex,
    pos: dict[str, int],
    max_groups: int,
    bar: Any,
) -> list[str]:
    """One section of image groups (conflicts, leakage, duplicates) as thumbnail cards; ``bar``
    (a tqdm bar) advances a group at a time."""
    esc = html.escape
    out = [f"<h2>{title} ({len(groups)})</h2>"]
    for g in groups[:max_groups]:
        cards = []
        for k, e in enumerate(g["items"]):
            i = pos.get(e["path"])
            src = _thumb(index, i) if i is not None else ""
            im = f"<img src='{src}' alt=''>" if src else "<div class='miss'></div>"
            where = f" [{esc(g['split_of'][k])}]" if "split_of" in g else ""
            cards.append(
                f"<div class='c'>{im}{esc(e['path'])}<br>class {esc(e['class'])}{where}<br>"
                f"{e['size'][0]}x{e['size'][1]}</div>"
            )
        extra = f" &middot; distance &lt;= {g['max_distance']}" if g["kind"] == "near" else ""
        out.append(f"<div>{esc(g['kind'])}{extra}</div><div class='g'>{''.join(cards)}</div>")
        bar.update(1)
    if len(groups) > max_groups:
        out.append(f"<p>... {len(groups) - max_groups} more groups in inspect.json</p>")
    return out


def _file_tables_html(report: dict[str, Any]) -> list[str]:
    """The per-file findings (unreadable, skipped, wrong extension, tiny, enormous) as tables."""
    esc = html.escape
    out: list[str] = []
    for title, key, fmt in [
        ("Unreadable", "unreadable", lambda e: f"{e['reason']} {e.get('detail', '')}"),
        ("Skipped while listing", "skipped", lambda e: e["reason"]),
        (
            "Extension does not match content",
            "extension_mismatch",
            lambda e: f"named {e['extension']}, is {e['format']}",
        ),
        ("Tiny", "tiny", lambda e: f"{e['size'][0]}x{e['size'][1]}"),
        ("Enormous", "enormous", lambda e: f"{e['size'][0]}x{e['size'][1]}"),
    ]:
        rows = report.get(key, [])  # "skipped" is absent from reports of older versions
        out.append(f"<h2>{title} ({len(rows)})</h2>")
        if rows:
            out.append("<table><tr><th>file</th><th>class</th><th>what</th></tr>")
            for e in rows:
                out.append(
                    f"<tr><td>{esc(e['path'])}</td><td>{esc(e['class'])}</td><td>{esc(fmt(e))}</td></tr>"
                )
            out.append("</table>")
    return out
