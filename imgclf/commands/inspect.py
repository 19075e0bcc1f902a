"""imgclf inspect"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "inspect"
HELP = "check a dataset: unreadable files, duplicates, label conflicts, leakage, imbalance"
DESCRIPTION = (
    "The dataset doctor. Reads every image once and reports, per class and in total: image\n"
    "count, formats and modes, size range, unreadable or truncated files (with the reason),\n"
    "extension/format mismatches (a PNG named .gif), tiny and enormous images, exact\n"
    "duplicates (same bytes), near-duplicates (resized or re-encoded copies: 256-bit\n"
    "perceptual hash, see --near-threshold), images filed under more than one class (label\n"
    "conflicts), class imbalance, and images shared across train/val/test (for a\n"
    "train/val/test folder layout, MNIST's official split, or a run's splits.json via --splits).\n"
    "\n"
    "Writes OUT/inspect.json (everything), OUT/inspect.html (thumbnails of each duplicate group\n"
    "and conflict, self-contained) and prints a summary table.\n"
    "\n"
    "Examples:\n"
    "  imgclf inspect --data path/to/dataset --out runs/inspect\n"
    "  imgclf inspect --data path/to/dataset --splits runs/pokedex/splits.json\n"
    "  imgclf inspect --data mnist --no-near --json\n"
    "\n"
    "`imgclf train` runs the same checks before splitting (see its --dedup option)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from imgclf.analysis.doctor import HUGE_PIXELS, MIN_SIDE
    from imgclf.core.imageio import DEFAULT_MAX_PIXELS
    from imgclf.data.dedup import NEAR_THRESHOLD

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--data", required=True, help="folder of class folders, IDX folder, or mnist/fashion-mnist/digits"
    )
    p.add_argument(
        "--out",
        default="runs/inspect",
        help="folder for inspect.json and inspect.html (default: %(default)s)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the full JSON report on stdout instead of the table"
    )
    p.add_argument(
        "--splits",
        metavar="SPLITS_JSON",
        help="a run's splits.json: report images shared across its train/val/test lists",
    )
    p.add_argument(
        "--near-threshold",
        type=int,
        default=NEAR_THRESHOLD,
        help="max differing bits (of 256) for two images to count as near-duplicates (default: %(default)s; "
        "re-encoded/resized copies measure <= 16, distinct photos >= 42 on sign-language-digits)",
    )
    p.add_argument(
        "--no-near", action="store_true", help="skip near-duplicate detection (exact duplicates only)"
    )
    p.add_argument(
        "--min-side",
        type=int,
        default=MIN_SIDE,
        help="report images with a side below this (default: %(default)s px)",
    )
    p.add_argument(
        "--huge-pixels",
        type=int,
        default=HUGE_PIXELS,
        help="report images with more pixels than this (default: %(default)s)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse to decode images larger than this, as a decompression-bomb guard (default: %(default)s)",
    )
    p.add_argument("--workers", type=int, default=2, help="decoding threads (default: %(default)s)")
    p.add_argument("--no-html", action="store_true", help="do not write inspect.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 if any file is unreadable or any label conflict or leakage is found",
    )


def run(args: argparse.Namespace) -> int:
    from imgclf.analysis.doctor import inspect_source, summary_text, write_report
    from imgclf.core.files import display_path

    progress = not args.no_progress and sys.stderr.isatty()
    report = inspect_source(
        args.data,
        near=not args.no_near,
        threshold=args.near_threshold,
        splits_file=args.splits,
        workers=args.workers,
        max_pixels=args.max_pixels,
        min_side=args.min_side,
        huge_pixels=args.huge_pixels,
        progress=progress,
    )
    out = Path(args.out)
    try:
        write_report(report, out, html=not args.no_html, progress=progress)
    except OSError as e:
        print(
            f"imgclf inspect: error: cannot write the report to {out} ({e}); choose another --out",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(report.to_json(), end="")
    else:
        print(display_path(summary_text(report)))
        written = "inspect.json" + ("" if args.no_html else " and inspect.html")
        print(f"\nwrote {written} to {out}")
    return 1 if args.strict and report.problems else 0
