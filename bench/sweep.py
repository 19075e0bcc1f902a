"""Run many training variants side by side and tabulate their accuracy (recipe A/B tests).

Each experiment is ``imgclf train`` with a few config keys changed (same CLI path as users),
run as its own process, ``--jobs`` at a time; the table lists val/test accuracy (plain and
with TTA) and training time, and the JSON keeps every run's config and history.

    python bench/sweep.py experiments.json --jobs 2 --threads 1 --json bench/results/sweep.json

``experiments.json`` is a list of ``{"name": ..., "args": {config key: value, ...}}``; keys
shared by all go under ``{"common": {...}, "experiments": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_one(exp: dict[str, Any], runs: Path, extra: dict[str, Any], tta: bool) -> dict[str, Any]:
    out = runs / exp["name"]
    args = {**extra, **exp["args"], "out": str(out), "tensorboard": False}
    cfg_file = runs / f"{exp['name']}.json"
    cfg_file.write_text(json.dumps(args))
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "imgclf", "train", "--config", str(cfg_file), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    row: dict[str, Any] = {"name": exp["name"], "args": exp["args"], "wall_s": round(time.time() - t0, 1)}
    mfile = out / "metrics.json"
    if proc.returncode != 0 or not mfile.exists():
        row["error"] = (proc.stderr or proc.stdout)[-800:]
        return row
    m = json.loads(mfile.read_text())
    row.update({k: m.get(k) for k in ("val_accuracy", "test_accuracy", "train_time_s", "best_epoch")})
    row["config"] = json.loads((out / "config.json").read_text())
    if tta and m.get("test_size"):
        ev = subprocess.run(
            [sys.executable, "-m", "imgclf", "evaluate", str(out / "model"), "--data", args["data"]]
            + ["--tta", "--json", "--no-progress"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if ev.returncode == 0:
            em = json.loads(ev.stdout)
            row["test_accuracy_tta"], row["tta"] = em["accuracy"], em.get("tta")
    return row


def pct(v: Any) -> str:
    return f"{v * 100:.2f}" if isinstance(v, float) else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", type=Path, help="JSON file of experiments (see above)")
    p.add_argument("--jobs", type=int, default=1, help="experiments run at the same time")
    p.add_argument("--threads", type=int, default=None, help="torch threads per experiment")
    p.add_argument("--device", default=None, help="training device for every experiment (cpu, cuda, ...)")
    p.add_argument("--only", nargs="+", help="run only these experiment names")
    p.add_argument("--runs-dir", type=Path, help="run folders (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "sweep.json")
    p.add_argument("--no-tta", action="store_true", help="skip the TTA column")
    a = p.parse_args(argv)
    spec = json.loads(a.experiments.read_text())
    common = spec.get("common", {}) if isinstance(spec, dict) else {}
    exps = spec["experiments"] if isinstance(spec, dict) else spec
    if a.only:
        exps = [e for e in exps if e["name"] in a.only]
    extra = dict(common)
    if a.threads:
        extra["threads"] = a.threads
    if a.device:
        extra["device"] = a.device
    runs = a.runs_dir or Path(tempfile.mkdtemp(prefix="imgclf-sweep-"))
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows: list[dict[str, Any]] = []

    def dump() -> dict[str, Any]:
        # Rewritten after every run, so a sweep stopped by a time limit keeps what finished.
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "host_cpus": os.cpu_count(),
            "jobs": a.jobs,
            "common": extra,
            "total_s": round(time.time() - t0, 1),
            "rows": rows,
        }
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        return result

    with ThreadPoolExecutor(a.jobs) as ex:
        futs = [ex.submit(run_one, e, runs, extra, not a.no_tta) for e in exps]
        for f in as_completed(futs):
            r = f.result()
            rows.append(r)
            dump()
            print(
                f"{r['name']:<28} val {pct(r.get('val_accuracy')):>6}  test {pct(r.get('test_accuracy')):>6}"
                f"  tta {pct(r.get('test_accuracy_tta')):>6}  train {r.get('train_time_s', '-')} s"
                + (f"  ERROR {r['error'][-300:]}" if "error" in r else ""),
                flush=True,
            )
    result = dump()
    print(f"wrote {a.json} ({result['total_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
