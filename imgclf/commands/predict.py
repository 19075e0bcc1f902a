"""imgclf predict"""

from __future__ import annotations

import argparse
import json
import sys

NAME = "predict"
HELP = "classify image files, folders or globs with a bundle"
DESCRIPTION = (
    "Classify images. Prints `path: label: 99.61%` per image, or one JSON object per line "
    "with --json. Unreadable files are reported on stderr; the exit code is 1 if any failed."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder (a run's model/ folder, or the run folder)")
    p.add_argument("paths", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--top-k", type=int, default=5, help="how many classes to list per image")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int, default=64, help="images per inference batch")


def run(args: argparse.Namespace) -> int:
    from ..bundle import load_bundle
    from ..predict import expand_paths, predict_files

    bundle = load_bundle(args.bundle)
    files, missing = expand_paths(args.paths)
    failed = 0
    for m in missing:
        print(f"imgclf predict: {m}: no such file, folder or matching glob", file=sys.stderr)
        failed += 1
    for r in predict_files(bundle, files, top_k=args.top_k, batch_size=args.batch_size):
        if r.error:
            failed += 1
            print(f"imgclf predict: {r.error}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(r.to_dict()), flush=True)
        else:
            print(f"{r.path}: {r.label}: {r.probability * 100:.2f}%", flush=True)
    return 1 if failed else 0
