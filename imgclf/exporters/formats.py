"""Export a bundle for deployment: ONNX, TorchScript, Core ML and TFLite.

Every format wraps the network in :class:`InferenceWrapper`, which runs
:func:`imgclf.core.preprocess.normalize` (the same arithmetic as training and ``predict``) and
:func:`imgclf.models.registry.logits_to_probs` inside the exported graph. A deployed model therefore
takes the uint8 image at the model's size and returns class probabilities: there is no
preprocessing to re-implement in the app, and no way to get it subtly wrong.

Heavy converters (coremltools, litert-torch) are imported only when their format is asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf.core.errors import ExportError
from imgclf.models.registry import logits_to_probs
from imgclf.runtime.bundle import Bundle, atomic_write_bytes
from imgclf.runtime.graph import (
    INPUT_NAME,
    OUTPUT_NAME,
    ImageInputWrapper,
    InferenceWrapper,
    bundle_metadata,
    example_input,
    inference_wrapper,
    onnx_model_bytes,
    quiet_tracing,
)
from imgclf.runtime.multilabel import predicted_sets

FORMATS = ("onnx", "torchscript", "coreml", "tflite")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "coreml": ".mlpackage", "tflite": ".tflite"}


@dataclass
class Parity:
    """Exported model vs the bundle in PyTorch eager on the same uint8 images.

    ``top1_agree`` counts images with the same top class; for a multi-label bundle
    (``multi_label``) it counts images with the same predicted label set (each label's
    probability against its threshold).
    """

    n: int
    max_abs_diff: float
    top1_agree: int
    multi_label: bool = False

    @property
    def ok(self) -> bool:
        return self.top1_agree == self.n and self.max_abs_diff <= 1e-4

    def __str__(self) -> str:
        what = "label sets agree" if self.multi_label else "top-1 agrees"
        return f"{what} on {self.top1_agree}/{self.n} images, max |prob diff| {self.max_abs_diff:.2e}"


@dataclass
class ExportResult:
    format: str
    path: Path
    extra: list[Path] = field(default_factory=list)
    parity: Parity | None = None
    note: str = ""
    int8: Any = None  # imgclf.exporters.int8.Int8Check when an int8 ONNX was written


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def compare(reference: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | None = None) -> Parity:
    """Parity of ``probs`` against ``reference`` (both (N, K)).

    With ``thresholds`` (a multi-label bundle's, one per label) agreement means the same
    predicted label set rather than the same top class.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape != reference.shape:
        raise ExportError(f"exported model returned shape {probs.shape}, expected {reference.shape}")
    if thresholds is not None:
        same = (predicted_sets(probs, thresholds) == predicted_sets(reference, thresholds)).all(axis=1)
        agree = int(same.sum())
    else:
        agree = int((probs.argmax(1) == reference.argmax(1)).sum())
    return Parity(
        n=len(reference),
        max_abs_diff=float(np.abs(probs - reference).max(initial=0.0)),
        top1_agree=agree,
        multi_label=thresholds is not None,
    )


def eager_probs(bundle: Bundle, images: np.ndarray) -> np.ndarray:
    """Reference probabilities: the bundle's network in PyTorch eager, whatever its default backend
    (sigmoids for a multi-label bundle, softmax otherwise)."""
    if bundle.model is None:
        raise ExportError(f"{bundle.path}: no PyTorch network to compare against")
    with torch.inference_mode():
        logits = bundle.logits(torch.as_tensor(images))
        return logits_to_probs(logits, bundle.temperature, bundle.multi_label).float().numpy()


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------


def optimized_path_for(path: Path) -> Path:
    """``model.onnx`` -> ``model.optimized.onnx``."""
    return path.with_name(path.stem + ".optimized.onnx")


def save_ort_optimized(onnx_bytes: bytes, out: Path) -> Path:
    """Run ORT's graph optimiser once (Conv+ReLU / Gemm fusion, constant folding) and save the result.

    ORT writes the metadata_props through, so the optimised file loads in imgclf just the same.
    """
    import onnxruntime as ort

    from imgclf.runtime.onnxrt import session_options

    tmp = out.with_name(f".{out.name}.tmp")
    try:
        so = session_options(1, optimized_path=tmp)
        ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def export_onnx(bundle: Bundle, path: str | Path, *, optimized: bool = True) -> ExportResult:
    """Write ``path`` (checked ONNX) and, if ``optimized``, ``<stem>.optimized.onnx`` for onnxruntime."""
    out = Path(path)
    data = onnx_model_bytes(bundle)
    atomic_write_bytes(out, data)
    res = ExportResult("onnx", out)
    if optimized:
        res.extra.append(save_ort_optimized(data, optimized_path_for(out)))
    return res


# ---------------------------------------------------------------------------------------------
# TorchScript
# ---------------------------------------------------------------------------------------------


def trace(bundle: Bundle, cls: type[InferenceWrapper] = InferenceWrapper) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of the wrapper; checked on a second batch size (batch stays dynamic)."""
    wrapper = inference_wrapper(bundle, cls)
    ex = example_input(bundle.pre, 2)
    check = example_input(bundle.pre, 3, seed=1)
    if cls is ImageInputWrapper:
        ex, check = ex.permute(0, 3, 1, 2).float(), check.permute(0, 3, 1, 2).float()
    with quiet_tracing(), torch.inference_mode(False), torch.no_grad():
        return torch.jit.trace(wrapper, ex, check_inputs=[(check,)], check_tolerance=1e-5)


def export_torchscript(bundle: Bundle, path: str | Path) -> ExportResult:
    """Write a TorchScript file: ``torch.jit.load(path)(uint8 NHWC) -> probabilities``.

    The metadata is stored as the extra file ``imgclf.json`` inside the archive.
    """
    out = Path(path)
    ts = trace(bundle)
    buf = io.BytesIO()
    with quiet_tracing():  # torch.jit.save warns that TorchScript is deprecated; the format still works
        torch.jit.save(ts, buf, _extra_files={"imgclf.json": json.dumps(bundle_metadata(bundle))})
    atomic_write_bytes(out, buf.getvalue())
    return ExportResult("torchscript", out)


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """Load an exported TorchScript file and its imgclf metadata."""
    extra = {"imgclf.json": ""}
    with quiet_tracing():  # torch.jit.load warns that TorchScript is deprecated; the file still loads
        m = torch.jit.load(str(path), _extra_files=extra)
    return m.eval(), json.loads(extra["imgclf.json"] or "{}")


# ---------------------------------------------------------------------------------------------
# Core ML
# ---------------------------------------------------------------------------------------------


def _import_coremltools() -> Any:
    # coremltools logs a line per missing macOS runtime proxy on Linux; conversion does not need them.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        with quiet_tracing():
            import coremltools as ct
    except ImportError as e:
        raise ExportError(
            "Core ML export needs coremltools: pip install 'imgclf[coreml]' (or pip install coremltools)"
        ) from e
    _register_coreml_ops()
    return ct


def _register_coreml_ops() -> None:
    """coremltools 9 has no translation for ``torch.addcmul``, which normalize() uses; add it
    as exactly ``input + t1 * t2 * value`` so the arithmetic stays the same as in training."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import (
        _TORCH_OPS_REGISTRY,
        register_torch_op,
    )

    if "addcmul" in _TORCH_OPS_REGISTRY.name_to_func_mapping:
        return

    def addcmul(context: Any, node: Any) -> None:
        inp, t1, t2, value = _get_inputs(context, node, expected=4)
        prod = mb.mul(x=t1, y=t2)
        if value.val is None or float(value.val) != 1.0:
            prod = mb.mul(x=prod, y=value)
        context.add(mb.add(x=inp, y=prod, name=node.name))

    register_torch_op(addcmul)


