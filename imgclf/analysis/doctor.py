"""The dataset doctor: unreadable files, format lies, odd sizes, duplicates, label conflicts, leakage.

:func:`scan` reads every item once (content hash, header probe, a real decode through
:func:`imgclf.core.imageio.open_image`, a perceptual hash); :func:`analyse` turns the scan into
a report; :func:`dedup_for_training` is the fast path ``train`` runs before splitting.

Near-duplicates: the DCT perceptual hash of ``imagehash.phash`` with ``hash_size=16``
(256 bits). Two images are near-duplicates when their hashes differ in at most
:data:`NEAR_THRESHOLD` bits. Measured on sign-language-digits (2,062 photos of hands on
similar backgrounds): copies resized by 0.5-1.3x and re-encoded as JPEG at quality 60-90
differ by at most 16 bits, while the closest pair of distinct photos differs by 42.
The 64-bit hash (``hash_size=8``) was not usable there: distinct photos came within 2 bits.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgclf.core.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image
from imgclf.data import sources as D
from imgclf.data.dedup import EXT_FORMATS, HASH_SIZE, NEAR_THRESHOLD, Groups, ItemInfo, find_groups, scan

log = logging.getLogger("imgclf")

MIN_SIDE = 16  # images with a side below this many pixels are "tiny"
HUGE_PIXELS = 25_000_000  # images above this many pixels (e.g. 5000x5000) are "enormous"
IMBALANCE_RATIO = 1.5  # largest/smallest class count above which we suggest --class-weights auto


# --------------------------------------------------------------------------- report


def _range(vals: list[int]) -> list[int] | None:
    return [int(min(vals)), int(max(vals))] if vals else None


def imbalance(counts: dict[str, int]) -> dict[str, Any]:
    """Largest/smallest class ratio and what to do about it."""
    nz = {k: v for k, v in counts.items() if v > 0}
    if not nz:
        return {"ratio": None, "largest": None, "smallest": None, "suggestion": "no readable images"}
    big, small = max(nz, key=nz.get), min(nz, key=nz.get)
    ratio = nz[big] / nz[small]
    empty = sorted(k for k, v in counts.items() if v == 0)
    if empty:
        tip = f"classes with no readable images: {', '.join(empty)}; add images or remove the folders"
    elif ratio > 10:
        tip = (
            "severe imbalance: collect more images of the small classes, and train with --class-weights auto"
        )
    elif ratio > IMBALANCE_RATIO:
        tip = "imbalanced: train with --class-weights auto"
    else:
        tip = "balanced enough; nothing to do"
    return {"ratio": round(ratio, 3), "largest": big, "smallest": small, "suggestion": tip}


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
    threshold: int = NEAR_THRESHOLD,
    min_side: int = MIN_SIDE,
    huge_pixels: int = HUGE_PIXELS,
    seconds: float = 0.0,
) -> dict[str, Any]:
    """The full report (JSON-ready): per class, totals, and each problem with its files."""
    rel = [index.relpath(it) for it in index.items]
    cls = [index.classes[int(y)] for y in index.labels]
    split = np.asarray(index.split if split is None else split, dtype=object)

    def entry(i: int, **kw: Any) -> dict[str, Any]:
        return {"path": rel[i], "class": cls[i], **kw}

    unreadable = [entry(i.index, reason=i.error, detail=i.detail) for i in infos if not i.ok]
    mismatch = []
    for i in infos:
        ext = Path(rel[i.index]).suffix.lower()
        if i.format and i.format != "array":
            allowed = EXT_FORMATS.get(ext)
            if allowed is None or i.format not in allowed:
                mismatch.append(entry(i.index, extension=ext or "(none)", format=i.format))
    tiny = [
        entry(i.index, size=[i.width, i.height]) for i in infos if i.ok and min(i.width, i.height) < min_side
    ]
    huge = [
        entry(i.index, size=[i.width, i.height]) for i in infos if i.ok and i.width * i.height > huge_pixels
    ]

    def group_entry(g: list[int], kind: str) -> dict[str, Any]:
        d = {
            "kind": kind,
            "items": [entry(i, size=[infos[i].width, infos[i].height]) for i in g],
            "classes": sorted({cls[i] for i in g}),
        }
        if kind == "near":
            d["max_distance"] = groups.max_dist.get(int(groups.component[g[0]]), 0)
        return d

    def kind_of(g: list[int]) -> str:
        return "exact" if len({infos[i].digest for i in g}) == 1 else "near"

    exact = [group_entry(g, "exact") for g in groups.exact]
    near = [group_entry(g, "near") for g in groups.near]
    conflicts = [group_entry(g, kind_of(g)) for g in groups.merged if len({cls[i] for i in g}) > 1]
    leakage = []
    for g in groups.merged:
        names = sorted({str(split[i]) for i in g if split[i]})
        if len(names) > 1:
            leakage.append(
                {**group_entry(g, kind_of(g)), "splits": names, "split_of": [str(split[i]) for i in g]}
            )

    per_class: dict[str, dict[str, Any]] = {}
    for c in index.classes:
        per_class[c] = {
            "images": 0,
            "readable": 0,
            "formats": Counter(),
            "modes": Counter(),
            "widths": [],
            "heights": [],
            "bytes": 0,
        }
    for inf in infos:
        pc = per_class[cls[inf.index]]
        pc["images"] += 1
        pc["bytes"] += inf.nbytes
        if inf.format:
            pc["formats"][inf.format] += 1
        if inf.ok:
            pc["readable"] += 1
            pc["modes"][inf.mode or "?"] += 1
            pc["widths"].append(inf.width)
            pc["heights"].append(inf.height)

    def count(lst: list[dict[str, Any]], c: str) -> int:
        return sum(1 for e in lst if e["class"] == c)

    def dup_extra(glist: list[dict[str, Any]], c: str) -> int:
        # copies beyond the first of each group, counted in the class that holds them
        return sum(max(0, sum(1 for e in g["items"] if e["class"] == c) - 1) for g in glist)

    classes_out = {}
    for c, pc in per_class.items():
        classes_out[c] = {
            "images": pc["images"],
            "readable": pc["readable"],
            "formats": dict(pc["formats"]),
            "modes": dict(pc["modes"]),
            "width_range": _range(pc["widths"]),
            "height_range": _range(pc["heights"]),
            "bytes": pc["bytes"],
            "unreadable": count(unreadable, c),
            "extension_mismatch": count(mismatch, c),
            "tiny": count(tiny, c),
            "enormous": count(huge, c),
            "exact_duplicate_copies": dup_extra(exact, c),
            "near_duplicate_images": sum(sum(1 for e in g["items"] if e["class"] == c) for g in near),
            "conflict_images": sum(sum(1 for e in g["items"] if e["class"] == c) for g in conflicts),
        }
    ok = [i for i in infos if i.ok]
    totals = {
        "images": len(infos),
        "readable": len(ok),
        "formats": dict(Counter(i.format for i in infos if i.format)),
        "modes": dict(Counter(i.mode for i in ok if i.mode)),
        "width_range": _range([i.width for i in ok]),
        "height_range": _range([i.height for i in ok]),
        "bytes": sum(i.nbytes for i in infos),
        "unreadable": len(unreadable),
        "extension_mismatch": len(mismatch),
        "tiny": len(tiny),
        "enormous": len(huge),
        "exact_duplicate_groups": len(exact),
        "exact_duplicate_copies": sum(len(g["items"]) - 1 for g in exact),
        "near_duplicate_groups": len(near),
        "near_duplicate_images": sum(len(g["items"]) for g in near),
        "conflict_images": sum(len(g["items"]) for g in conflicts),
        "label_conflicts": len(conflicts),
        "leakage_groups": len(leakage),
    }
    return {
        "source": index.name,
        "kind": index.kind,
        "classes": list(index.classes),
        "seconds": round(seconds, 3),
        "settings": {
            "near_hash": f"imagehash.phash hash_size={HASH_SIZE} ({HASH_SIZE**2} bits)",
            "near_threshold": threshold,
            "min_side": min_side,
            "huge_pixels": huge_pixels,
        },
        "totals": totals,
        "per_class": classes_out,
        "imbalance": imbalance({c: v["readable"] for c, v in classes_out.items()}),
        "unreadable": unreadable,
        "extension_mismatch": mismatch,
        "tiny": tiny,
        "enormous": huge,
        "exact_duplicates": exact,
        "near_duplicates": near,
        "label_conflicts": conflicts,
        "leakage": leakage,
        "splits_checked": sorted({str(s) for s in split if s}),
    }


def inspect_source(
    spec: str,
    *,
    near: bool = True,
    threshold: int = NEAR_THRESHOLD,
    splits_file: str | None = None,
    workers: int = 2,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
    huge_pixels: int = HUGE_PIXELS,
    cache_dir: str | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], D.SourceIndex, list[ItemInfo]]:
    """Index, scan and analyse a ``--data`` source; returns (report, index, scan)."""
    t0 = time.perf_counter()
    index = D.index_source(spec, cache_dir)
    split = _split_of(index, splits_file)
    infos = scan(index, near=near, workers=workers, max_pixels=max_pixels, progress=progress)
    groups = find_groups(infos, near=near, threshold=threshold, progress=progress)
    report = analyse(
        index,
        infos,
        groups,
        split=split,
        threshold=threshold,
        min_side=min_side,
        huge_pixels=huge_pixels,
        seconds=time.perf_counter() - t0,
    )
    if not near:
        report["settings"]["near_threshold"] = None
    return report, index, infos


# --------------------------------------------------------------------------- training hook


# --------------------------------------------------------------------------- outputs


def summary_text(report: dict[str, Any], max_list: int = 10) -> str:
    """The human summary: a per-class table, then each problem with up to ``max_list`` files."""
    cols = [
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

    def size(d: dict[str, Any]) -> str:
        w, h = d["width_range"], d["height_range"]
        if not w:
            return "-"
        fw = f"{w[0]}" if w[0] == w[1] else f"{w[0]}-{w[1]}"
        fh = f"{h[0]}" if h[0] == h[1] else f"{h[0]}-{h[1]}"
        return f"{fw} x {fh}"

    def fmts(d: dict[str, Any]) -> str:
        return ",".join(f"{k}:{v}" for k, v in sorted(d["formats"].items())) or "-"

    rows = []
    for name, d in [*report["per_class"].items(), ("TOTAL", report["totals"])]:
        row = [name]
        for _, key in cols[1:-2]:
            row.append(str(d.get(key, "")))
        if name == "TOTAL":
            row[6] = str(d["exact_duplicate_copies"])
        row += [size(d), fmts(d)]
        rows.append(row)
    head = [c for c, _ in cols]
    widths = [max(len(head[k]), *(len(r[k]) for r in rows)) for k in range(len(head))]
    lines = [
        f"imgclf inspect: {report['source']} ({report['totals']['images']} files, {report['seconds']:.1f} s)"
    ]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        if r[0] == "TOTAL":
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    t = report["totals"]
    im = report["imbalance"]
    lines.append("")
    if im["ratio"] is not None:
        lines.append(
            f"class imbalance: {im['largest']}/{im['smallest']} = {im['ratio']:.2f}x -> {im['suggestion']}"
        )
    lines.append(
        f"exact duplicates: {t['exact_duplicate_groups']} group(s); near-duplicates "
        + (
            f"(phash distance <= {thr}): {t['near_duplicate_groups']} group(s); "
            if (thr := report["settings"]["near_threshold"]) is not None
            else "not checked (--no-near); "
        )
        + f"label conflicts: {t['label_conflicts']}; cross-split leakage: {t['leakage_groups']}"
        + ("" if report["splits_checked"] else " (no splits to check)")
    )

    def section(title: str, entries: list[dict[str, Any]], fmt: Any) -> None:
        if not entries:
            return
        lines.append(f"\n{title} ({len(entries)}):")
        for e in entries[:max_list]:
            lines.append("  " + fmt(e))
        if len(entries) > max_list:
            lines.append(f"  ... {len(entries) - max_list} more in inspect.json")

    section("unreadable", report["unreadable"], lambda e: f"{e['path']}: {e['reason']}")
    section(
        "extension does not match content",
        report["extension_mismatch"],
        lambda e: f"{e['path']}: named {e['extension']}, is {e['format']}",
    )
    section("tiny", report["tiny"], lambda e: f"{e['path']}: {e['size'][0]}x{e['size'][1]}")
    section("enormous", report["enormous"], lambda e: f"{e['path']}: {e['size'][0]}x{e['size'][1]}")

    def grp(g: dict[str, Any]) -> str:
        s = " = ".join(e["path"] for e in g["items"][:4]) + (" ..." if len(g["items"]) > 4 else "")
        extra = f" [distance <= {g['max_distance']}]" if g["kind"] == "near" else ""
        if "splits" in g:
            extra += f" [splits: {', '.join(g['splits'])}]"
        return s + extra

    section("label conflicts (same image in several classes)", report["label_conflicts"], grp)
    section("train/val/test leakage", report["leakage"], grp)
    section("exact duplicate groups", report["exact_duplicates"], grp)
    section("near-duplicate groups", report["near_duplicates"], grp)
    return "\n".join(lines)


def _thumb(index: D.SourceIndex, i: int, side: int = 96) -> str:
    """A small inline JPEG (data: URI) of item ``i``; empty when it cannot be decoded."""
    try:
        if index.arrays is not None:
            img = Image.fromarray(index.arrays[i]).convert("RGB")
        else:
            img = open_image(index.items[i], channels=3, size=(side, side))
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
    except (ImageDecodeError, OSError, ValueError):
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(
    report: dict[str, Any],
    index: D.SourceIndex,
    path: str | Path,
    max_groups: int = 200,
    progress: bool = False,
) -> None:
    """A self-contained page (no network): the class table and thumbnails of each group."""
    from tqdm import tqdm

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
        out.append(f"<h2>{title} ({len(groups)})</h2>")
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
    bar.close()
    for title, key, fmt in [
        ("Unreadable", "unreadable", lambda e: f"{e['reason']} {e.get('detail', '')}"),
        (
            "Extension does not match content",
            "extension_mismatch",
            lambda e: f"named {e['extension']}, is {e['format']}",
        ),
        ("Tiny", "tiny", lambda e: f"{e['size'][0]}x{e['size'][1]}"),
        ("Enormous", "enormous", lambda e: f"{e['size'][0]}x{e['size'][1]}"),
    ]:
        rows = report[key]
        out.append(f"<h2>{title} ({len(rows)})</h2>")
        if rows:
            out.append("<table><tr><th>file</th><th>class</th><th>what</th></tr>")
            for e in rows:
                out.append(
                    f"<tr><td>{esc(e['path'])}</td><td>{esc(e['class'])}</td><td>{esc(fmt(e))}</td></tr>"
                )
            out.append("</table>")
    out.append("</body></html>")
    Path(path).write_text("\n".join(out), encoding="utf-8")
