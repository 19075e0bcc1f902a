"""int8 ONNX: static post-training quantization with onnxruntime, checked on real images.

The float32 graph from :func:`imgclf.export.onnx_model_bytes` (uint8 NHWC in, preprocessing
inside) goes through ``onnxruntime.quantization.quantize_static``: QDQ format, int8 weights per
output channel, uint8 activations whose ranges are calibrated on training images. On CPUs
with AVX512-VNNI this cuts single-image latency by a third or more (bench/infer_speed.py).
Quantization can change a prediction, so it is opt-in (``imgclf export --int8``) and the export
reports accuracy and top-1 agreement against float32 on held-out images the model never
trained on.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, atomic_write_bytes

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
    from . import data as D
    from .evaluate import recorded_splits

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
