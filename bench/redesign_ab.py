"""This checkout against an older one (e.g. before the layered redesign), side by side in one run.

Accuracy: ``bench/accuracy.py --rows ROW --threads 1`` of both checkouts at the same time, one
core each, so both see the same machine. Speed: ``bench/train_speed.py --repeats 1`` of each
checkout, alternated ``--rounds`` times (old, new, old, new, ...), so drift hits both.
Each side runs its own bench scripts against its own package (PYTHONPATH=checkout).

  git worktree add /tmp/old <commit>
  python bench/redesign_ab.py --old /tmp/old            # ~15 min on 2 cores

Writes bench/results/redesign_ab.json and prints a table with new/old ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics as st
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    keep = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return f"{model}; {' '.join(keep)}"


def env_for(checkout: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(checkout), IMGCLF_SHARED=str(SHARED), PYTHONUNBUFFERED="1")
    env["IMGCLF_CACHE_DIR"] = tempfile.mkdtemp(prefix="imgclf-ab-cache-")  # both start cold
    return env


def accuracy(sides: dict[str, Path], row: str, work: Path) -> dict[str, dict]:
    procs = {}
    for name, checkout in sides.items():
        out = work / f"accuracy-{name}.json"
        cmd = [sys.executable, str(checkout / "bench" / "accuracy.py"), "--rows", row, "--threads", "1"]
        cmd += ["--json", str(out), "--no-progress", "--runs-dir", str(work / f"runs-{name}")]
        log = open(work / f"accuracy-{name}.log", "w")
        procs[name] = (
            subprocess.Popen(cmd, env=env_for(checkout), stdout=log, stderr=subprocess.STDOUT),
            out,
        )
    res = {}
    for name, (p, out) in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"{name}: accuracy run failed; see {work}/accuracy-{name}.log")
        res[name] = next(iter(json.loads(out.read_text())["rows"].values()))
    return res


def speed(sides: dict[str, Path], rounds: int, work: Path) -> dict[str, dict[str, list[float]]]:
    res: dict[str, dict[str, list[float]]] = {n: {} for n in sides}
    for r in range(rounds):
        for name, checkout in sides.items():
            out = work / f"speed-{name}-{r}.json"
            cmd = [
                sys.executable,
                str(checkout / "bench" / "train_speed.py"),
                "--repeats",
                "1",
                "--out",
                str(out),
            ]
            subprocess.run(cmd, env=env_for(checkout), check=True, capture_output=True)
            for model, m in json.loads(out.read_text())["models"].items():
                res[name].setdefault(model, []).append(m["pipeline_img_s"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="the older checkout (a git worktree)")
    ap.add_argument("--row", default="mnist/lenet/best", help="bench/accuracy.py row id")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the speed bench")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "redesign_ab.json")
    a = ap.parse_args()
    sides = {"old": a.old.resolve(), "new": ROOT}
    work = Path(tempfile.mkdtemp(prefix="imgclf-ab-"))
    t0 = time.time()
    result: dict = {"cpu": cpu_flags(), "date": time.strftime("%Y-%m-%d %H:%M"), "row": a.row}
    result["commits"] = {
        n: subprocess.run(
            ["git", "-C", str(p), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        for n, p in sides.items()
    }
    if not a.skip_accuracy:
        acc = accuracy(sides, a.row, work)
        result["accuracy"] = {
            n: {k: acc[n].get(k) for k in ("test_accuracy", "train_time_s", "epochs_run")} for n in acc
        }
    sp = speed(sides, a.rounds, work)
    result["speed_img_s"] = sp
    result["seconds"] = round(time.time() - t0)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"CPU: {result['cpu']}\ncommits: old {result['commits']['old']}, new {result['commits']['new']}\n")
    print(f"{'measure':<40}{'old':>12}{'new':>12}{'new/old':>10}")
    if "accuracy" in result:
        o, n = result["accuracy"]["old"], result["accuracy"]["new"]
        oa, na = 100 * o["test_accuracy"], 100 * n["test_accuracy"]
        print(f"{a.row + ' test accuracy %':<40}{oa:>12.2f}{na:>12.2f}{na / oa:>10.3f}")
        print(f"{a.row + ' train time s (1 core)':<40}{o['train_time_s']:>12.1f}{n['train_time_s']:>12.1f}"
              f"{n['train_time_s'] / o['train_time_s']:>10.3f}")  # fmt: skip
    for model in sp["new"]:
        o, n = st.median(sp["old"][model]), st.median(sp["new"][model])
        print(f"{model + ' pipeline img/s (median)':<40}{o:>12.0f}{n:>12.0f}{n / o:>10.3f}")
    print(f"\nwrote {a.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
