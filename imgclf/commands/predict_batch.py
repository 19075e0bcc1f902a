"""imgclf predict-batch"""

from __future__ import annotations

import argparse
import json
import sys

NAME = "predict-batch"
HELP = "classify many images into a Parquet file (streaming, resumable; optionally on Ray)"
DESCRIPTION = (
    "Classify every image under FOLDER_OR_GLOB into one Parquet file with the columns\n"
    "path, path_bytes, label, probability, top_k (list of {label, probability}) and error\n"
    "(unreadable files). path is printable text (bytes of a name that are not UTF-8 shown as \\xNN);\n"
    "path_bytes is the name's raw bytes (os.fsdecode(path_bytes) opens the file).\n"
    "A multi-label bundle writes path, path_bytes, labels (list of the predicted labels, most\n"
    "probable first), one p_<label> probability column per label, and error; the labels and\n"
    "their thresholds are in the file's schema metadata (imgclf.classes, imgclf.thresholds).\n"
    "Work is done in chunks written to OUT.parts/ and merged into OUT at the end, so memory stays\n"
    "bounded; running the same command again skips the paths already predicted in OUT (resume)\n"
    "and tries the files that failed before again.\n"
    "Without --workers this process does the work; with --workers N, N Ray Data actors do it\n"
    "(pip install 'imgclf[ray]'; --address joins a running cluster). Examples:\n"
    "  imgclf predict-batch runs/mnist --data 'images/**/*.png' --out preds.parquet\n"
    "  imgclf predict-batch runs/mnist --data /data/photos --out preds.parquet --workers 8 --address auto"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("bundle", help="bundle folder (a run's model/ folder, or the run folder)")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        metavar="FOLDER_OR_GLOB",
        help="image folder (recursive), file or glob (quote it); repeat for more",
    )
    p.add_argument("--out", required=True, help="Parquet file to write (and resume)")
    p.add_argument(
        "--workers", type=int, default=None, help="run on Ray Data with this many actors (default: no Ray)"
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to use: auto or ray://HEAD:10001 (default: a local one when --workers is set)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=5,
        help="classes listed per image in top_k (default: 5; single-label bundles)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per inference batch (default: 256)")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=8192,
        help="images per part file; at most one chunk is redone after a crash (default: 8192)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from imgclf.core.files import display_path
    from imgclf.data.sources import DataError
    from imgclf.serving.batch import predict_dataset

    if args.workers is not None and args.workers < 1:
        raise DataError("--workers must be >= 1 (or leave it out to predict in this process)")
    if args.batch_size < 1 or args.chunk_size < 1 or args.top_k < 1:
        raise DataError("--batch-size, --chunk-size and --top-k must be >= 1")
    summary = predict_dataset(
        args.bundle,
        args.data,
        args.out,
        workers=args.workers,
        address=args.address,
        top_k=args.top_k,
        batch_size=args.batch_size,
        chunk=args.chunk_size,
        progress=False if args.no_progress else None,
    )
    print(json.dumps(summary.to_dict(), indent=2))
    for path, why in summary.skipped[:10]:
        print(f"imgclf predict-batch: skipped {display_path(path)}: {why}", file=sys.stderr)
    if len(summary.skipped) > 10:
        print(f"imgclf predict-batch: ... and {len(summary.skipped) - 10} more skipped", file=sys.stderr)
    if summary.retried:
        print(
            f"imgclf predict-batch: tried again {summary.retried} file(s) that failed in an earlier run",
            file=sys.stderr,
        )
    if summary.failed:
        print(
            f"imgclf predict-batch: {summary.failed} unreadable file(s); their rows in {summary.out} "
            "have an error and no label",
            file=sys.stderr,
        )
    return 1 if summary.failed else 0
