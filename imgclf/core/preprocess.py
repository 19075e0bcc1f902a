"""The single preprocessing path shared by train, predict, evaluate, serve and export.

Two steps, kept apart on purpose:
1. :func:`load_uint8` turns any image source into a uint8 HxWxC array at the model's size
   (this is what the decode cache stores);
2. :func:`normalize` turns a uint8 NHWC batch into the float NCHW (channels_last) tensor the
   network sees. The ONNX export embeds exactly this step in the graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from imgclf.core.imageio import DEFAULT_MAX_PIXELS, ImageSource, open_image, resize


@dataclass(frozen=True)
class Preprocess:
    """How raw images become model input; stored verbatim in every bundle."""

    size: tuple[int, int]  # (height, width)
    channels: int  # 1 (greyscale) or 3 (RGB)
    resize: str = "bilinear"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if not self.mean:
            object.__setattr__(self, "mean", (0.0,) * self.channels)
        if not self.std:
            object.__setattr__(self, "std", (1.0,) * self.channels)
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean/std need one value per channel")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def color_mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["color_mode"] = self.color_mode
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        keys = {"size", "channels", "resize", "scale", "mean", "std"}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in keys})

    def cache_key(self) -> str:
        """Identifies the uint8 array produced by :func:`load_uint8` (not the normalisation)."""
        h, w = self.size
        return f"{h}x{w}x{self.channels}-{self.resize}"


def load_uint8(
    src: ImageSource,
    pre: Preprocess,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Decode and resize one image to a uint8 array of shape (H, W, C)."""
    h, w = pre.size
    img = open_image(
        src, channels=pre.channels, size=(w, h), max_pixels=max_pixels, max_bytes=max_bytes, name=name
    )
    img = resize(img, (w, h), pre.resize)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def array_to_uint8(arr: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Bring an in-memory array (HxW, HxWxC, uint8 or float in [0,1]) to the model's uint8 input."""
    from PIL import Image

    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = np.clip(a * 255.0 if a.max(initial=0) <= 1.0 else a, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return load_uint8(Image.fromarray(a), pre)


def normalize(batch: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (or float 0-255) NHWC batch -> float32 NCHW in channels_last memory format."""
    x = batch.permute(0, 3, 1, 2).float()
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    # One fused multiply-add: (x*scale - mean)/std == x*a + b.
    a = pre.scale / std
    b = -mean / std
    x = torch.addcmul(b, x, a)
    return x.contiguous(memory_format=torch.channels_last)