def export_coreml(bundle: Bundle, path: str | Path) -> ExportResult:
    """Write a Core ML ``.mlpackage`` (ML Program, float32): image input, classifier output.

    The input is an ``ImageType`` (RGB or greyscale, at the model's size) with scale 1 and
    bias 0, so Core ML hands over raw 0-255 pixels and the graph's own normalize() step does
    the rest. Class labels are embedded with a ``ClassifierConfig``: outputs ``classLabel``
    and ``classLabel_probs``. A multi-label bundle is no single-answer classifier, so it gets
    one float32 output ``probabilities`` (a sigmoid per label, in ``imgclf.classes`` order) and
    its per-label thresholds in the metadata (``imgclf.thresholds``).
    """
    out = Path(path)
    if out.suffix != ".mlpackage":
        raise ExportError(f"{out}: Core ML ML Programs are saved as a folder ending in .mlpackage")
    ct = _import_coremltools()
    h, w = bundle.pre.size
    ts = trace(bundle, ImageInputWrapper)
    layout = ct.colorlayout.RGB if bundle.pre.channels == 3 else ct.colorlayout.GRAYSCALE
    with quiet_tracing():
        mlmodel = ct.convert(
            ts,
            inputs=[ct.ImageType(name=INPUT_NAME, shape=(1, bundle.pre.channels, h, w), color_layout=layout)],
            # Core ML's classifier output is one argmax label over softmax-like scores, which is
            # wrong for independent sigmoids: multi-label gets a plain named tensor instead.
            **(
                {"outputs": [ct.TensorType(name=OUTPUT_NAME)]}
                if bundle.multi_label
                else {"classifier_config": ct.ClassifierConfig(list(bundle.classes))}
            ),
            convert_to="mlprogram",
            # float16 would cost parity with the trained model; iOS 15 is the ML Program minimum.
            compute_precision=ct.precision.FLOAT32,
            minimum_deployment_target=ct.target.iOS15,
        )
    kind = "multi-label classifier (sigmoid per label)" if bundle.multi_label else "classifier"
    mlmodel.short_description = f"imgclf {bundle.meta.get('architecture', {}).get('name', '')} {kind}"
    mlmodel.input_description[INPUT_NAME] = (
        f"{bundle.pre.color_mode} image, {w}x{h} (resize it the way imgclf did: {bundle.pre.resize})"
    )
    desc = {"name": INPUT_NAME, "kind": "image", "color": bundle.pre.color_mode, "size": [h, w]}
    for k, v in bundle_metadata(bundle, desc).items():
        mlmodel.user_defined_metadata[k] = v
    if out.exists():
        import shutil

        shutil.rmtree(out) if out.is_dir() else out.unlink()
    mlmodel.save(str(out))
    return ExportResult("coreml", out, note="Core ML runs on Apple platforms only; the spec was checked here")


