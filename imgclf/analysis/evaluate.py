"""Evaluate a bundle on a data source: metrics, plots, a self-contained HTML report.

Data flows through the same code as training: :func:`imgclf.data.sources.index_source` lists the
items, the run's recorded ``splits.json`` (or the dataset's official split) picks them,
:func:`imgclf.data.sources.decode_items` decodes them with the bundle's preprocessing, and
:meth:`imgclf.runtime.bundle.Bundle.predict_batch` predicts. Unreadable files are listed, not fatal.

Expected calibration error (ECE) uses 15 equal-width bins over the top-1 probability
(0, 1/15], ..., (14/15, 1]: ``ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|``
(Guo et al., 2017). 0 means the model's confidence matches its accuracy.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.data import sources as D
from imgclf.runtime.bundle import Bundle, recorded_splits

log = logging.getLogger("imgclf")

ECE_BINS = 15
SPLITS = ("test", "val", "all")
# Hue rotations used by the colour-bias probe, as fractions of the colour wheel.
HUE_SHIFTS = (0.25, 0.5)


@dataclass
class Selection:
    """Which items of a source are evaluated, and why (``note`` is shown to the user)."""

    idx: np.ndarray
    split: str
    note: str
    missing: list[str] = field(default_factory=list)  # recorded files no longer present


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    out_dir: Path | None
    files: dict[str, Path]
    probs: np.ndarray
    labels: np.ndarray
    items: list[str]


# --------------------------------------------------------------------------- selection


def select_items(bundle: Bundle, index: D.SourceIndex, split: str | None = None) -> Selection:
    """Pick the items to evaluate.

    ``split`` None: the official/predefined test split if the source has one, else the run's
    recorded test files, else its recorded validation files, else every item.
    """
    if split is not None and split not in SPLITS:
        raise D.DataError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    n = len(index)
    if split == "all":
        return Selection(np.arange(n), "all", f"all {n} items of {index.name}")
    rec, rec_path = recorded_splits(bundle)
    pos = {index.relpath(it): i for i, it in enumerate(index.items)}

    def from_recorded(name: str) -> Selection | None:
        names = (rec or {}).get(name) or []
        hits = [pos[r] for r in names if r in pos]
        if not hits:  # nothing recorded, or a different data source than the run's
            return None
        missing = [r for r in names if r not in pos]
        note = f"the training run's recorded {name} split ({len(hits)} files, from {rec_path})"
        if missing:
            note += f"; {len(missing)} recorded files are missing from {index.name}"
        return Selection(np.asarray(sorted(hits), dtype=np.int64), name, note, missing)

    want = split or "test"
    if index.has_predefined_split and (index.split == want).any():
        idx = np.flatnonzero(index.split == want)
        kind = "official" if index.kind in ("idx", "digits") else "predefined"
        return Selection(idx, want, f"the {kind} {want} split of {index.name} ({len(idx)} items)")
    sel = from_recorded(want)
    if sel is not None:
        return sel
    if split is None:
        sel = from_recorded("val")
        if sel is not None:
            sel.note += " (no test split was recorded; these files were held out from training)"
            return sel
        why = (
            "the bundle's run folder is gone"
            if rec_path is None or not rec_path.exists()
            else "no recorded split matches"
        )
        return Selection(
            np.arange(n),
            "all",
            f"all {n} items of {index.name} ({why}; "
            "if this data was used for training, the numbers are optimistic)",
        )
    where = f" and {rec_path} records none that match" if rec_path else " and the bundle has no run folder"
    raise D.DataError(
        f"--split {want}: {index.name} has no {want} split{where}. Use --split all, or point --data at "
        "the data the model was trained on."
    )


# --------------------------------------------------------------------------- metrics


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE over ``n_bins`` equal-width confidence bins (see the module docstring)."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right=True puts confidence c in the bin (edges[b], edges[b+1]].
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def compute_metrics(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], top_k: int = 5
) -> dict[str, Any]:
    """Accuracy, top-k accuracy, macro/weighted P/R/F1, per-class table, log loss, ECE, confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        classification_report,
        confusion_matrix,
        log_loss,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum(axis=1, keepdims=True)  # float32 rows can sum to 1 +- 1e-7; log_loss wants exact
    k_all = list(range(len(classes)))
    pred = p.argmax(axis=1)
    m: dict[str, Any] = {"n_images": int(len(y)), "accuracy": float(accuracy_score(y, pred))}
    # top-k is only informative for k < number of classes.
    k = min(top_k, len(classes) - 1)
    if k >= 2:
        m["top_k"] = k
        m["top_k_accuracy"] = float(top_k_accuracy_score(y, p, k=k, labels=k_all))
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = precision_recall_fscore_support(y, pred, labels=k_all, average=avg, zero_division=0)
        m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"] = float(pr), float(rc), float(f1)
    m["log_loss"] = float(log_loss(y, p, labels=k_all))
    m["ece"] = expected_calibration_error(p, y)
    m["ece_bins"] = ECE_BINS
    rep = classification_report(
        y, pred, labels=k_all, target_names=list(classes), output_dict=True, zero_division=0
    )
    m["per_class"] = {
        c: {
            "precision": float(rep[c]["precision"]),
            "recall": float(rep[c]["recall"]),
            "f1": float(rep[c]["f1-score"]),
            "support": int(rep[c]["support"]),
        }
        for c in classes
    }
    m["confusion_matrix"] = confusion_matrix(y, pred, labels=k_all).tolist()
    return m


