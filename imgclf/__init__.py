"""imgclf: train, evaluate, explain, serve and export image classifiers.

The public API, one function per stage (each also works as an ``imgclf`` command)::

    import imgclf
    result = imgclf.train(data="digits", model="lenet", epochs=3, out="runs/digits")
    model = imgclf.load(result.bundle_dir)
    model.predict("some.png")            # [{"label": ..., "probability": ..., "top_k": [...]}]
    model.predict_batch(uint8_nhwc)      # (N, classes) probabilities
    imgclf.evaluate(model, "digits", out="runs/digits/eval").metrics["accuracy"]
    imgclf.inspect("dataset/", out="doctor/")
    imgclf.export(model, "onnx", "digits.onnx")
    with imgclf.serve(model, port=0, background=True) as server:
        print(server.url)

Everything here is imported lazily, so ``import imgclf`` is fast and pulls in no torch.
The layers below (core -> data/models -> runtime -> training/exporters/analysis -> serving ->
commands) are internals; docs/DEVELOPING.md maps them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.core.version import __version__

if TYPE_CHECKING:
    from imgclf.analysis.doctor import DoctorReport
    from imgclf.analysis.evaluate import EvalResult
    from imgclf.exporters.formats import ExportResult
    from imgclf.runtime.bundle import Bundle
    from imgclf.serving.app import BackgroundServer
    from imgclf.training.callbacks import Callback
    from imgclf.training.trainer import TrainResult


def __getattr__(name: str) -> Any:
    # imgclf.Callback without importing torch at `import imgclf`
    if name == "Callback":
        from imgclf.training.callbacks import Callback

        return Callback
    raise AttributeError(f"module 'imgclf' has no attribute {name!r}")


ModelRef = Any  # a bundle folder, a run folder, an exported .onnx file, or a loaded Bundle


def train(
    config: Any = None,
    /,
    *,
    progress: bool | None = None,
    callbacks: list[Callback] | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Train from a dict or keyword arguments (the ``imgclf train`` options), or a TrainConfig.

    With a dict or keywords, the recipe (``best`` unless ``recipe=`` says otherwise) fills only
    the keys not given. ``callbacks`` are :class:`imgclf.training.callbacks.Callback` objects run
    after the built-in ones.
    """
    from imgclf.training.api import train as _train
    from imgclf.training.config import TrainConfig
    from imgclf.training.recipes import config_from

    if isinstance(config, TrainConfig):
        cfg = config.replace(**kwargs)
    else:
        cfg = config_from({**(config or {}), **kwargs})
    return _train(cfg, progress=progress, callbacks=callbacks)


def resume(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    progress: bool | None = None,
    callbacks: list[Callback] | None = None,
) -> TrainResult:
    """Continue a run folder from its last checkpoint (``epochs`` raises the planned total)."""
    from imgclf.training.api import resume as _resume

    return _resume(run_dir, epochs=epochs, progress=progress, callbacks=callbacks)


def load(path: str | Path, *, backend: str | None = None) -> Bundle:
    """Load a bundle folder, a run folder holding ``model/``, or an exported ``.onnx`` file."""
    from imgclf.runtime.bundle import load_bundle

    return load_bundle(path, backend=backend)


def _bundle(model: ModelRef, backend: str | None = None) -> Bundle:
    from imgclf.runtime.bundle import Bundle

    return model if isinstance(model, Bundle) else load(model, backend=backend)


def evaluate(
    model: ModelRef,
    data: str | Path | None = None,
    *,
    split: str | None = None,
    out: str | Path | None = None,
    tta: str | None = None,
    bias: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Score ``model`` on ``data`` (default: the data it was trained on, its recorded test split).

    With ``out`` the report files (metrics.json, report.html, ...) are written there too.
    """
    from imgclf.analysis.evaluate import evaluate as _evaluate

    return _evaluate(_bundle(model), data, split=split, out=out, tta=tta, bias=bias, progress=progress)


def inspect(
    data: str | Path,
    *,
    out: str | Path | None = None,
    progress: bool = False,
    labels: bool | dict[str, Any] = False,
    fix_to: str | Path | None = None,
    **options: Any,
) -> DoctorReport:
    """Run the dataset doctor on a folder or built-in dataset; with ``out`` write inspect.json/html.

    ``options`` are :func:`imgclf.analysis.doctor.inspect_source`'s (``near``, ``threshold``, ...).
    ``labels=True`` adds the label check (``inspect --labels``): K small models give every image
    an out-of-fold probability and cleanlab ranks the likely label errors (``report.labels``); a
    dict sets its options (``{"folds": 5, "model": "lenet", "img_size": 24, "epochs": ..., "seed":
    0, "threads": ...}``, as :func:`imgclf.commands.inspect.label_check`). ``fix_to`` also writes
    a copy of the folder with the flagged images moved to their suggested class.
    """
    from imgclf.analysis.doctor import inspect_source, write_report

    if fix_to is not None and not labels:
        raise ValueError("fix_to needs labels=True")
    report = inspect_source(data, progress=progress, **options)
    if labels:
        from imgclf.analysis.labels import relabelled_copy
        from imgclf.commands.inspect import label_check

        given = labels if isinstance(labels, dict) else {}
        report.labels = label_check(report, **given, fix_to=fix_to, progress=progress)
        if fix_to is not None:
            assert report.index is not None
            relabelled_copy(report.index.root, report.index.items, report.labels, fix_to)
    if out is not None:
        write_report(report, Path(out), html=True, progress=progress)
    return report


def export(
    model: ModelRef,
    format: str = "onnx",
    out: str | Path | None = None,
    *,
    int8: bool = False,
    check: list[str] | None = None,
) -> ExportResult:
    """Export ``model`` to onnx, torchscript, coreml or tflite; parity is checked where it can run.

    ``check`` names image files to check parity on (default: 32 seeded random images).
    """
    from imgclf.exporters.formats import export as _export
    from imgclf.exporters.formats import images_for_check

    bundle = _bundle(model, backend="torch")
    images = images_for_check(bundle, check) if check else None
    return _export(bundle, format, out, check_images=images, int8=int8)


def serve(model: ModelRef, *, background: bool = False, **options: Any) -> BackgroundServer | None:
    """Serve ``model`` over HTTP (the ``imgclf serve`` app): block until stopped, or with
    ``background=True`` return a running server (``.url``, ``.close()``, a context manager).

    ``options`` are the ``imgclf serve`` flags' names: ``host``, ``port`` (0 = any free port),
    ``workers`` and the limits of :class:`imgclf.serving.settings.ServeSettings`.
    """
    from imgclf.serving.app import serve as _serve

    return _serve(model, background=background, **options)


__all__ = ["Callback", "__version__", "evaluate", "export", "inspect", "load", "resume", "serve", "train"]
