"""imgclf demo"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "demo"
HELP = "offline end-to-end demo: train LeNet on scikit-learn's digits, evaluate, predict"
DESCRIPTION = (
    "Runs the whole pipeline on scikit-learn's bundled 8x8 digits (no download needed): "
    "train LeNet, evaluate on the held-out test split (report.html), write a few test images "
    "as PNG files and classify them with `imgclf predict`'s code path."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run folder (replaced if it holds an earlier demo)")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs (default: the auto recipe decides from the data)",
    )
    p.add_argument("--samples", type=int, default=8, help="test images to write and classify")


def run(args: argparse.Namespace) -> int:
    import shutil

    import numpy as np
    from PIL import Image

    from imgclf.data.sources import index_source
    from imgclf.runtime.bundle import load_bundle
    from imgclf.runtime.predict import predict_files
    from imgclf.training.api import train
    from imgclf.training.recipes import config_from

    out = Path(args.out)
    if (out / "model" / "model.json").exists():
        cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
        if cfg.get("data") != "digits":
            raise SystemExit(f"imgclf demo: {out} holds a run that is not the demo; choose another --out")
        shutil.rmtree(out)
    given = {"data": "digits", "model": "lenet", "out": str(out)}
    if args.epochs:
        given["epochs"] = args.epochs
    cfg = config_from(given)
    print(f"[1/3] training lenet on digits ({cfg.recipe} recipe, {cfg.epochs} epochs) -> {out}")
    res = train(cfg)
    bundle = load_bundle(res.bundle_dir)

    print("[2/3] evaluating on the held-out test split")
    try:
        from imgclf.analysis.evaluate import evaluate

        ev = evaluate(bundle, "digits", split="test", out=out / "eval", progress=False)
        acc = ev.metrics["accuracy"]
        print(f"      test accuracy {acc:.4f}; report: {out / 'eval' / 'report.html'}")
    except ImportError:
        print(f"      test accuracy {res.metrics.get('test_accuracy', float('nan')):.4f}")

    print("[3/3] predicting test images written as PNG files")
    index = index_source("digits")
    splits = json.loads((out / "splits.json").read_text())
    test_ids = splits["test"][: args.samples]
    pos = {item: i for i, item in enumerate(index.items)}
    sample_dir = out / "samples"
    sample_dir.mkdir(exist_ok=True)
    files = []
    for item in test_ids:
        i = pos[item]
        f = sample_dir / f"{item.replace(':', '_')}_true{index.classes[index.labels[i]]}.png"
        Image.fromarray(np.asarray(index.arrays[i])).resize((64, 64), Image.Resampling.NEAREST).save(f)
        files.append(str(f))
    right = 0
    for r in predict_files(bundle, files):
        truth = r.path.rsplit("_true", 1)[1].split(".")[0]
        right += r.label == truth
        print(f"      {Path(r.path).name}: {r.label}: {r.probability * 100:.2f}%")
    print(f"      {right}/{len(files)} correct. Try: imgclf predict {res.bundle_dir} {sample_dir}")
    return 0
