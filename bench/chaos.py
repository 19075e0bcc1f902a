"""Kill -9 training at random moments, resume each time, and compare with an uninterrupted run.

One uninterrupted reference run, then ``--kills`` killed runs: each is started with
``imgclf train``, killed with SIGKILL at a random moment (before the first checkpoint too),
then continued with ``imgclf train --resume`` (killed again while kills remain) until it
finishes. Reported per run: kills survived, epochs lost (epochs the kill threw away), whether
the learning-rate trace equals the reference's, final test accuracy against the reference, and
whether every file in the run folder still reads (JSON, safetensors, the bundle). All runs use
one thread, so an interrupted run can match the reference exactly.

  python bench/chaos.py --kills 20            # ~10 min on 2 cores
  python bench/chaos.py --kills 3 --quick     # a minute

Writes bench/results/chaos.json and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))


def imgclf_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgclf", *args]


def train_args(out: Path, quick: bool) -> list[str]:
    data = (
        ["--data", "digits", "--epochs", "4"]
        if quick
        else ["--data", "mnist", "--subset", "6000", "--epochs", "6"]
    )
    return [
        "train",
        *data,
        "--model",
        "lenet",
        "--threads",
        "1",
        "--no-tensorboard",
        "--no-progress",
        "--out",
        str(out),
    ]


def lr_trace(run: Path) -> list[float]:
    with open(run / "history.csv") as f:
        return [float(r["lr"]) for r in csv.DictReader(f)]


def epochs_done(run: Path) -> int:
    try:
        from safetensors import safe_open

        with safe_open(str(run / "checkpoints" / "last.safetensors"), framework="pt") as f:
            return int(json.loads(f.metadata()["state"])["epoch"])
    except Exception:  # no checkpoint yet, or one being replaced: nothing completed that we can see
        return 0


def files_intact(run: Path) -> list[str]:
    """Names of files in the run folder that do not read back (empty list = all fine)."""
    from safetensors.torch import load_file

    import imgclf

    bad = []
    for p in run.rglob("*"):
        if not p.is_file() or "tensorboard" in p.parts:
            continue
        try:
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".safetensors":
                load_file(str(p))
            elif p.suffix == ".tmp":
                bad.append(f"{p.name} (stale temporary)")
        except Exception as e:
            bad.append(f"{p.relative_to(run)} ({type(e).__name__})")
    try:
        imgclf.load(run)
    except Exception as e:
        bad.append(f"bundle ({e})")
    return bad


def run_to_end(out: Path, quick: bool, kills: int, rng: random.Random, window: float, env: dict) -> dict:
    killed, kept = 0, []
    cmd = imgclf_cmd(*train_args(out, quick))
    while True:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if killed < kills:
            time.sleep(rng.uniform(0.5, window))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
                killed += 1
                kept.append(epochs_done(out))  # the resume point: only the epoch in flight is redone
                cmd = imgclf_cmd("train", "--resume", str(out), "--no-progress")
                continue
        if p.wait() != 0:
            return {"killed": killed, "finished": False}
        if (out / "model" / "model.json").exists():
            break
        cmd = imgclf_cmd("train", "--resume", str(out), "--no-progress")
    m = json.loads((out / "metrics.json").read_text())
    return {
        "killed": killed,
        "finished": True,
        "resumed_from_epochs": kept,
        "test_accuracy": m["test_accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="killed runs (each killed 1-3 times)")
    ap.add_argument("--quick", action="store_true", help="digits instead of an MNIST subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chaos.json")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="imgclf-chaos-"))
    env = dict(
        os.environ, IMGCLF_DATA_DIR=str(SHARED), IMGCLF_CACHE_DIR=str(work / "cache"), PYTHONPATH=str(ROOT)
    )
    t0 = time.time()
    subprocess.run(imgclf_cmd(*train_args(work / "ref", a.quick)), env=env, check=True, capture_output=True)
    ref_time = time.time() - t0
    ref_lr = lr_trace(work / "ref")
    ref_acc = json.loads((work / "ref" / "metrics.json").read_text())["test_accuracy"]
    rows = []
    for i in range(a.kills):
        out = work / f"k{i}"
        r = run_to_end(out, a.quick, rng.randint(1, 3), rng, ref_time * 0.9, env)
        if r["finished"]:
            r["lr_trace_identical"] = lr_trace(out) == ref_lr
            r["bad_files"] = files_intact(out)
        rows.append(r)
        print(
            f"run {i}: killed {r['killed']}x, finished {r['finished']}, "
            f"acc {r.get('test_accuracy', float('nan')):.4f} (ref {ref_acc:.4f}), "
            f"lr identical {r.get('lr_trace_identical')}, bad files {r.get('bad_files')}",
            flush=True,
        )
    done = [r for r in rows if r["finished"]]
    summary = {
        "runs": len(rows),
        "kills": sum(r["killed"] for r in rows),
        "unrecoverable_runs": len(rows) - len(done),
        "runs_with_corrupt_files": sum(bool(r["bad_files"]) for r in done),
        "lr_trace_identical": sum(r["lr_trace_identical"] for r in done),
        "reference_test_accuracy": ref_acc,
        "resumed_test_accuracy_min": min((r["test_accuracy"] for r in done), default=None),
        "resumed_test_accuracy_max": max((r["test_accuracy"] for r in done), default=None),
        "seconds": round(time.time() - t0),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"summary": summary, "runs": rows, "quick": a.quick}, indent=2) + "\n")
    cols = [
        "runs",
        "kills",
        "unrecoverable",
        "corrupt files",
        "lr trace identical",
        "test acc ref",
        "resumed",
    ]
    lo, hi = summary["resumed_test_accuracy_min"] or 0.0, summary["resumed_test_accuracy_max"] or 0.0
    vals = [
        summary["runs"],
        summary["kills"],
        summary["unrecoverable_runs"],
        summary["runs_with_corrupt_files"],
    ]
    vals += [f"{summary['lr_trace_identical']}/{len(done)}", f"{ref_acc:.4f}", f"{lo:.4f}-{hi:.4f}"]
    print(
        "\n| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|\n| " + " | ".join(map(str, vals)) + " |"
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
