"""Calibration: expected calibration error on the test split before and after temperature scaling.

Trains one model per suite dataset (bench/suite.py's fixed seeded splits) with the default
``calibrate: temperature``; the temperature is fitted on the validation split only, and the test
split reports ECE uncalibrated vs calibrated, and the accuracy with and without T (it cannot change:
the argmax is the same, checked here on every test image).

  python bench/calibration.py                      # sign, fashion, natural, hymeno (~30 min, 1 thread)
  python bench/calibration.py --datasets sign fashion --epochs 4

Writes bench/results/calibration.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import ROOT, cpu_facts, dataset_args  # noqa: E402

import imgclf  # noqa: E402
from imgclf.runtime.calibration import expected_calibration_error, uncalibrate  # noqa: E402

# A modest model a dataset: what a user's first run trains, not the best recipe (minutes each here).
MODELS: dict[str, dict[str, Any]] = {
    "sign": {"model": "resnet10s", "img_size": 48},
    "hymeno": {"model": "resnet10s", "img_size": 64},
    "natural": {"model": "resnet10s", "img_size": 30},
    "fashion": {"model": "lenet", "img_size": 28},
}


def run(ds: str, work: Path, epochs: int, threads: int, fashion_subset: int) -> dict[str, Any]:
    t0 = time.time()
    res = imgclf.train(
        **dataset_args(ds, work, fashion_subset),
        **MODELS[ds],
        epochs=epochs,
        threads=threads,
        tensorboard=False,
        out=str(work / ds),
        progress=False,
    )
    m = res.metrics
    bundle = imgclf.load(res.bundle_dir)
    ev = imgclf.evaluate(bundle, split="test")
    t = bundle.temperature
    raw = uncalibrate(ev.probs, t)
    same = bool((raw.argmax(1) == ev.probs.argmax(1)).all())
    return {
        "model": MODELS[ds]["model"],
        "img_size": MODELS[ds]["img_size"],
        "epochs_run": m["epochs_run"],
        "temperature": t,
        "val_images": m.get("val_size"),
        "test_images": len(ev.labels),
        "test_accuracy": float((ev.probs.argmax(1) == ev.labels).mean()),
        "test_accuracy_uncalibrated": float((raw.argmax(1) == ev.labels).mean()),
        "same_predictions": same,
        "test_ece_uncalibrated": expected_calibration_error(raw, ev.labels),
        "test_ece": expected_calibration_error(ev.probs, ev.labels),
        "train_time_s": m["train_time_s"],
        "wall_s": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["sign", "fashion", "natural", "hymeno"])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fashion-subset", type=int, default=12000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "calibration.json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgclf-calib-"))
    rows = {}
    try:
        for ds in a.datasets:
            rows[ds] = run(ds, work, a.epochs, a.threads, a.fashion_subset)
            print(f"{ds}: {rows[ds]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    old = json.loads(a.out.read_text())["rows"] if a.out.exists() else {}
    result = {
        "command": " ".join(["python", "bench/calibration.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "epochs": a.epochs,
        "rows": {**old, **rows},
        "cpu": cpu_facts(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| dataset | model | T | test acc (T / none) | test ECE uncalibrated | test ECE calibrated |")
    print("|---|---|---|---|---|---|")
    for ds, r in result["rows"].items():
        print(
            f"| {ds} | {r['model']} {r['img_size']} px | {r['temperature']:.3f} | "
            f"{100 * r['test_accuracy']:.2f} / {100 * r['test_accuracy_uncalibrated']:.2f} | "
            f"{r['test_ece_uncalibrated']:.4f} | {r['test_ece']:.4f} |"
        )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
