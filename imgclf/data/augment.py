"""Batched geometric augmentation, the Keras ImageDataGenerator settings on whole batches.

Split as Keras 3 does: :meth:`Augment.draw` samples random parameters for a batch,
:meth:`Augment.apply` applies them, so a run can be replayed from its generator state.
All samples in a batch go through one ``affine_grid`` + ``grid_sample`` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    angle: torch.Tensor  # radians, (B,)
    shear: torch.Tensor  # radians, (B,)
    tx: torch.Tensor  # fraction of width, (B,)
    ty: torch.Tensor  # fraction of height, (B,)
    zx: torch.Tensor  # zoom factor, (B,)
    zy: torch.Tensor
    flip: torch.Tensor  # bool, (B,)
    erase: torch.Tensor | None = None  # (B, 4) box x0, y0, x1, y1 as fractions; empty box = none
    noise_seed: int = 0  # seeds the erased boxes' fill


@dataclass(frozen=True)
class Augment:
    """rotation (deg), shift (fraction), shear (deg, as Keras), zoom (range), horizontal flip.

    The identity by default; the tutorial's values are declared once, as TrainConfig's defaults.
    """

    rotation: float = 0.0
    shift: float = 0.0
    shear: float = 0.0
    zoom: float = 0.0
    flip: bool = False
    erase: float = 0.0  # random-erasing probability (Zhong et al. 2017): box of 2-25 % area
    mode: str = "bilinear"  # Keras interpolates with order 1

    def draw(self, batch: int, generator: torch.Generator | None = None) -> AugmentParams:
        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(batch, generator=generator) * (hi - lo) + lo

        return AugmentParams(
            angle=u(-self.rotation, self.rotation) * (math.pi / 180),
            shear=u(-self.shear, self.shear) * (math.pi / 180),
            tx=u(-self.shift, self.shift),
            ty=u(-self.shift, self.shift),
            zx=u(1 - self.zoom, 1 + self.zoom),
            zy=u(1 - self.zoom, 1 + self.zoom),
            flip=(torch.rand(batch, generator=generator) < 0.5) & self.flip,
            **(self._draw_erase(batch, generator) if self.erase > 0 else {}),
        )

    def _draw_erase(self, batch: int, generator: torch.Generator | None) -> dict:
        area = torch.rand(batch, generator=generator) * 0.23 + 0.02
        log_ratio = (torch.rand(batch, generator=generator) * 2 - 1) * math.log(3.0)  # aspect 1/3..3
        w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        x0 = torch.rand(batch, generator=generator) * (1 - w)
        y0 = torch.rand(batch, generator=generator) * (1 - h)
        on = torch.rand(batch, generator=generator) < self.erase
        box = torch.stack([x0, y0, x0 + w, y0 + h], 1) * on.unsqueeze(1)  # off: empty box
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return {"erase": box, "noise_seed": seed}

    @staticmethod
    def matrices(p: AugmentParams) -> torch.Tensor:
        """(B, 2, 3) output->input sampling matrices in normalised coordinates."""
        cos, sin = torch.cos(p.angle), torch.sin(p.angle)
        # Keras composes rotation @ shift @ shear @ zoom and maps output pixels to inputs.
        rot = _mat(cos, -sin, sin, cos)
        shear = _mat(torch.ones_like(cos), -torch.sin(p.shear), torch.zeros_like(cos), torch.cos(p.shear))
        zoom = _mat(p.zx, torch.zeros_like(cos), torch.zeros_like(cos), p.zy)
        lin = rot @ shear @ zoom
        sign = torch.where(p.flip, -1.0, 1.0)
        lin = lin * torch.stack([sign, torch.ones_like(sign)], 1).unsqueeze(1)  # flip = negate x input
        trans = torch.stack([p.tx * 2, p.ty * 2], 1).unsqueeze(2)
        return torch.cat([lin, trans], 2)

    def apply(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Warp float NCHW ``x``; edges are replicated (Keras fill_mode='nearest')."""
        theta = self.matrices(p).to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode=self.mode, padding_mode="border", align_corners=False)
        if self.mode == "bicubic":
            x = x.clamp(0.0, 255.0)  # the cubic kernel overshoots at edges; inputs are 0-255 pixels
        if p.erase is not None:
            x = self._apply_erase(x, p)
        return x

    @staticmethod
    def _apply_erase(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Fill each image's box with uniform noise over the pixel range (0-255)."""
        n, _, h, w = x.shape
        box = p.erase.to(device=x.device, dtype=x.dtype)
        cx = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
        cy = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
        inx = (cx >= box[:, 0:1]) & (cx < box[:, 2:3])  # (B, W)
        iny = (cy >= box[:, 1:2]) & (cy < box[:, 3:4])  # (B, H)
        mask = (iny.unsqueeze(2) & inx.unsqueeze(1)).unsqueeze(1)  # (B, 1, H, W)
        g = torch.Generator(device=x.device).manual_seed(p.noise_seed)
        noise = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) * 255.0
        return torch.where(mask, noise, x)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.draw(x.shape[0], generator))


@dataclass(frozen=True)
class MixParams:
    perm: torch.Tensor  # (B,) the partner each image is mixed with
    lam: float  # the weight of each image's own label: the mix weight, or the area a box left
    box: tuple[int, int, int, int] | None = None  # CutMix: rows y0:y1, cols x0:x1 from the partner


@dataclass(frozen=True)
class Mix:
    """MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019) on whole batches.

    Each batch is paired with a shuffled copy of itself; the loss weighs both labels by ``lam``
    (``Trainer.loss``). ``mixup`` / ``cutmix`` are the Beta(a, a) concentrations (0 = off); with
    both on, each batch takes one of the two at random (as timm's ``Mixup``).
    """

    mixup: float = 0.0
    cutmix: float = 0.0

    def draw(self, batch: int, height: int, width: int, generator: torch.Generator) -> MixParams:
        perm = torch.randperm(batch, generator=generator)
        # torch's Beta takes no generator: a numpy stream seeded from it keeps runs repeatable.
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        cut = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < 0.5)
        lam = float(rng.beta(self.cutmix, self.cutmix) if cut else rng.beta(self.mixup, self.mixup))
        if not cut:
            return MixParams(perm, lam)
        # A box of area 1 - lam at a uniform centre, clipped to the image; lam is the area left.
        r = np.sqrt(1.0 - lam)
        cy, cx = rng.integers(height), rng.integers(width)
        y0, y1 = max(cy - int(height * r) // 2, 0), min(cy + int(height * r) // 2, height)
        x0, x1 = max(cx - int(width * r) // 2, 0), min(cx + int(width * r) // 2, width)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        return MixParams(perm, lam, (int(y0), int(y1), int(x0), int(x1)))

    @staticmethod
    def apply(x: torch.Tensor, p: MixParams) -> torch.Tensor:
        """Mix NCHW ``x`` with ``x[p.perm]`` (any pixel scale: the mix is linear)."""
        if p.box is None:
            return x * p.lam + x[p.perm] * (1.0 - p.lam)
        y0, y1, x0, x1 = p.box
        out = x.clone()
        out[:, :, y0:y1, x0:x1] = x[p.perm][:, :, y0:y1, x0:x1]
        return out


def _mat(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.stack([a, b], 1), torch.stack([c, d], 1)], 1)
