"""Sub-commands of ``imgclf``; one module each (see :mod:`imgclf.cli`)."""

from __future__ import annotations

import argparse


def add_tta_argument(p: argparse.ArgumentParser) -> None:
    """``--tta [SET]``, shared by ``predict`` and ``evaluate``."""
    from imgclf.runtime.tta import VIEW_SETS

    p.add_argument(
        "--tta",
        nargs="?",
        const="auto",
        default=None,
        choices=VIEW_SETS,
        help="test-time augmentation: average the probabilities over flipped/shifted copies. "
        "Plain --tta picks views from the bundle's training augmentation (flips only if it "
        "trained with flips); or name a set",
    )
