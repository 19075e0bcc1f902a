"""imgclf calibrate"""

from __future__ import annotations

import argparse
import json
import sys

NAME = "calibrate"
HELP = "refit a bundle's probability calibration (temperature scaling) on other data"
DESCRIPTION = (
    "Training already fits a temperature on the validation split (train --calibrate temperature):\n"
    "the logits are divided by T before the softmax in predict, evaluate, serve and every export,\n"
    "so probabilities match how often the model is right; the predicted class never changes.\n"
    "Use this command to refit T on other labelled data, e.g. images from where the model is\n"
    "deployed. It rewrites model.json's 'calibration' block (the weights stay as they are) and\n"
    "prints the expected calibration error before and after. Exports made earlier keep their old T:\n"
    "export again.\n\n"
    "Which images: by default the run's recorded validation split when --data is the training data,\n"
    "else every image of --data. Never calibrate on the test split you report.\n\n"
    "Examples:\n"
    "  imgclf calibrate runs/pokedex --data dataset\n"
    "  imgclf calibrate runs/pokedex --data field_photos/ --split all --json"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("bundle", help="bundle folder (a run's model/ folder, or the run folder)")
    p.add_argument(
        "--data", required=True, help="folder of class folders, IDX folder, or mnist/fashion-mnist/digits"
    )
    p.add_argument(
        "--split",
        choices=["val", "test", "all"],
        default=None,
        help="which images (default: the recorded validation split of the training data, else all)",
    )
    p.add_argument("--dry-run", action="store_true", help="measure and print, but do not rewrite model.json")
    p.add_argument("--json", action="store_true", help="print the new calibration record as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from imgclf.analysis.evaluate import recalibrate
    from imgclf.runtime.bundle import load_bundle, update_meta

    bundle = load_bundle(args.bundle)
    old = bundle.temperature
    rec = recalibrate(
        bundle, args.data, split=args.split, progress=not args.no_progress and sys.stderr.isatty()
    )
    if not args.dry_run:
        update_meta(bundle, calibration=rec)
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    kept = "" if rec["temperature"] != 1.0 or rec["ece"] < rec["ece_uncalibrated"] else " (no gain: T=1 kept)"
    print(
        f"temperature {old:.3f} -> {rec['temperature']:.3f}{kept} on {rec['n_images']} images of "
        f"{rec['fit_on']}: ECE {rec['ece_uncalibrated']:.4f} uncalibrated, {rec['ece']:.4f} calibrated"
    )
    print("dry run: model.json unchanged" if args.dry_run else f"updated {bundle.path / 'model.json'}")
    return 0
