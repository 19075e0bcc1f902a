"""ONNX Runtime inference: the fast path behind :meth:`imgclf.runtime.bundle.Bundle.predict_batch`.

The graphs run here are the ones :mod:`imgclf.exporters.formats` writes: uint8 NHWC in, class
probabilities out, preprocessing inside. ``onnxruntime`` is imported lazily so that
``import imgclf`` stays light.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

# Metadata keys of exported graphs (imgclf.runtime.graph), kept here: loading needs no torch.
META_PREFIX = "imgclf."
META_FORMAT = "imgclf-export"

THREADS_ENV = "IMGCLF_ORT_THREADS"


def available() -> bool:
    """True when onnxruntime can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def default_threads() -> int:
    """Intra-op threads: $IMGCLF_ORT_THREADS, else every core up to 4.

    Measured on the idle 2-core dev box (docs/PERFORMANCE.md): 2 threads gave SmallerVGGNet
    96x96 a 2.01 ms single-image latency against 3.68 ms with 1, and 724 against 387 img/s at
    batch 64. Under contention 1 thread is better; ``imgclf serve``
    therefore leaves a core to the HTTP side, and the variable overrides both.
    """
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            pass
    return max(1, min(4, os.cpu_count() or 1))


def session_options(
    threads: int | None = None, optimized_path: str | Path | None = None, arena: bool = True
) -> Any:
    """SessionOptions with full graph optimisation (fuses Conv+BN+ReLU) and sequential execution.

    ``arena`` False: no CPU memory arena, so memory of a large batch goes back after it (servers).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = default_threads() if threads is None else threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT warns about unused initializers otherwise
    so.enable_cpu_mem_arena = arena
    if optimized_path is not None:
        # Extended, not ALL: layout (NCHWc) rewrites depend on this CPU's vector width and
        # would make the saved graph non-portable.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized_path)
    return so


class OrtRunner:
    """One ORT session over an imgclf graph: ``runner(uint8 NHWC) -> float32 probs (N, K)``."""

    def __init__(self, model: bytes | str | Path, *, threads: int | None = None, arena: bool = True) -> None:
        import onnxruntime as ort

        src = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(
            src, sess_options=session_options(threads, arena=arena), providers=["CPUExecutionProvider"]
        )
        inp = self.session.get_inputs()[0]
        self.input_name: str = inp.name
        self.input_shape: list[Any] = list(inp.shape)
        self.input_type: str = inp.type
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name: str = outputs[0]
        # Graphs of bundles with unknown-image rejection have a second output, the score.
        self.score_name: str | None = outputs[1] if len(outputs) > 1 else None

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[0]

    def run(self, batch: np.ndarray, scored: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, unknown-image scores when ``scored`` and the graph has them, else None)."""
        x = np.ascontiguousarray(batch, dtype=np.uint8)
        names = [self.output_name] + ([self.score_name] if scored and self.score_name else [])
        outs = [o.astype(np.float32, copy=False) for o in self.session.run(names, {self.input_name: x})]
        return outs[0], (outs[1] if len(outs) > 1 else None)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file, without loading its weights into a session."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


# Bundle records copied into an export's metadata when the bundle has them (JSON text).
OPTIONAL_JSON = ("calibration", "ood", "task", "thresholds")


def parse_imgclf_metadata(props: dict[str, str], source: str) -> dict[str, Any]:
    """Decode the ``imgclf.*`` metadata into a bundle-like dict; ValueError naming ``source`` if absent."""
    if props.get(META_PREFIX + "format") != META_FORMAT:
        raise ValueError(
            f"{source}: this ONNX file has no imgclf metadata (class names, preprocessing); "
            "export it with `imgclf export BUNDLE --format onnx` to use it with imgclf"
        )
    try:
        return {
            "classes": json.loads(props[META_PREFIX + "classes"]),
            "preprocess": json.loads(props[META_PREFIX + "preprocess"]),
            "architecture": json.loads(props.get(META_PREFIX + "architecture", "{}")),
            "weights_sha256": props.get(META_PREFIX + "bundle_sha256", ""),
            "format_version": int(props.get(META_PREFIX + "format_version", "1")),
            "versions": {"imgclf": props.get(META_PREFIX + "version", "")},
            **(
                {"quantization": props[META_PREFIX + "quantization"]}
                if META_PREFIX + "quantization" in props
                else {}
            ),
            **{k: json.loads(props[META_PREFIX + k]) for k in OPTIONAL_JSON if META_PREFIX + k in props},
        }
    except (KeyError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{source}: damaged imgclf metadata in the ONNX file ({e}); re-export it") from e
