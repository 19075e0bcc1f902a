"""Sub-commands of ``imgclf``; one module each (see :mod:`imgclf.cli`)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def key_value(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE read as JSON when it parses (2, 0.5, true, [1,2]), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. blocks=2 or lr=0.01)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


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
