"""Build a multi-label folder dataset from Fashion-MNIST: garments tinted in colours.

Each Fashion-MNIST image (white garment on black) is tinted with one colour and written to
``OUT/{train,test}/{colour}_{garment}/NNNNN.png``, so ``imgclf train --data OUT --multi-label``
learns the labels {colour, garment}. Colours jitter per image (hue and brightness), so colour is
learnt from the pixels, not from one exact RGB value. ``--hold-out red_dress`` leaves that
combination out of ``train/`` entirely and writes its images to ``OUT/heldout/red_dress/``
(the compositional check in bench/multilabel.py). Deterministic for a seed.

    python bench/multilabel_data.py --out /tmp/colour_garment --per-class 300 --hold-out red_dress
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

GARMENTS = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230)}


def _fashion_arrays(data_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from imgclf.data.sources import index_idx

    os.environ.setdefault("IMGCLF_DATA_DIR", str(data_dir))
    index = index_idx("fashion-mnist", download=False)
    out = {}
    for split in ("train", "test"):
        sel = np.flatnonzero(index.split == split)
        out[split] = (index.arrays[sel], index.labels[sel])
    return out


def tint(grey: np.ndarray, rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint8 garment -> (H, W, 3) uint8 in a jittered version of ``rgb``."""
    jitter = rng.normal(0, 18, 3)
    colour = np.clip(np.asarray(rgb, dtype=np.float64) + jitter, 0, 255) * rng.uniform(0.75, 1.0)
    out = grey[:, :, None].astype(np.float64) / 255.0 * colour[None, None, :]
    return np.clip(out, 0, 255).astype(np.uint8)


def build(
    out: str | Path,
    per_class: int = 300,
    test_per_class: int = 100,
    garments: list[str] | None = None,
    colours: list[str] | None = None,
    hold_out: list[str] | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> dict[str, int]:
    """Write the dataset under ``out``; returns the number of images per split."""
    from PIL import Image

    garments = garments or GARMENTS
    colours = colours or list(COLOURS)
    hold_out = hold_out or []
    bad = [g for g in garments if g not in GARMENTS] + [c for c in colours if c not in COLOURS]
    if bad:
        raise SystemExit(f"unknown garment/colour: {bad}; garments {GARMENTS}, colours {list(COLOURS)}")
    shared = Path(data_dir or Path(__file__).resolve().parents[2] / "shared" / "datasets")
    arrays = _fashion_arrays(shared)
    rng = np.random.default_rng(seed)
    out = Path(out)
    counts = {"train": 0, "test": 0, "heldout": 0}
    for split, n_per in (("train", per_class), ("test", test_per_class)):
        imgs, labels = arrays[split]
        for g in garments:
            pool = np.flatnonzero(labels == GARMENTS.index(g))
            # Each colour gets different garments: no image is the same shape in two colours.
            pool = rng.permutation(pool)[: n_per * len(colours)]
            for ci, c in enumerate(colours):
                name = f"{c}_{g}"
                where = "heldout" if name in hold_out and split == "train" else split
                d = out / where / name
                d.mkdir(parents=True, exist_ok=True)
                for k, i in enumerate(pool[ci * n_per : (ci + 1) * n_per]):
                    Image.fromarray(tint(imgs[i], COLOURS[c], rng)).save(d / f"{k:05d}.png")
                    counts[where] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-class", type=int, default=300, help="training images per colour_garment folder")
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--garments", default=",".join(GARMENTS))
    ap.add_argument("--colours", default=",".join(COLOURS))
    ap.add_argument("--hold-out", default="", help="combinations left out of train/, e.g. red_dress")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="the shared datasets folder (holding fashion-mnist/)")
    a = ap.parse_args(argv)
    counts = build(
        a.out,
        a.per_class,
        a.test_per_class,
        a.garments.split(","),
        a.colours.split(","),
        [h for h in a.hold_out.split(",") if h],
        a.seed,
        a.data_dir,
    )
    print(f"{a.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
