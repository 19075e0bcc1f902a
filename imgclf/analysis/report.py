"""One self-contained ``report.html``: images inlined as base64 data URIs, inline CSS, no scripts,
no network. It opens the same from a laptop, an e-mail attachment or an air-gapped server."""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;height:auto;border:1px solid #eee}
.verdict{font-size:1.1em;padding:.6em 1em;border-left:4px solid #c60;background:#fff6ec}
.ok{border-left-color:#393;background:#f0fff0}.muted{color:#777}pre{background:#f7f7f7;padding:1em;overflow:auto}
.low{background:#fde8e8}
"""


def data_uri(png: bytes, mime: str = "image/png") -> str:
    """Bytes -> ``data:`` URI, so the report needs no files beside it."""
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return f'<p class="muted">({html.escape(alt)}: not available)</p>'
    return f'<img src="{data_uri(png)}" alt="{html.escape(alt)}">'


def _pct(v: Any) -> str:
    return f"{float(v) * 100:.2f} %" if isinstance(v, (int, float)) else "-"


def _summary_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("images evaluated", str(m.get("n_images", "-"))), ("accuracy", _pct(m.get("accuracy")))]
    if "top_k_accuracy" in m:
        rows.append((f"top-{m['top_k']} accuracy", _pct(m["top_k_accuracy"])))
    for avg in ("macro", "weighted"):
        rows.append(
            (
                f"precision / recall / F1 ({avg})",
                " / ".join(f"{float(m[f'{k}_{avg}']):.4f}" for k in ("precision", "recall", "f1")),
            )
        )
    rows.append(("log loss", f"{float(m['log_loss']):.4f}"))
    rows.append((f"expected calibration error ({m.get('ece_bins', 15)} bins)", f"{float(m['ece']):.4f}"))
    if "ece_uncalibrated" in m:
        rows.append(("ECE before calibration", f"{float(m['ece_uncalibrated']):.4f}"))
    return rows


def _head(m: dict[str, Any], title: str, summary: list[tuple[str, str]]) -> list[str]:
    """The page up to and including the summary table (both report kinds)."""
    e = html.escape
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>Bundle <code>{e(str(m.get('bundle', '')))}</code> on <code>{e(str(m.get('data', '')))}</code>, "
        f"split <b>{e(str(m.get('split', '')))}</b>: {e(str(m.get('selection', '')))}.<br>"
        f'<span class="muted">Generated {time.strftime("%Y-%m-%d %H:%M:%S")}.</span></p>',
        "<h2>Summary</h2><table>",
        *[f'<tr><th class="l">{e(k)}</th><td>{e(v)}</td></tr>' for k, v in summary],
        "</table>",
    ]


def _failed_and_end(m: dict[str, Any]) -> list[str]:
    """The unreadable-files section and the closing tags (both report kinds)."""
    e = html.escape
    failed = m.get("failed_files") or []
    parts = [f"<h2>Files that could not be read ({len(failed)})</h2>"]
    if failed:
        parts.append('<table id="failed"><tr><th class="l">file</th><th class="l">reason</th></tr>')
        parts += [
            f'<tr><td class="l">{e(f["file"])}</td><td class="l">{e(f["reason"])}</td></tr>' for f in failed
        ]
        parts.append("</table>")
    else:
        parts.append('<p class="muted">None.</p>')
    return [*parts, "</body></html>"]


def per_class_table(m: dict[str, Any], classes: Sequence[str]) -> str:
    """HTML table: precision, recall, F1, support per class; recall under 50 % is highlighted."""
    out = [
        '<table id="per-class"><tr><th class="l">class</th><th>precision</th><th>recall</th>'
        "<th>F1</th><th>support</th></tr>"
    ]
    for c in classes:
        r = m["per_class"][c]
        cls = ' class="low"' if r["support"] and r["recall"] < 0.5 else ""
        out.append(
            f'<tr{cls}><td class="l">{html.escape(c)}</td><td>{r["precision"]:.4f}</td>'
            f"<td>{r['recall']:.4f}</td><td>{r['f1']:.4f}</td><td>{r['support']}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def confusion_table(cm: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    """Raw counts as an HTML table (rows: true class, columns: predicted), beside the plot."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    rows = [f'<table id="confusion-counts"><tr><th class="l">true \\ predicted</th>{head}</tr>']
    for c, row in zip(classes, cm):
        rows.append(
            f'<tr><th class="l">{html.escape(c)}</th>' + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def _bias_section(b: dict[str, Any]) -> str:
    ok = not b.get("applicable") or "does not depend" in b["verdict"]
    verdict = html.escape(b["verdict"][0].upper() + b["verdict"][1:])
    parts = ["<h2>Colour-bias probe</h2>", f'<p class="verdict{" ok" if ok else ""}">{verdict}</p>']
    if b.get("applicable"):
        parts.append('<table><tr><th class="l">images</th><th>accuracy</th></tr>')
        parts.append(f'<tr><td class="l">original</td><td>{_pct(b["accuracy"])}</td></tr>')
        parts.append(f'<tr><td class="l">greyscale</td><td>{_pct(b["greyscale_accuracy"])}</td></tr>')
        for deg, acc in b["hue_shift_accuracy"].items():
            parts.append(f'<tr><td class="l">hue rotated {deg}&deg;</td><td>{_pct(acc)}</td></tr>')
        parts.append("</table>")
        parts.append(
            '<p class="muted">Greyscale and hue-shifted copies of the same images go through the same '
            "preprocessing and model as the originals. A large drop means colour, not shape, drives "
            "predictions.</p>"
        )
    return "\n".join(parts)


def render_report(
    metrics: dict[str, Any],
    classes: Sequence[str],
    *,
    confusion_png: bytes,
    misclassified_png: bytes | None = None,
    reliability_png: bytes | None = None,
    curves_png: bytes | None = None,
    report_text: str = "",
    train_metrics: dict[str, Any] | None = None,
    title: str = "imgclf evaluation report",
) -> str:
    """The whole report as one HTML string (UTF-8, no external references)."""
    m = metrics
    e = html.escape
    parts = _head(m, title, _summary_rows(m))
    if m.get("bias"):
        parts.append(_bias_section(m["bias"]))
    parts += [
        '<h2 id="confusion">Confusion matrix</h2>',
        _img(confusion_png, "confusion matrix"),
        confusion_table(m["confusion_matrix"], classes),
        "<h2>Per-class metrics</h2>",
        per_class_table(m, classes),
    ]
    if report_text:
        parts += ["<h2>Classification report (scikit-learn)</h2>", f"<pre>{e(report_text)}</pre>"]
    parts += ["<h2>Most confidently wrong</h2>", _img(misclassified_png, "misclassified images")]
    parts += [
        "<h2>Calibration</h2>",
        f"<p>Expected calibration error {float(m['ece']):.4f} over {m.get('ece_bins', 15)} equal-width "
        "confidence bins: the average gap between how sure the model is and how often it is right."
        + (
            f" Temperature scaling (T = {float(m['temperature']):.3f}, fitted on the validation split) "
            f"brought it from {float(m['ece_uncalibrated']):.4f}; the predicted classes are unchanged."
            if "ece_uncalibrated" in m
            else ""
        )
        + "</p>",
        _img(reliability_png, "reliability diagram"),
    ]
    parts += [
        "<h2>Training curves</h2>",
        _img(curves_png, "training curves (the run folder is not available)"),
    ]
    if train_metrics:
        keys = [
            k
            for k in ("val_accuracy", "test_accuracy", "epochs_run", "best_epoch", "train_time_s")
            if k in train_metrics
        ]
        if keys:
            parts.append("<table>")
            parts += [f'<tr><th class="l">{e(k)}</th><td>{e(str(train_metrics[k]))}</td></tr>' for k in keys]
            parts.append("</table>")
    return "\n".join(parts + _failed_and_end(m)) + "\n"


def per_label_table(m: dict[str, Any], labels: Sequence[str]) -> str:
    """HTML table: precision, recall, F1, average precision, support and threshold per label."""
    out = [
        '<table id="per-label"><tr><th class="l">label</th><th>precision</th><th>recall</th><th>F1</th>'
        "<th>AP</th><th>support</th><th>threshold</th></tr>"
    ]
    for c in labels:
        r = m["per_label"][c]
        cls = ' class="low"' if r["support"] and r["recall"] < 0.5 else ""
        ap = "-" if r["ap"] != r["ap"] else f"{r['ap']:.4f}"  # NaN: no positive image
        out.append(
            f'<tr{cls}><td class="l">{html.escape(c)}</td><td>{r["precision"]:.4f}</td>'
            f"<td>{r['recall']:.4f}</td><td>{r['f1']:.4f}</td><td>{ap}</td><td>{r['support']}</td>"
            f"<td>{r['threshold']:.3f}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def render_multilabel_report(
    metrics: dict[str, Any],
    labels: Sequence[str],
    *,
    co_occurrence_png: bytes,
    thresholds_png: bytes,
    misclassified_png: bytes | None = None,
    curves_png: bytes | None = None,
    title: str = "imgclf evaluation report (multi-label)",
) -> str:
    """The multi-label report as one HTML string: summary, per-label table, co-occurrence,
    threshold curves, the images whose label set is wrong (missing / extra labels)."""
    m = metrics
    rows = [
        ("images evaluated", str(m.get("n_images", "-"))),
        ("mean average precision (mAP)", f"{float(m['mAP']):.4f}"),
        ("micro F1 / macro F1", f"{float(m['micro_f1']):.4f} / {float(m['macro_f1']):.4f}"),
        ("exact match (whole label set right)", _pct(m.get("accuracy"))),
        ("Hamming loss (wrong label decisions)", f"{float(m['hamming_loss']):.4f}"),
    ]
    parts = _head(m, title, rows) + [
        "<h2>Per-label metrics</h2>",
        '<p class="muted">A label is predicted when its probability reaches its threshold, chosen on '
        "the validation split for the best F1 when the model was trained.</p>",
        per_label_table(m, labels),
        '<h2 id="thresholds">Threshold curves</h2>',
        _img(thresholds_png, "per-label threshold curves"),
        '<h2 id="co-occurrence">Label co-occurrence (true label sets)</h2>',
        _img(co_occurrence_png, "label co-occurrence matrix"),
        "<h2>Most wrong label sets</h2>",
        _img(misclassified_png, "images with a wrong label set"),
        "<h2>Training curves</h2>",
        _img(curves_png, "training curves (the run folder is not available)"),
    ]
    return "\n".join(parts + _failed_and_end(m)) + "\n"
