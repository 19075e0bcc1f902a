"""imgclf evaluate"""

from __future__ import annotations

import argparse
import json
import sys

from imgclf.commands import add_tta_argument

NAME = "evaluate"
HELP = "measure a bundle on a dataset: metrics, confusion matrix, report.html"
DESCRIPTION = (
    "Evaluate a bundle on a folder or built-in dataset. Writes metrics.json,\n"
    "classification_report.txt, confusion.png, misclassified.png, reliability.png,\n"
    "predictions.csv and a self-contained report.html (no network needed) to --out.\n\n"
    "Which images: built-in datasets use their official test split; a folder uses the test\n"
    "(else validation) files recorded in the training run's splits.json, or all files when no\n"
    "split was recorded. --split chooses explicitly. Unreadable files are listed in the report\n"
    "and the rest are evaluated. Metrics: accuracy, top-k, macro/weighted P/R/F1, log loss and\n"
    "expected calibration error (15 equal-width confidence bins).\n\n"
    "--bias adds a colour-bias probe: accuracy again on greyscale and hue-rotated copies.\n\n"
    "Examples:\n"
    "  imgclf evaluate runs/mnist --data mnist --out eval/mnist\n"
    "  imgclf evaluate runs/pokedex --data dataset --bias --out eval/pokedex --json"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("bundle", help="bundle folder (a run's model/ folder, or the run folder)")
    p.add_argument(
        "--data", required=True, help="folder of class folders, IDX folder, or mnist/fashion-mnist/digits"
    )
    p.add_argument(
        "--split",
        choices=["test", "val", "all"],
        default=None,
        help="which images (default: official/recorded test split, else recorded val, else all)",
    )
    p.add_argument("--out", default=None, help="folder for the report files (default: print metrics only)")
    p.add_argument(
        "--bias", action="store_true", help="also measure accuracy on greyscale and hue-shifted images"
    )
    p.add_argument("--json", action="store_true", help="print metrics.json to stdout")
    p.add_argument("--top-k", type=int, default=5, help="k for top-k accuracy (capped at classes - 1)")
    p.add_argument("--limit", type=int, default=None, help="evaluate a stratified sample of at most N images")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_tta_argument(p)


def run(args: argparse.Namespace) -> int:
    from imgclf.analysis.evaluate import evaluate, write_evaluation
    from imgclf.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    res = evaluate(
        bundle,
        args.data,
        split=args.split,
        bias=args.bias,
        limit=args.limit,
        top_k=args.top_k,
        tta=args.tta,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    if args.out is not None:
        write_evaluation(res, args.out)
    m = res.metrics
    for f in m["failed_files"]:
        print(f"imgclf evaluate: skipped {f['file']}: {f['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"evaluated {m['n_images']} images ({m['selection']})")
    if m.get("task") == "multi-label":
        print(
            f"mAP {m['mAP']:.4f}, micro F1 {m['micro_f1']:.4f}, macro F1 {m['macro_f1']:.4f}, "
            f"exact match {m['accuracy'] * 100:.2f}%, Hamming loss {m['hamming_loss']:.4f}"
        )
        if res.out_dir is not None:
            print(f"report: {res.out_dir / 'report.html'}")
        return 0
    line = f"accuracy {m['accuracy'] * 100:.2f}%" + (f" (TTA: {m['tta']})" if "tta" in m else "")
    if "top_k_accuracy" in m:
        line += f", top-{m['top_k']} {m['top_k_accuracy'] * 100:.2f}%"
    line += f", macro F1 {m['f1_macro']:.4f}, log loss {m['log_loss']:.4f}, ECE {m['ece']:.4f}"
    print(line)
    if "bias" in m:
        print("colour bias: " + m["bias"]["verdict"])
    if res.out_dir is not None:
        print(f"report: {res.out_dir / 'report.html'}")
    return 0