def coreml_spec_summary(path: str | Path) -> dict[str, Any]:
    """Inputs, outputs and classifier labels of a saved .mlpackage (works on Linux)."""
    ct = _import_coremltools()
    spec = ct.utils.load_spec(str(path))
    d = spec.description
    inputs = []
    for i in d.input:
        kind = i.type.WhichOneof("Type")
        entry: dict[str, Any] = {"name": i.name, "type": kind}
        if kind == "imageType":
            entry.update(
                width=i.type.imageType.width,
                height=i.type.imageType.height,
                color=ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(i.type.imageType.colorSpace),
            )
        inputs.append(entry)
    return {
        "type": spec.WhichOneof("Type"),
        "inputs": inputs,
        "outputs": [{"name": o.name, "type": o.type.WhichOneof("Type")} for o in d.output],
        "predicted_feature": d.predictedFeatureName,
        "predicted_probabilities": d.predictedProbabilitiesName,
        "class_labels": _program_class_labels(spec),
        "metadata": dict(d.metadata.userDefined),
    }


def _program_class_labels(spec: Any) -> list[str]:
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                if op.type == "classify":
                    items = op.inputs["classes"].arguments[0].value.immediateValue.list.values
                    return [v.immediateValue.tensor.strings.values[0] for v in items]
    return []


