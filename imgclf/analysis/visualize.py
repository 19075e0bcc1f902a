"""Pictures for people: montages, annotated predictions, confusion matrices, heatmap overlays.

Everything renders off-screen (matplotlib's Agg backend) and returns PNG bytes or writes a
PNG, so it works on servers without a display.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imgclf.core.imageio import open_image

GREEN = (0, 200, 0)
RED = (220, 30, 30)


def _plt():  # noqa: ANN202 - matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_to_png(fig, dpi: int = 100) -> bytes:  # noqa: ANN001 - matplotlib Figure
    """Render a matplotlib figure to PNG bytes and close it."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def to_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 HxW, HxWx1 or HxWx3 -> uint8 HxWx3."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a.astype(np.uint8))


def source_image(index, i: int, max_side: int = 160) -> np.ndarray:  # noqa: ANN001 - SourceIndex
    """Item ``i`` of a :class:`imgclf.data.sources.SourceIndex` as uint8 RGB for display (not for the model).

    Folder images are shrunk so their longer side is at most ``max_side``; built-in arrays are
    returned at native size (a montage scales them up). Unreadable files give a grey tile.
    """
    from imgclf.core.imageio import ImageDecodeError

    if index.arrays is not None:
        return to_rgb(index.arrays[i])
    try:
        src = index.reader(index.items[i]) if index.reader else index.items[i]
        img = open_image(src, channels=3, size=(max_side, max_side))
    except (ImageDecodeError, OSError):  # OSError: a tar member that cannot be read
        return np.full((max_side, max_side, 3), 128, dtype=np.uint8)
    img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def montage(
    images: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    *,
    cols: int | None = None,
    colors: Sequence[str] | None = None,
    suptitle: str = "",
    cell_inches: float = 1.6,
) -> bytes:
    """A grid of images with an optional title above each; returns PNG bytes.

    ``colors`` (one matplotlib colour per image) colour the titles, e.g. green for a correct
    prediction and red for a wrong one.
    """
    plt = _plt()
    n = len(images)
    if n == 0:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no images", ha="center", va="center")
        return fig_to_png(fig)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * cell_inches, rows * (cell_inches + 0.35)), squeeze=False
    )
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        im = to_rgb(images[k])
        ax.imshow(im, interpolation="nearest" if max(im.shape[:2]) < 64 else "antialiased")
        if titles is not None:
            ax.set_title(titles[k], fontsize=8, color=colors[k] if colors else "black")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig_to_png(fig)


def class_montage(rows: Sequence[tuple[str, Sequence[np.ndarray]]], *, suptitle: str = "") -> bytes:
    """One row per class (name on the left, samples to the right): the tutorials' 'Figure 1'."""
    plt = _plt()
    ncols = max((len(ims) for _, ims in rows), default=1) or 1
    fig, axes = plt.subplots(len(rows), ncols, figsize=(ncols * 1.3 + 1.2, len(rows) * 1.3), squeeze=False)
    for r, (name, ims) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(ims):
                im = to_rgb(ims[c])
                ax.imshow(im, interpolation="nearest" if max(im.shape[:2]) < 64 else "antialiased")
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig_to_png(fig)


