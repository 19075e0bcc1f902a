"""imgclf predict"""

from __future__ import annotations

import argparse
import json
import sys

from imgclf.commands import add_tta_argument

NAME = "predict"
HELP = "classify image files, folders or globs with a bundle"
DESCRIPTION = (
    "Classify images. Prints `path: label: 99.61%` per image (multi-label bundles: `path: red 97.4%, "
    "dress 91.0%`, the labels past their thresholds), or one JSON object per line with --json "
    '(multi-label: "labels" and every label\'s "probabilities"). Unreadable files are reported on '
    "stderr; the exit code is 1 if any failed."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder (a run's model/ folder, or the run folder)")
    p.add_argument("paths", nargs="*", help="image files, folders (recursive) or glob patterns")
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="how many classes to list per image (default 5; with "
        "--annotate, also draw the runners-up on the image)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int, default=64, help="images per inference batch")
    p.add_argument(
        "--annotate",
        metavar="OUTDIR",
        help="save each image 400 px wide with 'label: 85.42%% (correct)' drawn on it; "
        "correct/incorrect only when the file name contains a class name",
    )
    p.add_argument("--csv", metavar="FILE", help="also write all results (top-k, errors) as CSV")
    p.add_argument(
        "--gallery",
        type=int,
        metavar="N",
        help="with --data: a PNG grid of N random test images titled 'Predicted: X, Actual: Y'",
    )
    p.add_argument("--data", help="dataset for --gallery (folder, IDX folder, mnist, fashion-mnist, digits)")
    p.add_argument("--gallery-out", default="gallery.png", help="where --gallery writes its PNG")
    p.add_argument("--seed", type=int, default=None, help="random seed for --gallery")
    add_tta_argument(p)


def run(args: argparse.Namespace) -> int:
    from imgclf.core.files import display_path
    from imgclf.runtime.bundle import load_bundle
    from imgclf.runtime.predict import expand_paths, predict_files, why_missing

    if args.gallery is not None and (not args.data or args.gallery < 1):
        print("imgclf predict: error: --gallery N needs N >= 1 and --data SOURCE", file=sys.stderr)
        return 2
    if not args.paths and args.gallery is None:
        print("imgclf predict: error: give image paths (or --gallery N --data SOURCE)", file=sys.stderr)
        return 2
    bundle = load_bundle(args.bundle)
    if args.gallery is not None:
        from pathlib import Path

        from imgclf.analysis.gallery import gallery

        png, correct, shown = gallery(bundle, args.data, args.gallery, seed=args.seed)
        Path(args.gallery_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.gallery_out).write_bytes(png)
        print(f"gallery: {correct}/{shown} correct -> {args.gallery_out}")
    top_k = 5 if args.top_k is None else args.top_k
    skipped: list[tuple[str, str]] = []
    files, missing = expand_paths(args.paths, skipped)
    failed = 0
    results = []
    for path, why in skipped:  # reported, not counted among the files that failed to predict
        print(f"imgclf predict: skipped {display_path(path)}: {why}", file=sys.stderr)
    for m in missing:
        print(f"imgclf predict: {display_path(m)}: {why_missing(m)}", file=sys.stderr)
        failed += 1
    for r in predict_files(bundle, files, top_k=top_k, batch_size=args.batch_size, tta=args.tta):
        results.append(r)
        if r.error:
            failed += 1
            print(f"imgclf predict: {display_path(r.error)}", file=sys.stderr)
            continue
        if args.annotate:
            from imgclf.analysis.gallery import write_annotated

            write_annotated(bundle, r, args.annotate, extra=0 if args.top_k is None else top_k - 1)
        if args.json:
            print(json.dumps(r.to_dict()), flush=True)
        elif r.labels is not None:
            shown = ", ".join(f"{c} {r.probabilities[c] * 100:.1f}%" for c in r.labels) or "no label"
            print(f"{display_path(r.path)}: {shown}", flush=True)
        else:
            tail = (
                f" (unknown: score {r.unknown['ood_score']:.4g} is past the threshold)"
                if r.is_unknown
                else ""
            )
            print(f"{display_path(r.path)}: {r.label}: {r.probability * 100:.2f}%{tail}", flush=True)
    if args.csv:
        from imgclf.runtime.predict import write_csv

        write_csv(results, args.csv, bundle.classes, top_k)
    return 1 if failed else 0