# ---------------------------------------------------------------------------------------------
# TFLite
# ---------------------------------------------------------------------------------------------

TFLITE_HELP = (
    "TFLite export needs litert-torch (Google's maintained PyTorch->LiteRT converter): "
    "pip install 'imgclf[tflite]'. It pins older pydantic/typing_extensions, so a separate "
    "virtual environment for exporting is recommended"
)


def export_tflite(bundle: Bundle, path: str | Path) -> ExportResult:
    """Write a ``.tflite`` flatbuffer via litert-torch: uint8 NHWC [1, H, W, C] in, probabilities out."""
    out = Path(path)
    try:
        with quiet_tracing():
            import litert_torch
    except ImportError as e:
        raise ExportError(TFLITE_HELP) from e
    wrapper = inference_wrapper(bundle)
    # Mobile interpreters run one image at a time; a fixed batch of 1 keeps the graph simple.
    with quiet_tracing(), torch.inference_mode(False), torch.no_grad():
        edge = litert_torch.convert(wrapper, (example_input(bundle.pre, 1),))
    tmp = out.with_name(f".{out.name}.tmp")
    edge.export(str(tmp))
    os.replace(tmp, out)
    meta = out.with_name(out.stem + ".json")
    atomic_write_bytes(meta, (json.dumps(bundle_metadata(bundle), indent=2) + "\n").encode())
    return ExportResult(
        "tflite", out, extra=[meta], note="class names and preprocessing are in the .json beside it"
    )


