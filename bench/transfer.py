"""Transfer offline: a backbone trained on natural-images, fine-tuned on hymenoptera, vs from scratch.

Both hymenoptera runs use the auto recipe on the suite's split (bench/suite.py: train as given,
val halved into val/test, seeded); the fine-tuned one adds ``init_weights`` (the auto recipe
then trains the new head alone first and uses per-layer rates from lr/100 to lr).

  python bench/transfer.py                          # trains the natural-images backbone first
  python bench/transfer.py --backbone runs/natural/model --threads 1
  python bench/transfer.py --backbone runs/natural/model --img-size 64 --out bench/results/transfer-64.json

Writes bench/results/transfer.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402  (the suite's datasets, splits and CPU facts)

import imgclf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", help="a bundle trained on natural-images (default: train one, auto recipe)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=42, help="hymenoptera's training seed (its split is fixed)")
    ap.add_argument(
        "--img-size", type=int, default=None, help="hymenoptera's size for both runs (default: auto's choice)"
    )
    ap.add_argument("--out", type=Path, default=suite.ROOT / "bench" / "results" / "transfer.json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgclf-transfer-"))
    keys = {"tensorboard": False, **({"threads": a.threads} if a.threads else {})}
    hym_keys = {"img_size": a.img_size} if a.img_size else {}
    backbone = a.backbone
    rows: dict[str, dict] = {}
    if backbone is None:
        res = imgclf.train(**suite.dataset_args("natural", work, 0), **keys, out=str(work / "natural"))
        backbone = str(res.bundle_dir)
        rows["natural backbone"] = {
            "test_accuracy": res.metrics["test_accuracy"],
            "train_time_s": res.metrics["train_time_s"],
        }
    hym = suite.dataset_args("hymeno", work, 0, a.seed)
    for name, extra in (
        ("hymenoptera from scratch", {}),
        ("hymenoptera fine-tuned", {"init_weights": backbone}),
    ):
        t0, load0 = time.time(), os.getloadavg()
        res = imgclf.train(
            **hym, **keys, **hym_keys, **extra, out=str(work / name.replace(" ", "-")), progress=False
        )
        rows[name] = suite.run_row(
            res.run_dir, res.metrics, t0, load0, cfg_keys=("lr", "freeze_epochs", "layer_lr_min")
        )
        print(f"{name}: {rows[name]}", flush=True)
    gain = rows["hymenoptera fine-tuned"]["test_accuracy"] - rows["hymenoptera from scratch"]["test_accuracy"]
    result = {
        "backbone": backbone,
        "seed": a.seed,
        "rows": rows,
        "gain_points": round(100 * gain, 2),
        "cpu": suite.cpu_facts(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| run | test % | epochs | train s |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {100 * r['test_accuracy']:.2f} | {r.get('epochs_run', '')} "
            f"| {r['train_time_s']:.0f} |"
        )
    print(f"gain from the natural-images backbone: {100 * gain:+.2f} points; wrote {a.out}")


if __name__ == "__main__":
    main()
