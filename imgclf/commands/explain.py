"""imgclf explain"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "explain"
HELP = "Grad-CAM heatmaps: which pixels drove a prediction"
DESCRIPTION = (
    "Overlay a Grad-CAM heatmap (red = most influence) on each image for the predicted class,\n"
    "or for --class NAME. Writes <name>.gradcam.png (or <name>.gradcam-<class>.png) at the\n"
    "image's original size, beside the original or into --out.\n"
    "A multi-label bundle gets one map per predicted label (the most probable label when none\n"
    "reaches its threshold), each from that label's own logit, written as\n"
    "<name>.gradcam-<label>.png; --label NAME draws only that label's.\n\n"
    "Example:\n  imgclf explain runs/pokedex examples/charmander_counter.png --out explained/"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("bundle", help="bundle folder (a run's model/ folder, or the run folder)")
    p.add_argument("images", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--out", default=None, help="output folder (default: beside each original)")
    p.add_argument(
        "--class",
        "--label",
        dest="class_name",
        default=None,
        help="explain this class (multi-label: this label) instead of the predicted one(s)",
    )
    p.add_argument("--alpha", type=float, default=0.45, help="heatmap opacity, 0-1")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from imgclf.analysis.explain import UnknownClassError, class_index_of, explain_file, explain_labels
    from imgclf.core.imageio import ImageDecodeError
    from imgclf.runtime.bundle import load_bundle
    from imgclf.runtime.predict import expand_paths, why_missing

    if not 0.0 <= args.alpha <= 1.0:
        print("imgclf explain: error: --alpha must be between 0 and 1", file=sys.stderr)
        return 2
    bundle = load_bundle(args.bundle)
    if args.class_name is not None:
        try:
            class_index_of(bundle, args.class_name)
        except UnknownClassError as e:
            print(f"imgclf explain: error: {e}", file=sys.stderr)
            return 2
    files, missing = expand_paths(args.images)
    failed = len(missing)
    for m in missing:
        print(f"imgclf explain: {m}: {why_missing(m)}", file=sys.stderr)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".gradcam.png" if args.class_name is None else f".gradcam-{_safe(args.class_name)}.png"
    for f in tqdm(files, desc="explain", disable=len(files) < 5 or not sys.stderr.isatty(), leave=False):
        try:
            if bundle.multi_label:
                maps = explain_labels(bundle, f, args.class_name, args.alpha)
            else:
                maps = [explain_file(bundle, f, args.class_name, args.alpha)]
        except ImageDecodeError as e:
            failed += 1
            print(f"imgclf explain: {e}", file=sys.stderr)
            continue
        for png, label, prob in maps:
            # Several maps per image for multi-label: the file name always says which label.
            name = f".gradcam-{_safe(label)}.png" if bundle.multi_label else suffix
            dest = (out_dir or Path(f).parent) / (Path(f).stem + name)
            dest.write_bytes(png)
            print(f"{f}: {label}: {prob * 100:.2f}% -> {dest}", flush=True)
    return 1 if failed else 0