def tflite_runner(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """``run(uint8 NHWC batch) -> probs`` through the LiteRT interpreter, one image per invoke."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise ExportError("running a .tflite model needs ai-edge-litert: pip install ai-edge-litert") from e
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    i_idx = it.get_input_details()[0]["index"]
    o_idx = it.get_output_details()[0]["index"]

    def run(batch: np.ndarray) -> np.ndarray:
        outs = []
        for x in batch:
            it.set_tensor(i_idx, np.ascontiguousarray(x[None], dtype=np.uint8))
            it.invoke()
            outs.append(it.get_tensor(o_idx)[0].copy())
        return np.stack(outs).astype(np.float32)

    return run


# ---------------------------------------------------------------------------------------------
# one entry point
# ---------------------------------------------------------------------------------------------


def runner_for(result: ExportResult) -> Callable[[np.ndarray], np.ndarray] | None:
    """A ``uint8 NHWC -> probs`` function for an exported file, or None where it cannot run here."""
    if result.format == "onnx":
        from imgclf.runtime.onnxrt import OrtRunner

        return OrtRunner(result.path)
    if result.format == "torchscript":
        m, _ = load_torchscript(result.path)

        def run(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return m(torch.as_tensor(batch)).float().numpy()

        return run
    if result.format == "tflite":
        try:
            return tflite_runner(result.path)
        except ExportError:
            return None
    return None  # Core ML predicts on Apple platforms only


def check_parity(bundle: Bundle, result: ExportResult, images: np.ndarray) -> Parity | None:
    """Run the exported file on ``images`` (uint8 NHWC) and compare with PyTorch eager."""
    run = runner_for(result)
    if run is None:
        return None
    ref = eager_probs(bundle, images)
    probs = np.concatenate([run(images[s : s + 64]) for s in range(0, len(images), 64)])
    return compare(ref, probs, bundle.thresholds)


def default_out(bundle: Bundle, fmt: str) -> Path:
    return Path.cwd() / f"model{SUFFIXES[fmt]}"


def export(
    bundle: Bundle,
    fmt: str,
    out: str | Path | None = None,
    *,
    check_images: np.ndarray | None = None,
    optimized: bool = True,
    int8: bool = False,
    calibration: np.ndarray | None = None,
) -> ExportResult:
    """Export ``bundle`` as ``fmt`` (one of :data:`FORMATS`) and, where it can run here, check parity.

    ``check_images`` (uint8 NHWC at the model's size) default to 32 seeded random images.
    ``int8`` (ONNX only) also writes ``<stem>.int8.onnx`` (see :mod:`imgclf.exporters.int8`),
    calibrated on ``calibration`` images or else on the run's recorded training images.
    """
    if int8 and fmt.lower() != "onnx":
        raise ExportError("--int8 applies to --format onnx only")
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(out) if out is not None else default_out(bundle, fmt)
    if path.exists() and path.is_dir() and fmt != "coreml":
        path = path / f"model{SUFFIXES[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        res = export_onnx(bundle, path, optimized=optimized)
    elif fmt == "torchscript":
        res = export_torchscript(bundle, path)
    elif fmt == "coreml":
        res = export_coreml(bundle, path)
    else:
        res = export_tflite(bundle, path)
    images = check_images if check_images is not None else example_input(bundle.pre, 32, seed=123).numpy()
    res.parity = check_parity(bundle, res, images)
    if int8:
        _add_int8(bundle, res, calibration, check_images)
    return res


def int8_path_for(path: Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    return path.with_name(path.stem + ".int8.onnx")


def int8_source_onnx(bundle: Bundle) -> bytes:
    """The float32 ONNX graph that ``--int8`` quantizes: the export with its Keras-order
    BatchNorms folded into the next conv (exact; see ``quantize.fold_batchnorm_forward``)."""
    from imgclf.exporters.int8 import fold_batchnorm_forward

    folded = fold_batchnorm_forward(bundle.model, (bundle.pre.channels, *bundle.pre.size))
    return onnx_model_bytes(dataclasses.replace(bundle, model=folded))


def _add_int8(
    bundle: Bundle, res: ExportResult, calibration: np.ndarray | None, check_images: np.ndarray | None
) -> None:
    from imgclf.exporters.int8 import (
        CALIBRATION_IMAGES,
        compare_int8,
        quantize_int8,
        recorded_images,
    )
    from imgclf.runtime.onnxrt import OrtRunner

    if calibration is None:
        rec = recorded_images(bundle, "train", CALIBRATION_IMAGES)
        if rec is None:
            raise ExportError(
                f"{bundle.path}: --int8 needs calibration images and the training data recorded in the "
                "bundle is not available here; pass --calibration IMAGES (a few hundred typical images)"
            )
        calibration = rec[0]
    path = quantize_int8(int8_source_onnx(bundle), calibration, int8_path_for(res.path))
    res.extra.append(path)
    held = recorded_images(bundle, "test", 2000) or recorded_images(bundle, "val", 2000)
    fp32, q = OrtRunner(res.path), OrtRunner(path)
    th = bundle.thresholds
    if held is not None:
        res.int8 = compare_int8(fp32, q, held[0], held[1], "held-out images the model never trained on", th)
    else:
        imgs = check_images if check_images is not None else calibration
        res.int8 = compare_int8(fp32, q, imgs, None, "check images", th)


def images_for_check(bundle: Bundle, paths: Sequence[str], limit: int = 200) -> np.ndarray:
    """Prepare up to ``limit`` real images (files, folders, globs) for a parity check."""
    from imgclf.core.imageio import ImageDecodeError
    from imgclf.runtime.predict import expand_paths

    files, _ = expand_paths(list(paths))
    arrays = []
    for f in files:
        if len(arrays) >= limit:
            break
        with contextlib.suppress(ImageDecodeError):
            arrays.append(bundle.prepare(f))
    if not arrays:
        raise ExportError(f"no readable images for the parity check in {', '.join(paths)}")
    return np.stack(arrays)
