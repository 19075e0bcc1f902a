"""int8 ONNX: static post-training quantization with onnxruntime, checked on real images.

The float32 graph from :func:`imgclf.exporters.formats.onnx_model_bytes` (uint8 NHWC in, preprocessing
inside) goes through ``onnxruntime.quantization.quantize_static``: QDQ format, int8 weights per
output channel, uint8 activations whose ranges are calibrated on training images. On CPUs
with AVX512-VNNI this cuts single-image latency by a third or more (bench/infer_speed.py).
Quantization can change a prediction, so it is opt-in (``imgclf export --int8``) and the export
reports accuracy and top-1 agreement against float32 on held-out images the model never
trained on (for a multi-label bundle: mAP, exact-match accuracy and label-set agreement).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgclf.runtime.bundle import Bundle, atomic_write_bytes
from imgclf.runtime.multilabel import multilabel_metrics, predicted_sets

log = logging.getLogger("imgclf")

# Conv/Gemm carry the FLOPs; MaxPool and Relu run on int8 so no dequantize sits between them.
OPS = ["Conv", "Gemm", "MatMul", "MaxPool", "Relu"]
CALIBRATION_IMAGES = 256


@dataclass
class Int8Check:
    """int8 vs float32 on the same images (labels optional).

    Single-label: ``top1_agree`` counts the same top class, ``acc_*`` is top-1 accuracy.
    Multi-label (``multi_label``): ``top1_agree`` counts the same predicted label set,
    ``acc_*`` is exact-match accuracy (the whole set right) and ``map_*`` the mAP.
    """

    n: int
    top1_agree: int
    max_abs_diff: float
    acc_fp32: float | None = None
    acc_int8: float | None = None
    source: str = ""
    multi_label: bool = False
    map_fp32: float | None = None
    map_int8: float | None = None

    def drop(self) -> float | None:
        """How much int8 loses on the labelled images: mAP for multi-label (threshold-free, so a
        shifted threshold does not hide or exaggerate it), top-1 accuracy otherwise; None without labels."""
        if self.multi_label:
            a, b = self.map_fp32, self.map_int8
        else:
            a, b = self.acc_fp32, self.acc_int8
        return None if a is None or b is None else a - b

    def __str__(self) -> str:
        what = "label sets agree" if self.multi_label else "top-1 agrees"
        s = f"{what} with float32 on {self.top1_agree}/{self.n} {self.source}"
        if self.map_fp32 is not None and self.map_int8 is not None:
            s += f"; mAP {self.map_fp32:.4f} (float32) -> {self.map_int8:.4f} (int8)"
        if self.acc_fp32 is not None and self.acc_int8 is not None:
            name = "exact-match accuracy" if self.multi_label else "accuracy"
            s += f"; {name} {self.acc_fp32 * 100:.2f}% (float32) -> {self.acc_int8 * 100:.2f}% (int8)"
        return s


def recorded_images(
    bundle: Bundle, split: str, limit: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray] | None:
    """Up to ``limit`` (stratified) decoded images + labels of the training run's ``split``.

    Uses the data source recorded in the bundle and the run's splits.json (or the source's
    official split); None when either is no longer available. For a multi-label bundle the
    labels are the (N, L) multi-hot targets, indexed the way training did (``label_sep``).
    """
    from imgclf.data import sources as D
    from imgclf.runtime.bundle import recorded_splits

    src = bundle.meta.get("data_source")
    if not src:
        return None
    cfg = bundle.meta.get("train_config") or {}
    kw = {"multi_label": True, "label_sep": cfg.get("label_sep")} if bundle.multi_label else {}
    try:
        index = D.index_source(src, **kw)
    except (D.DataError, OSError):
        return None
    if list(index.classes) != list(bundle.classes):
        return None
    if index.has_predefined_split and (index.split == split).any():
        idx = np.flatnonzero(index.split == split)
    else:
        rec, _ = recorded_splits(bundle)
        pos = {index.relpath(it): i for i, it in enumerate(index.items)}
        idx = np.asarray(sorted(pos[r] for r in (rec or {}).get(split, []) if r in pos), dtype=np.int64)
    if len(idx) == 0:
        return None
    if len(idx) > limit:
        idx = idx[D.stratified_subset(index.labels[idx], limit, seed)]
    dec = D.decode_items(index, idx, bundle.pre, progress=False)
    if not len(dec.labels):
        return None
    return (dec.images, dec.targets) if bundle.multi_label else (dec.images, dec.labels)


class _ConvPlusMap(nn.Module):
    """``conv(x) + bias_map``: a conv whose bias varies by position (exact BatchNorm folding)."""

    def __init__(self, conv: nn.Conv2d, bias_map: torch.Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("bias_map", bias_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bias_map


@torch.no_grad()
def fold_batchnorm_forward(model: nn.Module, in_shape: tuple[int, int, int]) -> nn.Module:
    """A copy of ``model`` with each ``BN -> [Dropout/MaxPool] -> Conv`` BN folded into the conv.

    The tutorials' layer order (conv -> ReLU -> BN) leaves a float BatchNorm between quantized
    convs, which makes ONNX Runtime transpose around every int8 conv; folding it forward
    measured 1.3-1.5x int8 batch throughput (docs/PERFORMANCE.md). The fold is exact: the
    conv's zero padding sees BN's shift as zeros, so the shift becomes a per-position bias map
    computed at ``in_shape`` (C, H, W), the bundle's fixed input. A MaxPool in between commutes
    with BN only when every scale is positive; otherwise that BN is left in place.
    """
    feats = getattr(model, "features", None)
    if not isinstance(feats, nn.Sequential):
        return model
    model = copy.deepcopy(model).eval()
    layers = list(model.features)
    shapes, x = [], torch.zeros(1, *in_shape)
    for layer in layers:
        shapes.append(tuple(x.shape[2:]))
        x = layer(x)
    for i, bn in enumerate(layers):
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        j = i + 1
        while j < len(layers) and isinstance(layers[j], (nn.Dropout, nn.MaxPool2d)):
            if isinstance(layers[j], nn.MaxPool2d) and not bool((scale > 0).all()):
                break
            j += 1
        conv = layers[j] if j < len(layers) else None  # a MaxPool here: the scales were not all > 0
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros":
            continue
        shift_map = shift[None, :, None, None].expand(1, -1, *shapes[j])
        bias_map = F.conv2d(shift_map, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
        folded = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            bias=False,
        )  # fmt: skip
        folded.weight.copy_(conv.weight * scale[None, :, None, None])
        layers[j] = _ConvPlusMap(folded, bias_map.contiguous())
        layers[i] = nn.Identity()
    model.features = nn.Sequential(*layers)
    return model


def quantize_int8(fp32_onnx: bytes, calibration: np.ndarray, out: str | Path) -> Path:
    """Write the int8 (QDQ) version of ``fp32_onnx``, calibrated on uint8 NHWC ``calibration``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    model = onnx.load_from_string(fp32_onnx)
    input_name = model.graph.input[0].name
    meta = {p.key: p.value for p in model.metadata_props}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({input_name: calibration[i : i + 16]} for i in range(0, len(calibration), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory(prefix="imgclf-int8-") as tmp:
        f32, pre, q = Path(tmp) / "f32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        f32.write_bytes(fp32_onnx)
        with _quiet_logs():
            quant_pre_process(str(f32), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(q),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=OPS,
            )
        qm = onnx.load(str(q))
    meta["imgclf.quantization"] = "int8 static QDQ (per-channel int8 weights, uint8 activations)"
    meta["imgclf.calibration_images"] = str(len(calibration))
    del qm.metadata_props[:]
    onnx.helper.set_model_props(qm, meta)
    atomic_write_bytes(out, qm.SerializeToString())
    return out


def compare_int8(
    fp32: Any,
    int8: Any,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    source: str = "",
    thresholds: np.ndarray | None = None,
) -> Int8Check:
    """Run both ``uint8 NHWC -> probs`` functions on ``images`` and compare.

    ``thresholds`` (a multi-label bundle's) compares predicted label sets, and ``labels`` are
    then (N, L) multi-hot targets scored by mAP and exact match; otherwise class indices.
    """
    p32 = np.concatenate([fp32(images[s : s + 64]) for s in range(0, len(images), 64)])
    p8 = np.concatenate([int8(images[s : s + 64]) for s in range(0, len(images), 64)])
    if thresholds is None:
        agree = int((p32.argmax(1) == p8.argmax(1)).sum())
    else:
        agree = int((predicted_sets(p32, thresholds) == predicted_sets(p8, thresholds)).all(axis=1).sum())
    chk = Int8Check(
        n=len(images),
        top1_agree=agree,
        max_abs_diff=float(np.abs(p32 - p8).max()),
        source=source,
        multi_label=thresholds is not None,
    )
    if labels is not None and thresholds is not None:
        names = [str(j) for j in range(p32.shape[1])]
        m32 = multilabel_metrics(p32, labels, thresholds, names)
        m8 = multilabel_metrics(p8, labels, thresholds, names)
        chk.map_fp32, chk.map_int8 = m32["mAP"], m8["mAP"]
        chk.acc_fp32, chk.acc_int8 = m32["exact_match"], m8["exact_match"]
    elif labels is not None:
        chk.acc_fp32 = float((p32.argmax(1) == labels).mean())
        chk.acc_int8 = float((p8.argmax(1) == labels).mean())
    return chk


@contextlib.contextmanager
def _quiet_logs() -> Any:
    # onnxruntime.quantization logs every tensor it calibrates at INFO through the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)
