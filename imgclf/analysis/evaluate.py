"""Evaluate a bundle on a data source: metrics, plots, a self-contained HTML report.

:func:`evaluate` computes an :class:`EvalResult`; :func:`write_evaluation` writes metrics.json,
classification_report.txt, confusion.png, misclassified.png, reliability.png, predictions.csv
and report.html from it.

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

from imgclf.core.files import display_path
from imgclf.data import sources as D
from imgclf.runtime.bundle import Bundle, load_bundle, recorded_splits
from imgclf.runtime.calibration import (
    ECE_BINS,
    MIN_IMAGES,
    expected_calibration_error,
    fit_calibration,
    log_probs,
    uncalibrate,
)

log = logging.getLogger("imgclf")

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
class ImagePrediction:
    """One evaluated image: file (relative to the source), true and predicted class, probabilities."""

    file: str
    true: str
    predicted: str
    probability: float  # of the predicted class
    true_probability: float

    @property
    def correct(self) -> bool:
        return self.true == self.predicted


@dataclass(eq=False)
class EvalResult:
    """What :func:`evaluate` computed; :func:`write_evaluation` turns it into the report files.

    ``metrics`` is exactly what ``metrics.json`` holds. ``probs``, ``labels``, ``items``, ``files_rel``
    and ``positions`` are aligned per evaluated image. ``out_dir``/``files`` are set once written.
    """

    metrics: dict[str, Any]
    probs: np.ndarray  # (N, K) class probabilities
    labels: np.ndarray  # (N,) true class indices
    items: list[str]  # item ids (paths, or e.g. "mnist:test:17")
    files_rel: list[str]  # item paths relative to the source, as in predictions.csv
    positions: np.ndarray  # (N,) each image's position in ``index.items``
    classes: list[str]
    selection: Selection
    failed: list[dict[str, str]]  # {"file", "reason"}: unreadable files, left out
    bundle: Bundle = field(repr=False)
    index: D.SourceIndex = field(repr=False)
    tta: str | None = None  # the view set used, None without test-time augmentation
    bias: dict[str, Any] | None = None  # the colour-bias probe, when asked for
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)  # file name -> path, once written
    # Multi-label: (N, L) true multi-hot label sets over ``classes`` (``labels`` then holds set ids).
    targets: np.ndarray | None = None

    @property
    def multi_label(self) -> bool:
        return self.targets is not None

    @property
    def predicted_sets(self) -> np.ndarray:
        """Multi-label: (N, L) bool, the labels at or past their thresholds."""
        from imgclf.runtime.multilabel import predicted_sets

        return predicted_sets(self.probs, self.bundle.thresholds)

    @property
    def predicted(self) -> np.ndarray:
        """(N,) predicted class indices."""
        return self.probs.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        """(N,) top-1 probabilities."""
        return self.probs.max(1)

    @property
    def correct(self) -> np.ndarray:
        """(N,) bool: prediction equals the true class (multi-label: the whole label set)."""
        if self.targets is not None:
            return (self.predicted_sets == self.targets.astype(bool)).all(axis=1)
        return self.predicted == self.labels

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])

    @property
    def confusion(self) -> np.ndarray:
        """(K, K) counts; rows are true classes, columns predicted."""
        return np.asarray(self.metrics["confusion_matrix"], dtype=np.int64)

    @property
    def predictions(self) -> list[ImagePrediction]:
        """One record per evaluated image, in evaluation order (the rows of predictions.csv)."""
        pred, conf = self.predicted, self.confidence
        return [
            ImagePrediction(
                file=f,
                true=self.classes[int(y)],
                predicted=self.classes[int(p)],
                probability=float(c),
                true_probability=float(self.probs[j, int(y)]),
            )
            for j, (f, y, p, c) in enumerate(zip(self.files_rel, self.labels, pred, conf))
        ]


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


def multilabel_eval_metrics(targets: np.ndarray, probs: np.ndarray, bundle: Bundle) -> dict[str, Any]:
    """Multi-label: mAP, micro/macro F1, exact match (as ``accuracy``), Hamming loss, per-label
    P/R/F1/AP at the bundle's thresholds, label co-occurrence (true sets)."""
    from imgclf.runtime.multilabel import co_occurrence, multilabel_metrics

    m = multilabel_metrics(probs, targets, bundle.thresholds, list(bundle.classes))
    return {
        "task": "multi-label",
        "n_images": int(len(targets)),
        "accuracy": m.pop("exact_match"),  # the whole label set right, as training reports it
        **m,
        "co_occurrence": co_occurrence(targets).tolist(),
    }


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


