"""fp32 vs bf16 training: test accuracy and train time over paired seeds (issue 5).

For each row (DATASET/MODEL/RECIPE, as bench/accuracy.py) and each seed, trains once with
``precision=fp32`` and once with ``precision=bf16`` (autocast), same seed (same split, same
initial weights, same batches), one after the other, and reports per-seed test accuracy, the
mean difference bf16 - fp32, and the train-time ratio. Decides whether bf16 can be a default:
it may not lower accuracy (issue 5: "nothing in this issue may lower accuracy").

    python bench/precision.py --rows sign/smallervggnet/best mnist/lenet/best --seeds 1 2 3 --threads 1

Writes bench/results/precision.json (merged per row and seed, so runs can be split).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DATASETS, SHARED, load_avg, parse_rows, row_id  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "bench" / "results" / "precision.json"
PRECISIONS = ("fp32", "bf16")


def run_one(
    ds: str, model: str, recipe: str, seed: int, precision: str, threads: int | None, out: Path, **over: Any
) -> dict[str, Any]:
    import torch

    from imgclf.training.api import train
    from imgclf.training.recipes import config_from

    if threads:
        torch.set_num_threads(threads)
    given: dict[str, Any] = {
        "data": DATASETS[ds],
        "model": model,
        "recipe": recipe,
        "seed": seed,
        "precision": precision,
        "out": str(out),
        "tensorboard": False,
    }
    if threads:
        given["threads"] = threads
    given.update({k: v for k, v in over.items() if v is not None})
    la = load_avg()
    m = train(config_from(given), progress=False).metrics
    return {
        "test_accuracy": m["test_accuracy"],
        "test_size": m.get("test_size"),
        "train_time_s": m["train_time_s"],
        "load_avg_start": la,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def summarise(row: dict[str, dict[str, dict]]) -> dict[str, Any]:
    seeds = sorted(s for s, r in row.items() if all(p in r for p in PRECISIONS))
    if not seeds:
        return {}
    acc = {p: [row[s][p]["test_accuracy"] for s in seeds] for p in PRECISIONS}
    tim = {p: [row[s][p]["train_time_s"] for s in seeds] for p in PRECISIONS}
    diffs = [b - f for f, b in zip(acc["fp32"], acc["bf16"], strict=True)]
    return {
        "seeds": seeds,
        "fp32_mean": st.mean(acc["fp32"]),
        "bf16_mean": st.mean(acc["bf16"]),
        "diff_mean": st.mean(diffs),
        "diff_min": min(diffs),
        "diff_max": max(diffs),
        "time_ratio_fp32_over_bf16": st.mean(tim["fp32"]) / st.mean(tim["bf16"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["sign/smallervggnet/best", "mnist/lenet/best"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (for a quick check)")
    p.add_argument("--subset", type=int, help="train on at most N images (for a quick check)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    os.environ.setdefault("IMGCLF_DATA_DIR", str(SHARED))  # built-ins from the shared copy, offline
    results = json.loads(args.json.read_text()) if args.json.exists() else {"rows": {}}
    with tempfile.TemporaryDirectory(prefix="imgclf-precision-") as tmp:
        for ds, model, recipe in parse_rows(args.rows):
            rid = row_id(ds, model, recipe)
            row = results["rows"].setdefault(rid, {"runs": {}})
            for seed in args.seeds:
                for prec in PRECISIONS:
                    out = Path(tmp) / f"{rid.replace('/', '_')}_{seed}_{prec}"
                    r = run_one(
                        ds,
                        model,
                        recipe,
                        seed,
                        prec,
                        args.threads,
                        out,
                        epochs=args.epochs,
                        subset=args.subset,
                    )
                    row["runs"].setdefault(str(seed), {})[prec] = r
                    print(
                        f"[{rid} seed {seed} {prec}] test {100 * r['test_accuracy']:.2f} %  "
                        f"train {r['train_time_s']:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                    row["summary"] = summarise(row["runs"])
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\n{'row':<28}{'seeds':>8}{'fp32 %':>9}{'bf16 %':>9}{'bf16-fp32':>11}{'range':>17}{'speed-up':>10}"
    )
    for rid, row in results["rows"].items():
        s = row.get("summary") or {}
        if not s:
            continue
        rng = f"[{100 * s['diff_min']:+.2f}, {100 * s['diff_max']:+.2f}]"
        print(
            f"{rid:<28}{len(s['seeds']):>8}{100 * s['fp32_mean']:>9.2f}{100 * s['bf16_mean']:>9.2f}"
            f"{100 * s['diff_mean']:>+11.2f}{rng:>17}"
            f"{s['time_ratio_fp32_over_bf16']:>9.2f}x"
        )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
