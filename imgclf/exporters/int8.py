"""int8 ONNX: static post-training quantization with onnxruntime, checked on real images.

The float32 graph from :func:`imgclf.exporters.formats.onnx_model_bytes` (uint8 NHWC in, preprocessing
inside) goes through ``onnxruntime.quantization.quantize_static``: QDQ format, int8 weights per
output channel, uint8 activations whose ranges are calibrated on training images. On CPUs
with AVX512-VNNI this cuts single-image latency by a third or more (bench/infer_speed.py).
Quantization can change a prediction, so it is opt-in (``imgclf export --int8``) and the export
reports accuracy and top-1 agreement against float32 on held-out images the model never
trained on.
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

log = logging.getLogger("imgclf")

# Conv/Gemm carry the FLOPs; MaxPool and Relu run on int8 so no dequantize sits between them.
OPS = ["Conv", "Gemm", "MatMul", "MaxPool", "Relu"]
CALIBRATION_IMAGES = 256


@dataclass
class Int8Check:
    """int8 vs float32 on the same images (labels optional)."""

    n: int
    top1_agree: int
    max_abs_diff: float
    acc_fp32: float | None = None
    acc_int8: float | None = None
    source: str = ""

    def __str__(self) -> str:
        s = f"top-1 agrees with float32 on {self.top1_agree}/{self.n} {self.source}"
        if self.acc_fp32 is not None and self.acc_int8 is not None:
            s += f"; accuracy {self.acc_fp32 * 100:.2f}% (float32) -> {self.acc_int8 * 100:.2f}% (int8)"
        return s


def recorded_images(
    bundle: Bundle, split: str, limit: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray] | None:
    """Up to ``limit`` (stratified) decoded images + labels of the training run's ``split``.

    Uses the data source recorded in the bundle and the run's splits.json (or the source's
    official split); None when either is no longer available.
    """
    from imgclf.data import sources as D
    from imgclf.runtime.bundle import recorded_splits

    src = bundle.meta.get("data_source")
    if not src:
        return None
    try:
        index = D.index_source(src)
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
    return (dec.images, dec.labels) if len(dec.labels) else None


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
    fp32: Any, int8: Any, images: np.ndarray, labels: np.ndarray | None = None, source: str = ""
) -> Int8Check:
    """Run both ``uint8 NHWC -> probs`` functions on ``images`` and compare."""
    p32 = np.concatenate([fp32(images[s : s + 64]) for s in range(0, len(images), 64)])
    p8 = np.concatenate([int8(images[s : s + 64]) for s in range(0, len(images), 64)])
    chk = Int8Check(
        n=len(images),
        top1_agree=int((p32.argmax(1) == p8.argmax(1)).sum()),
        max_abs_diff=float(np.abs(p32 - p8).max()),
        source=source,
    )
    if labels is not None:
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