# --------------------------------------------------------------------------- compute


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


def _index_matching(bundle: Bundle, data: str, cache_dir: str | None) -> D.SourceIndex:
    """Index ``data``; its classes must be the bundle's, in the same order.

    Multi-label bundles: the labels found must be among the bundle's; the targets are put in its order.
    """
    if bundle.multi_label:
        sep = (bundle.meta.get("train_config") or {}).get("label_sep") or "_"
        index = D.index_source(data, cache_dir, multi_label=True, label_sep=sep)
        extra = sorted(set(index.classes) - set(bundle.classes))
        if extra:
            raise D.DataError(
                f"{data}: label(s) {extra} are unknown to the model (it knows {bundle.classes}); "
                "evaluate on data labelled with the model's labels"
            )
        targets = np.zeros((len(index), len(bundle.classes)), dtype=np.uint8)
        for j, c in enumerate(index.classes):
            targets[:, bundle.classes.index(c)] = index.targets[:, j]
        index.classes, index.targets = list(bundle.classes), targets
        return index
    index = D.index_source(data, cache_dir)
    if list(index.classes) != list(bundle.classes):
        extra = sorted(set(index.classes) - set(bundle.classes))
        raise D.DataError(
            f"{data}: classes {index.classes} do not match the bundle's {bundle.classes}"
            + (f" (unknown to the model: {extra})" if extra else "")
            + ". Evaluate on data with the same class folders the model was trained on."
        )
    return index


def _data_spec(bundle: Bundle, data: str | Path | None) -> str:
    """``data`` as a string; None means the source recorded in the bundle."""
    if data is None:
        data = bundle.meta.get("data_source")
        if not data:
            raise D.DataError(
                f"{bundle.path}: the bundle records no data source; give the data to evaluate on"
            )
    return str(data)


def _select(
    bundle: Bundle, index: D.SourceIndex, split: str | None, limit: int | None, seed: int
) -> Selection:
    """:func:`select_items`, then a stratified sample of at most ``limit`` items."""
    sel = select_items(bundle, index, split)
    if limit and len(sel.idx) > limit:
        sel.idx = sel.idx[D.stratified_subset(index.labels[sel.idx], limit, seed)]
        sel.note += f"; a stratified sample of {len(sel.idx)}"
    return sel


def _resolve_tta(bundle: Bundle, tta: str | None) -> str | None:
    if not tta:
        return None
    from imgclf.runtime.tta import auto_views

    return auto_views(bundle) if tta == "auto" else tta


