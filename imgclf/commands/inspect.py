"""imgclf inspect"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

NAME = "inspect"
HELP = "check a dataset: unreadable files, duplicates, label conflicts, leakage, imbalance, label errors"
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
    "`imgclf train` runs the same checks before splitting (see its --dedup option).\n"
    "\n"
    "Label errors (--labels): trains --kfold small models, each on all but one fold, so every\n"
    "image gets class probabilities from a model that never saw it; confident learning\n"
    "(cleanlab) then flags the images whose given label those probabilities contradict, worst\n"
    "first, each with a suggested class (inspect.json `label_issues`: path, given, suggested,\n"
    "score = held-out probability of the given label). --fix-to DIR writes a copy of a folder\n"
    "dataset (hard links) with the flagged images moved to their suggested class; the source is\n"
    "never modified.\n"
    "  imgclf inspect --data path/to/dataset --labels --out runs/inspect\n"
    "  imgclf inspect --data path/to/dataset --labels --kfold 5 --fix-to path/to/relabelled"
)


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} is below {low}")
        return v

    parse.__name__ = "int"
    return parse


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
    p.add_argument(
        "--multi-label",
        action="store_true",
        help="label sets from folder names (--label-sep) or a labels file: adds label counts, "
        "co-occurrence, labels with too few images, images with empty or contradictory label sets",
    )
    p.add_argument("--label-sep", default="_", help="--multi-label folders: separator (default: %(default)s)")
    p.add_argument("--no-html", action="store_true", help="do not write inspect.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 if any file is unreadable or any label conflict or leakage is found",
    )
    _add_label_arguments(p.add_argument_group("label errors (--labels)"))


def _add_label_arguments(g: argparse._ArgumentGroup) -> None:
    from imgclf.training.kfold import DEFAULTS, MIN_STEPS

    g.add_argument(
        "--labels",
        action="store_true",
        help="find likely mislabelled images by K-fold out-of-fold probabilities and cleanlab",
    )
    g.add_argument(
        "--kfold",
        type=_int_at_least(2),
        default=5,
        metavar="K",
        help="folds (models trained) for --labels (default: %(default)s)",
    )
    g.add_argument(
        "--fix-to",
        metavar="DIR",
        help="with --labels: write a copy of the (folder) dataset with the flagged images moved to their "
        "suggested class (hard links; DIR must be new or empty and outside the source)",
    )
    g.add_argument(
        "--label-model",
        metavar="NAME",
        help=f"model trained per fold (default: {DEFAULTS['model']}; see `imgclf models`)",
    )
    g.add_argument(
        "--label-epochs",
        type=_int_at_least(1),
        metavar="N",
        help=f"epochs per fold (default: {DEFAULTS['epochs']}; more on small sets: {MIN_STEPS}+ steps)",
    )
    g.add_argument(
        "--label-size",
        type=_int_at_least(4),
        metavar="PX",
        help=f"input size of the fold models (default: {DEFAULTS['img_size']} for the default model, "
        "else the model's own)",
    )
    g.add_argument(
        "--label-seed", type=int, default=0, metavar="N", help="seed of the folds and models (default: 0)"
    )
    g.add_argument(
        "--threads",
        type=_int_at_least(1),
        help="PyTorch compute threads for --labels (default: all cores)",
    )


def run(args: argparse.Namespace) -> int:
    from imgclf.analysis.doctor import inspect_source, summary_text, write_report
    from imgclf.core.files import display_path

    progress = not args.no_progress and sys.stderr.isatty()
    if args.labels and args.multi_label:
        print("imgclf inspect: error: --labels checks single-label data; drop --multi-label", file=sys.stderr)
        return 2
    if args.fix_to and not args.labels:
        print("imgclf inspect: error: --fix-to needs --labels", file=sys.stderr)
        return 2
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
        multi_label=args.multi_label,
        label_sep=args.label_sep,
    )
    if args.labels:
        report.labels = label_check(
            report,
            folds=args.kfold,
            seed=args.label_seed,
            model=args.label_model,
            img_size=args.label_size,
            epochs=args.label_epochs,
            threads=args.threads,
            fix_to=args.fix_to,
            workers=args.workers,
            max_pixels=args.max_pixels,
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
    fixed = None
    if args.fix_to:
        from imgclf.analysis.labels import relabelled_copy

        assert report.index is not None and report.labels is not None
        fixed = relabelled_copy(report.index.root, report.index.items, report.labels, args.fix_to)
    if args.json:
        print(report.to_json(), end="")
    else:
        print(display_path(summary_text(report)))
        written = "inspect.json" + ("" if args.no_html else " and inspect.html")
        print(f"\nwrote {written} to {out}")
        if fixed is not None:
            print(f"wrote a copy with {len(report.labels.issues)} image(s) relabelled to {fixed}")
    return 1 if args.strict and report.problems else 0


def label_check(
    report: Any,
    *,
    folds: int = 5,
    seed: int = 0,
    model: str | None = None,
    img_size: int | None = None,
    epochs: int | None = None,
    threads: int | None = None,
    fix_to: str | Path | None = None,
    workers: int | None = None,
    max_pixels: int | None = None,
    progress: bool = False,
) -> Any:
    """K-fold out-of-fold probabilities (training) ranked by cleanlab (analysis): a LabelReport.

    ``report`` is the doctor's (:func:`imgclf.analysis.doctor.inspect_source`); its unreadable
    files are left out. ``fix_to`` is only checked here (before any model trains). ``model``,
    ``img_size``, ``epochs``, ``workers``, ``max_pixels``: the fold models' training keys (None:
    :data:`imgclf.training.kfold.DEFAULTS` / the training default).
    """
    from imgclf.analysis.labels import check_fix_target, find_label_issues
    from imgclf.core.errors import DataError
    from imgclf.training.kfold import out_of_fold_probs

    index = report.index
    if report.label_sets is not None:
        raise DataError("the label check (--labels) is single-label; drop --multi-label")
    if fix_to:
        if index.kind != "folder":
            raise DataError(f"--fix-to: {index.name} is a built-in dataset; --fix-to copies image folders")
        check_fix_target(index.root, fix_to)  # before the models train, not after
    # unreadable files are left out (the doctor lists them)
    bad = {e.path for e in report.unreadable}
    keep = [i for i, it in enumerate(index.items) if index.relpath(it) not in bad]
    oof = out_of_fold_probs(
        index,
        folds=folds,
        subset=keep,
        seed=seed,
        progress=progress,
        threads=threads,
        model=model,
        img_size=img_size,
        epochs=epochs,
        workers=workers,
        max_pixels=max_pixels,
    )
    pos = {it: i for i, it in enumerate(index.items)}
    return find_label_issues(
        oof.probs,
        oof.labels,
        oof.classes,
        [index.relpath(it) for it in oof.items],
        indices=[pos[it] for it in oof.items],
        fold_accuracy=oof.fold_accuracy,
        seconds=oof.seconds,
        settings=oof.settings,
    )
