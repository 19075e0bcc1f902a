"""imgclf: train, evaluate, explain, serve and export image classifiers.

Python API::

    import imgclf
    result = imgclf.train(data="digits", model="lenet", epochs=3, out="runs/digits")
    model = imgclf.load(result.bundle_dir)
    model.predict("some.png")  # [{"label": ..., "probability": ..., "top_k": [...]}]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imgclf.core.version import __version__

if TYPE_CHECKING:
    from imgclf.runtime.bundle import Bundle
    from imgclf.training.trainer import TrainResult


def train(config: Any = None, /, *, progress: bool | None = None, **kwargs: Any) -> TrainResult:
    """Train from a dict or keyword arguments (the `imgclf train` options), or a TrainConfig.

    With a dict or keywords, the chosen ``recipe`` fills only the keys not given.
    """
    from imgclf.training.api import train as _train
    from imgclf.training.config import TrainConfig
    from imgclf.training.recipes import config_from

    if isinstance(config, TrainConfig):
        cfg = config.replace(**kwargs)
    else:
        cfg = config_from({**(config or {}), **kwargs})
    return _train(cfg, progress=progress)


def load(path: str) -> Bundle:
    """Load a bundle folder (or a run folder holding model/)."""
    from imgclf.runtime.bundle import load_bundle

    return load_bundle(path)


__all__ = ["__version__", "load", "train"]