def evaluate(
    bundle: Bundle | str | Path,
    data: str | Path | None = None,
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
    """Evaluate ``bundle`` (a Bundle, or a bundle/run folder to load) on ``data``.

    ``data`` None: the source recorded in the bundle (``model.json``'s ``data_source``).
    ``split``: see :func:`select_items`. ``limit``: a stratified sample of at most that many images.
    ``tta``: average over test-time-augmented views (a name from :data:`imgclf.runtime.tta.VIEW_SETS`;
    ``auto`` follows the bundle's training augmentation). ``bias``: add the colour-bias probe.
    With ``out``, also :func:`write_evaluation` there (``n_wrong`` images in misclassified.png).
    """
    if isinstance(bundle, (str, Path)):
        bundle = load_bundle(bundle)
    data = _data_spec(bundle, data)
    index = _index_matching(bundle, data, cache_dir)
    sel = _select(bundle, index, split, limit, seed)
    dec = D.decode_items(
        index, sel.idx, bundle.pre, cache_dir=cache_dir, workers=workers, progress=progress, desc="decode"
    )
    failed = [{"file": index.relpath(it), "reason": r} for it, r in [*index.skipped, *dec.failed]]
    if len(dec.labels) == 0:
        raise D.DataError(
            f"{data}: none of the {len(sel.idx)} selected images could be read ({failed[:3]} ...)"
        )
    tta_name = _resolve_tta(bundle, tta)
    probs = _predict(bundle, dec.images, progress, tta=tta_name)
    metrics: dict[str, Any] = {
        "bundle": str(bundle.path),
        "data": str(data),
        "split": sel.split,
        "selection": sel.note,
    }
    if tta_name:
        metrics["tta"] = tta_name
    if bundle.multi_label:
        metrics.update(multilabel_eval_metrics(dec.targets, probs, bundle))
    else:
        metrics.update(compute_metrics(dec.labels, probs, bundle.classes, top_k))
    if bundle.temperature != 1.0:
        metrics["temperature"] = bundle.temperature
        raw = uncalibrate(probs, bundle.temperature)
        metrics["ece_uncalibrated"] = expected_calibration_error(raw, dec.labels)
    metrics["failed_files"] = failed
    if sel.missing:
        metrics["missing_recorded_files"] = sel.missing
    if bias and bundle.multi_label:
        log.warning("--bias: the colour-bias probe is for single-label models; skipped")
    elif bias:
        metrics["bias"] = bias_probe(bundle, dec.images, dec.labels)
    pos = {index.items[i]: int(i) for i in sel.idx}
    result = EvalResult(
        metrics=metrics,
        probs=probs,
        labels=dec.labels,
        items=list(dec.items),
        files_rel=[index.relpath(it) for it in dec.items],
        positions=np.asarray([pos[it] for it in dec.items], dtype=np.int64),
        classes=list(bundle.classes),
        selection=sel,
        failed=failed,
        bundle=bundle,
        index=index,
        tta=tta_name,
        bias=metrics.get("bias"),
        targets=dec.targets,
    )
    if out is not None:
        write_evaluation(result, out, n_wrong=n_wrong)
    return result


def recalibrate(
    bundle: Bundle | str | Path,
    data: str | Path | None = None,
    *,
    split: str | None = None,
    progress: bool = False,
    cache_dir: str | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    """Fit the bundle's temperature anew on ``data`` and return the new ``calibration`` record.

    ``split`` None: the run's recorded validation split when ``data`` is the training data, else
    every image of ``data`` (a folder kept apart for calibration). Never the test split by default:
    calibrating on it would make its ECE look better than it is. Nothing is written here.
    """
    if isinstance(bundle, (str, Path)):
        bundle = load_bundle(bundle)
    if bundle.model is None:
        raise D.DataError(
            f"{bundle.path}: an exported .onnx file cannot be recalibrated; give the bundle folder"
        )
    if bundle.multi_label:
        raise D.DataError(
            f"{bundle.path}: a multi-label bundle has per-label decision thresholds, not a softmax "
            "temperature; retrain to choose new thresholds"
        )
    if split is None:
        index = _index_matching(bundle, _data_spec(bundle, data), cache_dir)
        rec, _ = recorded_splits(bundle)
        pos = {index.relpath(it) for it in index.items}
        split = "val" if any(r in pos for r in (rec or {}).get("val") or []) else "all"
    res = evaluate(bundle, data, split=split, progress=progress, cache_dir=cache_dir, workers=workers)
    if len(res.labels) < MIN_IMAGES:
        raise D.DataError(
            f"{res.metrics['data']}: {len(res.labels)} images; calibration needs at least {MIN_IMAGES}"
        )
    # The raw softmax's log-probabilities stand in for the logits (softmax is shift-invariant).
    raw = log_probs(uncalibrate(res.probs, bundle.temperature))
    return fit_calibration(raw, res.labels, fit_on=f"{res.metrics['data']} ({res.selection.split})")


# --------------------------------------------------------------------------- write


def _history(run_dir: Path) -> list[dict[str, str]]:
    p = run_dir / "history.csv"
    if not p.exists():
        return []
    try:
        with open(p, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def training_curves_png(bundle: Bundle) -> bytes | None:
    """The run's training curves (from history.csv, else its plot.png); None without a run folder."""
    from imgclf.analysis import visualize as V

    run_dir = Path(bundle.meta["run_dir"]) if bundle.meta.get("run_dir") else None
    if run_dir is None or not run_dir.exists():
        return None
    hist = _history(run_dir)
    if hist:
        return V.history_png(hist, f"{bundle.meta['architecture']['name']} training")
    if (run_dir / "plot.png").exists():
        return (run_dir / "plot.png").read_bytes()
    return None


def misclassified_png(result: EvalResult, n_wrong: int = 25) -> bytes:
    """Montage of the ``n_wrong`` most confidently wrong images, captioned true/predicted."""
    from imgclf.analysis import visualize as V

    if result.multi_label:
        return _wrong_label_sets_png(result, n_wrong)
    pred, conf, classes = result.predicted, result.confidence, result.classes
    wrong = np.flatnonzero(~result.correct)
    n_errors = len(wrong)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:n_wrong]
    return V.montage(
        [V.source_image(result.index, int(result.positions[j])) for j in wrong],
        [
            f"true: {classes[result.labels[j]]}\npred: {classes[pred[j]]} ({conf[j] * 100:.1f}%)"
            for j in wrong
        ],
        cols=min(5, max(1, len(wrong))),
        suptitle=f"Most confidently wrong ({len(wrong)} of {n_errors} errors)",
    )


def _set_errors(result: EvalResult, j: int) -> tuple[list[str], list[str]]:
    """(missing, extra) labels of image ``j``: true but not predicted, predicted but not true."""
    t, p = result.targets[j].astype(bool), result.predicted_sets[j]
    return [c for c, k in zip(result.classes, t & ~p) if k], [c for c, k in zip(result.classes, p & ~t) if k]


def _wrong_label_sets_png(result: EvalResult, n_wrong: int) -> bytes:
    """Multi-label gallery: images with a wrong set, worst first, captioned with missing and extra labels."""
    from imgclf.analysis import visualize as V

    y = result.targets.astype(bool)
    # How far off: probability mass on the wrong side of each label, summed.
    cost = np.where(y, 1 - result.probs, result.probs) * (result.predicted_sets != y)
    wrong = np.flatnonzero(~result.correct)
    n_errors = len(wrong)
    wrong = wrong[np.argsort(-cost[wrong].sum(axis=1), kind="stable")][:n_wrong]
    captions = []
    for j in wrong:
        missing, extra = _set_errors(result, int(j))
        captions.append(f"missing: {', '.join(missing) or '-'}\nextra: {', '.join(extra) or '-'}")
    return V.montage(
        [V.source_image(result.index, int(result.positions[j])) for j in wrong],
        captions,
        cols=min(5, max(1, len(wrong))),
        suptitle=f"Most wrong label sets ({len(wrong)} of {n_errors} images with a wrong set)",
    )


def reliability_png(result: EvalResult) -> bytes:
    """Reliability diagram over :data:`ECE_BINS` bins; before and after calibration when calibrated."""
    from imgclf.analysis import visualize as V

    before = None
    if result.bundle.temperature != 1.0:
        before = uncalibrate(result.probs, result.bundle.temperature).max(1)
    return V.reliability_png(result.confidence, result.correct.astype(float), ECE_BINS, conf_before=before)


def _write_multilabel_csv(result: EvalResult, path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["file", "true", "predicted", "missing", "extra", "correct", "error"])
        pred, ok = result.predicted_sets, result.correct
        for j, fname in enumerate(result.files_rel):
            true = [c for c, k in zip(result.classes, result.targets[j]) if k]
            got = [c for c, k in zip(result.classes, pred[j]) if k]
            missing, extra = _set_errors(result, j)
            w.writerow(
                [fname, "|".join(true), "|".join(got), "|".join(missing), "|".join(extra), int(ok[j]), ""]
            )
        for fl in result.failed:
            w.writerow([fl["file"], "", "", "", "", "", fl["reason"]])
    return path


def write_predictions_csv(result: EvalResult, path: str | Path) -> Path:
    """One row per evaluated image, then one per unreadable file (its reason in ``error``).

    Multi-label: true and predicted label sets (``|`` between labels), the missing and extra labels.
    """
    path = Path(path)
    if result.multi_label:
        return _write_multilabel_csv(result, path)
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:  # keeps odd names
        w = csv.writer(f)
        w.writerow(["file", "true", "predicted", "probability", "correct", "true_probability", "error"])
        for r in result.predictions:
            w.writerow(
                [
                    r.file,
                    r.true,
                    r.predicted,
                    f"{r.probability:.6f}",
                    int(r.correct),
                    f"{r.true_probability:.6f}",
                    "",
                ]
            )
        for fl in result.failed:
            w.writerow([fl["file"], "", "", "", "", "", fl["reason"]])
    return path


def write_evaluation(result: EvalResult, out_dir: str | Path, *, n_wrong: int = 25) -> list[Path]:
    """Write the report files into ``out_dir`` (created); returns their paths.

    metrics.json, classification_report.txt, confusion.png, misclassified.png, reliability.png,
    predictions.csv, report.html (multi-label: co_occurrence.png and thresholds.png instead of the
    text report, confusion and reliability). Also sets ``result.out_dir`` and ``result.files``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def write(name: str, blob: bytes | str) -> None:
        p = out / name
        p.write_bytes(blob) if isinstance(blob, bytes) else p.write_text(display_path(blob), encoding="utf-8")
        files[name] = p

    parts, html = (_multilabel_report_parts if result.multi_label else _report_parts)(result, n_wrong)
    write("metrics.json", json.dumps(result.metrics, indent=2) + "\n")
    for name, blob in parts.items():
        write(name, blob)
    files["predictions.csv"] = write_predictions_csv(result, out / "predictions.csv")
    write("report.html", html)
    result.out_dir, result.files = out, files
    return list(files.values())


def _report_parts(result: EvalResult, n_wrong: int) -> tuple[dict[str, bytes | str], str]:
    """Single-label: the text report and plots by file name, and report.html."""
    from imgclf.analysis import visualize as V
    from imgclf.analysis.report import render_report

    parts: dict[str, bytes | str] = {
        "classification_report.txt": classification_report_text(result.labels, result.probs, result.classes),
        "confusion.png": V.confusion_png(result.confusion, result.classes),
        "misclassified.png": misclassified_png(result, n_wrong),
        "reliability.png": reliability_png(result),
    }
    html = render_report(
        result.metrics,
        result.classes,
        confusion_png=parts["confusion.png"],
        misclassified_png=parts["misclassified.png"],
        reliability_png=parts["reliability.png"],
        curves_png=training_curves_png(result.bundle),
        report_text=parts["classification_report.txt"],
        train_metrics=result.bundle.meta.get("metrics") or {},
    )
    return parts, html


def _multilabel_report_parts(result: EvalResult, n_wrong: int) -> tuple[dict[str, bytes | str], str]:
    """Multi-label: co-occurrence, threshold curves and wrong label sets by file name, and report.html."""
    from imgclf.analysis import visualize as V
    from imgclf.analysis.report import render_multilabel_report

    parts: dict[str, bytes | str] = {
        "co_occurrence.png": V.co_occurrence_png(np.asarray(result.metrics["co_occurrence"]), result.classes),
        "thresholds.png": V.threshold_curves_png(
            result.probs, result.targets, result.bundle.thresholds, result.classes
        ),
        "misclassified.png": misclassified_png(result, n_wrong),
    }
    html = render_multilabel_report(
        result.metrics,
        result.classes,
        co_occurrence_png=parts["co_occurrence.png"],
        thresholds_png=parts["thresholds.png"],
        misclassified_png=parts["misclassified.png"],
        curves_png=training_curves_png(result.bundle),
    )
    return parts, html
