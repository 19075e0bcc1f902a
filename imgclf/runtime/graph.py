"""The inference graph of a bundle: uint8 NHWC pixels in, probabilities out, metadata attached.

The ONNX Runtime engine (:mod:`imgclf.runtime.bundle`) runs this graph and every exporter
(:mod:`imgclf.exporters.formats`) writes it, so preprocessing lives inside it exactly once.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from imgclf.core.errors import ExportError
from imgclf.core.files import atomic_write_bytes
from imgclf.core.preprocess import Preprocess, normalize
from imgclf.core.version import __version__
from imgclf.models.registry import logits_to_probs
from imgclf.runtime.onnxrt import META_FORMAT, META_PREFIX, OPTIONAL_JSON


class Bundle(Protocol):
    """What the graph needs of a bundle: :class:`imgclf.runtime.bundle.Bundle` is one. A protocol,
    not an import, because the bundle module imports this one."""

    path: Path
    model: nn.Module | None
    pre: Preprocess
    classes: list[str]
    meta: dict[str, Any]
    temperature: float
    ood: Any

    @property
    def sha256(self) -> str: ...

    @property
    def multi_label(self) -> bool: ...


OPSET = 17


# Bump when the exported graph changes; part of the user-cache key for in-memory ORT sessions.
# 2: the calibration temperature divides the logits inside the graph; an ood_score output.
EXPORT_VERSION = 2


INPUT_NAME = "image"


OUTPUT_NAME = "probabilities"


# Second output of bundles with unknown-image rejection.
SCORE_NAME = "ood_score"


class InferenceWrapper(nn.Module):
    """uint8 NHWC image batch -> class probabilities, preprocessing and calibration included."""

    def __init__(
        self, model: nn.Module, pre: Preprocess, temperature: float = 1.0, multi_label: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.pre = pre
        self.temperature = temperature
        self.multi_label = multi_label  # sigmoid per label instead of softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_to_probs(self.model(normalize(x, self.pre)), self.temperature, self.multi_label)


class ScoredInferenceWrapper(InferenceWrapper):
    """uint8 NHWC batch -> (class probabilities, unknown-image score), one forward pass."""

    def __init__(self, model: nn.Module, pre: Preprocess, temperature: float, scorer: nn.Module) -> None:
        from imgclf.runtime.ood import FeaturesAndLogits

        super().__init__(model, pre, temperature)
        self.both = FeaturesAndLogits(model)
        self.scorer = scorer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        feats, logits = self.both(normalize(x, self.pre))
        return logits_to_probs(logits, self.temperature), self.scorer(feats, logits)


class ImageInputWrapper(InferenceWrapper):
    """Core ML's ImageType hands the model float NCHW in 0-255; go back to NHWC and reuse normalize."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1))


def inference_wrapper(bundle: Bundle, cls: type[InferenceWrapper] = InferenceWrapper) -> InferenceWrapper:
    if bundle.model is None:
        raise ExportError(
            f"{bundle.path}: this model was loaded from an exported file; export from the bundle "
            "folder (a run's model/ folder) instead"
        )
    # A contiguous NCHW copy (Module.to is in place, so copy first): channels_last buys
    # nothing in a traced graph and some converters trip over the strides.
    model = copy.deepcopy(bundle.model).to(memory_format=torch.contiguous_format)
    if cls is ScoredInferenceWrapper:
        return ScoredInferenceWrapper(model, bundle.pre, bundle.temperature, copy.deepcopy(bundle.ood)).eval()
    return cls(model, bundle.pre, bundle.temperature, bundle.multi_label).eval()


