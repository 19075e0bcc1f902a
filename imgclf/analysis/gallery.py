"""Pictures of predictions: annotated copies of input images and the "Predicted / Actual" grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.analysis.evaluate import select_items
from imgclf.analysis.visualize import GREEN, RED, annotate, annotation_text, montage, source_image
from imgclf.core.imageio import open_image
from imgclf.data import sources as D
from imgclf.runtime.bundle import Bundle
from imgclf.runtime.predict import PredictResult, judge_from_filename


def annotation_lines(bundle: Bundle, result: PredictResult, extra: int = 0) -> list[str]:
    """Caption for an annotated image: ``label: 85.42% (correct)`` then ``extra`` runner-up lines.

    "correct"/"incorrect" appears only when the file name names a class (the tutorial's rule).
    """
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


def gallery(
    bundle: Bundle, data: str, n: int = 16, *, seed: int | None = None, split: str | None = None
) -> tuple[bytes, int, int]:
    """The tutorial's random test-sample view: a PNG grid titled "Predicted: 5, Actual: 5".

    Samples come from the same split ``imgclf evaluate`` uses. Returns (PNG, correct, shown).
    """

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