def classification_report_text(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> str:
    """scikit-learn's text report, as the tutorials print it."""
    from sklearn.metrics import classification_report

    return classification_report(
        labels,
        np.asarray(probs).argmax(axis=1),
        labels=list(range(len(classes))),
        target_names=list(classes),
        digits=4,
        zero_division=0,
    )


# --------------------------------------------------------------------------- colour-bias probe


def greyscale(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> the same shape with colour removed (ITU-R 601 luma, as PIL's 'L')."""
    x = images.astype(np.float32)
    luma = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    return np.repeat(np.clip(luma + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def hue_shift(images: np.ndarray, shift: float) -> np.ndarray:
    """Rotate every pixel's hue by ``shift`` of the colour wheel, keeping saturation and brightness."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(images.astype(np.float32) / 255.0)
    hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
    return np.clip(hsv_to_rgb(hsv) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def bias_verdict(base: float, grey: float, hue: float, chance: float = 0.0) -> str:
    """Plain-words reading of the probe (accuracies as fractions; ``chance`` = 1 / classes)."""
    if base <= chance + 0.05:
        # A model at chance cannot lose accuracy, so "no drop" would read as "no colour bias".
        return (
            f"accuracy is {base * 100:.0f} %, close to chance ({chance * 100:.0f} %), so the probe cannot "
            f"tell whether the model leans on colour ({grey * 100:.0f} % greyscale, "
            f"{hue * 100:.0f} % hue-shifted)."
        )
    drop_g, drop_h = base - grey, base - hue
    worst = max(drop_g, drop_h)
    g = f"accuracy falls from {base * 100:.0f} % to {grey * 100:.0f} % without colour"
    h = f"to {hue * 100:.0f} % with hues shifted"
    if worst >= 0.10:
        return f"{g} and {h}: the model leans on colour."
    if worst >= 0.03:
        return f"{g} and {h}: the model uses colour somewhat; check the misclassified images."
    return (
        f"accuracy barely changes without colour ({base * 100:.0f} % -> {grey * 100:.0f} %) or with hues "
        f"shifted ({hue * 100:.0f} %): the model does not depend on colour."
    )


def bias_probe(bundle: Bundle, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy on the original, greyscale and hue-shifted images, all through ``predict_batch``."""
    base = float((bundle.predict_batch(images).argmax(1) == labels).mean())
    if bundle.pre.channels == 1:
        return {
            "applicable": False,
            "accuracy": base,
            "verdict": "the model sees greyscale images only, so colour cannot drive its predictions.",
        }
    grey = float((bundle.predict_batch(greyscale(images)).argmax(1) == labels).mean())
    hues = {
        f"{int(s * 360)}": float((bundle.predict_batch(hue_shift(images, s)).argmax(1) == labels).mean())
        for s in HUE_SHIFTS
    }
    worst_hue = min(hues.values())
    return {
        "applicable": True,
        "accuracy": base,
        "greyscale_accuracy": grey,
        "hue_shift_accuracy": hues,
        "verdict": bias_verdict(base, grey, worst_hue, 1.0 / len(bundle.classes)),
    }


# --------------------------------------------------------------------------- driver


def _predict(
    bundle: Bundle, images: np.ndarray, progress: bool, chunk: int = 256, tta: str | None = None
) -> np.ndarray:
    from tqdm import tqdm

    if tta:
        from imgclf.runtime.tta import predict_tta

        def run(x: np.ndarray) -> np.ndarray:
            return predict_tta(bundle, x, tta)
    else:
        run = bundle.predict_batch
    outs = [
        run(images[s : s + chunk])
        for s in tqdm(range(0, len(images), chunk), desc="predict", disable=not progress, leave=False)
    ]
    return np.concatenate(outs) if outs else np.zeros((0, len(bundle.classes)), dtype=np.float32)


def _history(run_dir: Path) -> list[dict[str, str]]:
    p = run_dir / "history.csv"
    if not p.exists():
        return []
    try:
        with open(p, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def evaluate(
    bundle: Bundle,
    data: str,
    *,
    split: str | None = None,
    out: str | Path | None = None,
    bias: bool = False,
    limit: int | None = None,
    top_k: int = 5,
    n_wrong: int = 25,
    progress: bool = True,
    cache_dir: str | None = None,
    workers: int = 2,
    seed: int = 42,
    tta: str | None = None,
) -> EvalResult:
    """Evaluate ``bundle`` on ``data``; with ``out`` write metrics, plots, CSV and report.html there.

    ``tta``: average over test-time-augmented views (a name from :data:`imgclf.runtime.tta.VIEW_SETS`;
    ``auto`` follows the bundle's training augmentation).
    """
    from imgclf.analysis import visualize as V

    index = D.index_source(data, cache_dir)
    if list(index.classes) != list(bundle.classes):
        extra = sorted(set(index.classes) - set(bundle.classes))
        raise D.DataError(
            f"{data}: classes {index.classes} do not match the bundle's {bundle.classes}"
            + (f" (unknown to the model: {extra})" if extra else "")
            + ". Evaluate on data with the same class folders the model was trained on."
        )
    sel = select_items(bundle, index, split)
    idx = sel.idx
    if limit and len(idx) > limit:
        idx = idx[D.stratified_subset(index.labels[idx], limit, seed)]
        sel.note += f"; a stratified sample of {len(idx)}"
    dec = D.decode_items(
        index, idx, bundle.pre, cache_dir=cache_dir, workers=workers, progress=progress, desc="decode"
    )
    failed = [{"file": index.relpath(it), "reason": r} for it, r in [*index.skipped, *dec.failed]]
    if len(dec.labels) == 0:
        raise D.DataError(f"{data}: none of the {len(idx)} selected images could be read ({failed[:3]} ...)")
    tta_name = None
    if tta:
        from imgclf.runtime.tta import auto_views

        tta_name = auto_views(bundle) if tta == "auto" else tta
    probs = _predict(bundle, dec.images, progress, tta=tta_name)
    metrics: dict[str, Any] = {
        "bundle": str(bundle.path),
        "data": str(data),
        "split": sel.split,
        "selection": sel.note,
    }
    if tta_name:
        metrics["tta"] = tta_name
    metrics.update(compute_metrics(dec.labels, probs, bundle.classes, top_k))
    metrics["failed_files"] = failed
    if sel.missing:
        metrics["missing_recorded_files"] = sel.missing
    if bias:
        metrics["bias"] = bias_probe(bundle, dec.images, dec.labels)
    result = EvalResult(metrics, None, {}, probs, dec.labels, dec.items)
    if out is None:
        return result

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def write(name: str, blob: bytes | str) -> bytes | str:
        p = out_dir / name
        p.write_bytes(blob) if isinstance(blob, bytes) else p.write_text(blob)
        files[name] = p
        return blob

    write("metrics.json", json.dumps(metrics, indent=2) + "\n")
    report_txt = write(
        "classification_report.txt", classification_report_text(dec.labels, probs, bundle.classes)
    )
    cm_png = write("confusion.png", V.confusion_png(np.asarray(metrics["confusion_matrix"]), bundle.classes))

    pred = probs.argmax(1)
    conf = probs.max(1)
    pos = {it: i for i, it in zip(idx, [index.items[i] for i in idx])}
    wrong = np.flatnonzero(pred != dec.labels)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:n_wrong]
    wrong_png = write(
        "misclassified.png",
        V.montage(
            [V.source_image(index, pos[dec.items[j]]) for j in wrong],
            [
                f"true: {bundle.classes[dec.labels[j]]}\n"
                f"pred: {bundle.classes[pred[j]]} ({conf[j] * 100:.1f}%)"
                for j in wrong
            ],
            cols=min(5, max(1, len(wrong))),
            suptitle=f"Most confidently wrong ({len(wrong)} of {int((pred != dec.labels).sum())} errors)",
        ),
    )
    rel_png = write("reliability.png", V.reliability_png(conf, (pred == dec.labels).astype(float), ECE_BINS))

    with open(out_dir / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "true", "predicted", "probability", "correct", "true_probability", "error"])
        for j, it in enumerate(dec.items):
            w.writerow(
                [
                    index.relpath(it),
                    bundle.classes[dec.labels[j]],
                    bundle.classes[pred[j]],
                    f"{conf[j]:.6f}",
                    int(pred[j] == dec.labels[j]),
                    f"{probs[j, dec.labels[j]]:.6f}",
                    "",
                ]
            )
        for fl in failed:
            w.writerow([fl["file"], "", "", "", "", "", fl["reason"]])
    files["predictions.csv"] = out_dir / "predictions.csv"

    curves = None
    run_dir = Path(bundle.meta["run_dir"]) if bundle.meta.get("run_dir") else None
    if run_dir is not None and run_dir.exists():
        hist = _history(run_dir)
        if hist:
            curves = V.history_png(hist, f"{bundle.meta['architecture']['name']} training")
        elif (run_dir / "plot.png").exists():
            curves = (run_dir / "plot.png").read_bytes()

    from imgclf.analysis.report import render_report

    write(
        "report.html",
        render_report(
            metrics,
            bundle.classes,
            confusion_png=cm_png,  # type: ignore[arg-type]
            misclassified_png=wrong_png,  # type: ignore[arg-type]
            reliability_png=rel_png,  # type: ignore[arg-type]
            curves_png=curves,
            report_text=report_txt,  # type: ignore[arg-type]
            train_metrics=bundle.meta.get("metrics") or {},
        ),
    )
    result.out_dir, result.files = out_dir, files
    return result