def example_input(pre: Preprocess, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = pre.size
    return torch.randint(0, 256, (n, h, w, pre.channels), dtype=torch.uint8, generator=g)


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Tracing warns about the constant mean/std tensors and the static head-width check:
    both are constants by design, so the warnings are noise for the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def bundle_metadata(bundle: Bundle, input_desc: dict[str, Any] | None = None) -> dict[str, str]:
    """String metadata stored in every exported model (class names, input, preprocessing, hash)."""
    h, w = bundle.pre.size

    meta = {
        META_PREFIX + "format": META_FORMAT,
        META_PREFIX + "format_version": str(EXPORT_VERSION),
        META_PREFIX + "classes": json.dumps(bundle.classes),
        META_PREFIX + "input_size": f"{h}x{w}x{bundle.pre.channels}",
        META_PREFIX + "input": json.dumps(
            {
                "name": INPUT_NAME,
                "layout": "NHWC",
                "dtype": "uint8",
                "size": [h, w],
                "channels": bundle.pre.channels,
            }
        ),
        META_PREFIX + "output": json.dumps(
            {"name": OUTPUT_NAME, "kind": "sigmoid probabilities" if bundle.multi_label else "probabilities"}
        ),
        META_PREFIX + "preprocess": json.dumps(bundle.pre.to_dict()),
        META_PREFIX + "architecture": json.dumps(bundle.meta.get("architecture", {})),
        META_PREFIX + "bundle_sha256": bundle.sha256,
        META_PREFIX + "version": __version__,
    }
    for key in OPTIONAL_JSON:
        if bundle.meta.get(key) is not None:
            meta[META_PREFIX + key] = json.dumps(bundle.meta[key])
    if input_desc is not None:
        meta[META_PREFIX + "input"] = json.dumps(input_desc)
    return meta


def onnx_model_bytes(bundle: Bundle, opset: int = OPSET) -> bytes:
    """The checked ONNX graph (uint8 NHWC in, probabilities out, dynamic batch) with metadata."""
    import onnx

    scored = bundle.ood is not None
    wrapper = inference_wrapper(bundle, ScoredInferenceWrapper if scored else InferenceWrapper)
    outputs = [OUTPUT_NAME, SCORE_NAME] if scored else [OUTPUT_NAME]
    buf = io.BytesIO()
    with quiet_tracing(), torch.inference_mode(False), torch.no_grad():
        # The TorchScript-based exporter: the dynamo one needs onnxscript and gives the same
        # graph for these plain CNNs.
        torch.onnx.export(
            wrapper,
            (example_input(bundle.pre),),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    model.producer_name = "imgclf"
    model.doc_string = (
        f"imgclf classifier ({len(bundle.classes)} classes). Input '{INPUT_NAME}': uint8 "
        f"[batch, {bundle.pre.size[0]}, {bundle.pre.size[1]}, {bundle.pre.channels}] (NHWC, "
        f"{bundle.pre.color_mode}), already resized. Output '{OUTPUT_NAME}': float32 [batch, "
        f"{len(bundle.classes)}]. Class names are in metadata 'imgclf.classes'."
        + (
            " Multi-label: one sigmoid probability per label; a label is predicted when it reaches its "
            "threshold in metadata 'imgclf.thresholds'."
            if bundle.multi_label
            else ""
        )
        + (
            f" Output '{SCORE_NAME}': float32 [batch], the unknown-image score; an image is unknown "
            "when it exceeds metadata 'imgclf.ood' threshold."
            if scored
            else ""
        )
    )
    onnx.helper.set_model_props(model, bundle_metadata(bundle))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{bundle.path}: exported ONNX graph failed onnx.checker: {e}") from e
    return model.SerializeToString()


def onnx_cache_file(bundle: Bundle) -> Path:
    from imgclf.data.sources import cache_root

    key = json.dumps(
        [bundle.sha256, bundle.pre.to_dict(), bundle.classes, bundle.meta.get("architecture"),
         bundle.temperature, bundle.meta.get("ood"), bundle.meta.get("task"), torch.__version__,
         __version__, EXPORT_VERSION, OPSET],
        sort_keys=True,
    )  # fmt: skip
    return (
        cache_root() / "onnx" / f"{bundle.sha256[:16]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"
    )


def cached_onnx_bytes(bundle: Bundle) -> bytes:
    """The bundle's ONNX graph, from the user cache (keyed by weights sha256) or freshly exported.

    Bundle folders may be read-only, so nothing is written next to the bundle; if the cache
    is not writable either, the graph simply stays in memory.
    """
    f = onnx_cache_file(bundle)
    try:
        data = f.read_bytes()
        from imgclf.runtime.onnxrt import parse_imgclf_metadata

        import onnx  # isort: skip

        props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
        if parse_imgclf_metadata(props, str(f))["weights_sha256"] == bundle.sha256:
            return data
    except (OSError, ValueError, Exception):  # missing, truncated or foreign: re-export
        pass
    data = onnx_model_bytes(bundle)
    with contextlib.suppress(OSError):
        atomic_write_bytes(f, data)
    return data
