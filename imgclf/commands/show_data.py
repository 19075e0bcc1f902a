"""imgclf show-data"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "show-data"
HELP = "save a montage of sample images per class"
DESCRIPTION = (
    "Look at your data before training: one row per class with N random samples (the tutorials' "
    "'Figure 1'), or with --random N one grid of N random images titled with their class (the "
    "Fashion-MNIST 5x5 sample grid).\n\n"
    "Examples:\n"
    "  imgclf show-data --data dataset --out grid.png\n"
    "  imgclf show-data --data fashion-mnist --random 25 --out fashion.png"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--data", required=True, help="folder of class folders, IDX folder, or mnist/fashion-mnist/digits"
    )
    p.add_argument("--out", default="grid.png", help="PNG file to write")
    p.add_argument("--per-class", type=int, default=5, help="samples per class (one row per class)")
    p.add_argument(
        "--random", type=int, default=0, metavar="N", help="instead: N random images in one square grid"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for the sample")
    p.add_argument("--max-classes", type=int, default=30, help="show at most this many classes")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from imgclf.analysis import visualize as V
    from imgclf.data.sources import DataError, index_source

    if args.per_class < 1 or args.random < 0:
        raise DataError("--per-class must be >= 1 and --random >= 0")
    index = index_source(args.data)
    rng = np.random.default_rng(args.seed)
    name = Path(index.name).name
    if args.random:
        pick = rng.choice(len(index), size=min(args.random, len(index)), replace=False)
        png = V.montage(
            [V.source_image(index, int(i)) for i in pick],
            [index.classes[index.labels[i]] for i in pick],
            suptitle=f"{name}: {len(pick)} random samples",
        )
    else:
        rows = []
        for c, cname in enumerate(index.classes[: args.max_classes]):
            members = np.flatnonzero(index.labels == c)
            pick = rng.choice(members, size=min(args.per_class, len(members)), replace=False)
            rows.append((f"{cname} ({len(members)})", [V.source_image(index, int(i)) for i in pick]))
        png = V.class_montage(
            rows, suptitle=f"{name}: {args.per_class} samples per class (count in brackets)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    print(f"wrote {out} ({len(index.classes)} classes, {len(index)} images)")
    return 0