def confusion_png(cm: np.ndarray, classes: Sequence[str], *, title: str = "Confusion matrix") -> bytes:
    """Row-normalised confusion matrix (each true class sums to 1) with class names on both axes."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _plt()
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(classes)
    side = max(4.5, 0.55 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side, side))
    disp = ConfusionMatrixDisplay(norm, display_labels=list(classes))
    # Numbers in cells stop being readable past ~25 classes.
    disp.plot(
        ax=ax,
        cmap="Blues",
        values_format=".2f",
        include_values=k <= 25,
        colorbar=True,
        im_kw={"vmin": 0, "vmax": 1},
    )
    ax.set_xticklabels(list(classes), rotation=45, ha="right")
    ax.set_title(title + " (rows: true class, normalised)")
    fig.tight_layout()
    return fig_to_png(fig)


def history_png(history: Sequence[dict[str, float]], title: str = "") -> bytes:
    """Loss and accuracy per epoch (train and validation) from a run's history.csv rows."""
    plt = _plt()
    ep = [float(h["epoch"]) for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_loss", "val_loss"):
        if history and key in history[0]:
            ax[0].plot(ep, [float(h[key]) for h in history], label=key)
    for key in ("train_acc", "val_acc"):
        if history and key in history[0]:
            ax[1].plot(ep, [float(h[key]) for h in history], label=key)
    for a, name in zip(ax, ["Loss", "Accuracy"]):
        a.set_xlabel("Epoch #")
        a.set_ylabel(name)
        a.legend(loc="best")
        a.grid(alpha=0.3)
    fig.suptitle(title or "Training loss and accuracy")
    fig.tight_layout()
    return fig_to_png(fig)


def reliability_png(
    conf: np.ndarray, correct: np.ndarray, n_bins: int = 15, conf_before: np.ndarray | None = None
) -> bytes:
    """Reliability diagram: accuracy per confidence bin against the diagonal of perfect calibration.

    ``conf_before`` (the same images' top-1 probabilities before calibration) adds a second series.
    """
    plt = _plt()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2

    def per_bin(c: np.ndarray) -> np.ndarray:
        which = np.clip(np.digitize(c, edges[1:-1], right=True), 0, n_bins - 1)
        acc = [correct[which == b].mean() if (which == b).any() else np.nan for b in range(n_bins)]
        return np.nan_to_num(np.array(acc))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if conf_before is not None:
        ax.bar(centers, per_bin(conf_before), width=1.0 / n_bins, fill=False, edgecolor="tab:orange",
               linewidth=1.5, label="before calibration")  # fmt: skip
    label = "after calibration" if conf_before is not None else "accuracy"
    ax.bar(
        centers, per_bin(conf), width=1.0 / n_bins, color="tab:blue", edgecolor="k", alpha=0.6, label=label
    )
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title("Reliability diagram")
    fig.tight_layout()
    return fig_to_png(fig)


# --------------------------------------------------------------------------- annotation


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def resize_to_width(img: Image.Image, width: int = 400) -> Image.Image:
    """Keep the aspect ratio, as the tutorials' imutils.resize(width=400) does."""
    w, h = img.size
    return img.resize((width, max(1, round(h * width / w))), Image.Resampling.BILINEAR)


def annotation_text(label: str, probability: float, verdict: str | None = None) -> str:
    """The tutorial's caption: ``label: 85.42% (correct)``."""
    text = f"{label}: {probability * 100:.2f}%"
    return f"{text} ({verdict})" if verdict else text


def annotate(
    img: Image.Image,
    lines: Sequence[str],
    *,
    width: int = 400,
    color: tuple[int, int, int] = GREEN,
) -> Image.Image:
    """Resize ``img`` to ``width`` px wide and draw ``lines`` in its top-left corner.

    The first line is large (the prediction); further lines (runners-up) are smaller.
    Text has a dark outline so it stays readable on light and dark photos.
    """
    out = resize_to_width(img.convert("RGB"), width)
    draw = ImageDraw.Draw(out)
    y = 8
    for k, line in enumerate(lines):
        size = max(12, width // 20) if k == 0 else max(10, width // 30)
        font = _font(size)
        draw.text(
            (10, y),
            line,
            fill=color if k == 0 else (255, 255, 255),
            font=font,
            stroke_width=2,
            stroke_fill=(0, 0, 0),
        )
        y += size + 6
    return out


def overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a [0,1] heatmap (HxW) coloured by a matplotlib colormap onto uint8 RGB ``image``."""
    import matplotlib

    if image.shape[:2] != heatmap.shape:
        raise ValueError(f"heatmap {heatmap.shape} does not match image {image.shape[:2]}")
    # A 256-entry lookup table instead of calling the colormap per pixel: a 12-megapixel photo
    # would otherwise allocate ~400 MB of float64 RGBA and take seconds.
    lut = (matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint16)
    heat8 = (np.clip(heatmap, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    a = int(round(alpha * 256))
    out = (to_rgb(image).astype(np.uint16) * (256 - a) + lut[heat8] * a) >> 8
    return out.astype(np.uint8)


def png_bytes(arr: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 image array -> PNG bytes (fast compression: overlays of big photos are many megapixels)."""
    buf = io.BytesIO()
    Image.fromarray(to_rgb(arr)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def co_occurrence_png(co: np.ndarray, labels: Sequence[str], *, title: str = "Label co-occurrence") -> bytes:
    """Images holding both labels (counts; the diagonal is each label's count), labels on both axes."""
    plt = _plt()
    co = np.asarray(co, dtype=np.int64)
    k = len(labels)
    side = max(4.5, 0.55 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(co, cmap="Blues")
    ax.set_xticks(range(k), list(labels), rotation=45, ha="right")
    ax.set_yticks(range(k), list(labels))
    if k <= 25:
        top = co.max() or 1
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(co[i, j]), ha="center", va="center",
                        color="white" if co[i, j] > top / 2 else "black", fontsize=8)  # fmt: skip
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return fig_to_png(fig)


def threshold_curves_png(
    probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, labels: Sequence[str]
) -> bytes:
    """Per label: precision, recall and F1 against the decision threshold, the chosen one marked."""
    plt = _plt()
    k = len(labels)
    cols = min(4, k)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    grid = np.linspace(0.01, 0.99, 99)
    y = np.asarray(targets).astype(bool)
    for j, name in enumerate(labels):
        ax = axes[j // cols][j % cols]
        pred = probs[:, j][:, None] >= grid[None, :]
        tp = (pred & y[:, j][:, None]).sum(axis=0)
        prec = np.divide(tp, pred.sum(axis=0), out=np.zeros(len(grid)), where=pred.sum(axis=0) > 0)
        rec = tp / max(int(y[:, j].sum()), 1)
        f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(len(grid)), where=(prec + rec) > 0)
        ax.plot(grid, prec, label="precision")
        ax.plot(grid, rec, label="recall")
        ax.plot(grid, f1, label="F1", lw=2)
        ax.axvline(float(thresholds[j]), color="k", ls="--", lw=1)
        ax.set_title(f"{name} (threshold {float(thresholds[j]):.2f})", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("threshold", fontsize=8)
    for j in range(k, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig_to_png(fig)
