"""What test-time augmentation buys on finished runs: each run's own test split scored with one
view and with each TTA view set (``imgclf evaluate RUN --split test --tta SET``), side by side.

  python bench/tta.py RUN_DIR [RUN_DIR ...] [--out bench/results/tta.json]
  python bench/tta.py --table

A run dir is a training run's folder (its splits.json names the test files). Rows are keyed by
the run's dataset folder and its name; the table gives each set's accuracy and its gain over one
view, and for each dataset the mean over its runs. ``auto`` is the set the bundle's training
implies (flips only if it trained with flips, shifts if it trained with shifts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

import imgclf  # noqa: E402

SETS = ("identity", "flip", "shift", "flip-shift", "auto")


def score(run_dir: Path) -> dict[str, Any]:
    """Test accuracy of ``run_dir``'s bundle on its test split under each view set in SETS."""
    row: dict[str, Any] = {"run_dir": str(run_dir), "cpu": suite.cpu_tag()}
    row["date"] = time.strftime("%Y-%m-%d %H:%M")
    bundle = imgclf.load(str(run_dir))  # once: every set scores the same bundle
    for name in SETS:
        t0 = time.time()
        res = imgclf.evaluate(bundle, split="test", tta=None if name == "identity" else name)
        row[name] = round(float(res.metrics["accuracy"]), 6)
        row[f"{name}_s"] = round(time.time() - t0, 1)
        if name == "auto":
            row["auto_views"] = res.metrics.get("tta", "identity")
        row["test_size"] = len(res.correct)
    return row


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = "| run | test images | one view | " + " | ".join(SETS[1:]) + " |"
    lines = [head, "|" + "---|" * (len(SETS) + 2)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for key, r in sorted(rows.items()):
        groups.setdefault(key.split("/")[0], []).append(r)
        gains = [f"{r[s] * 100:.2f} ({(r[s] - r['identity']) * 100:+.2f})" for s in SETS[1:]]
        gains[-1] += f" [{r['auto_views']}]"
        lines.append(f"| {key} | {r['test_size']} | {r['identity'] * 100:.2f} | " + " | ".join(gains) + " |")
    for ds, rs in groups.items():
        if len(rs) > 1:
            mean = {s: sum(r[s] for r in rs) / len(rs) for s in SETS}
            gains = [f"{mean[s] * 100:.2f} ({(mean[s] - mean['identity']) * 100:+.2f})" for s in SETS[1:]]
            one = f"{mean['identity'] * 100:.2f}"
            lines.append(f"| {ds}, mean of {len(rs)} | | {one} | " + " | ".join(gains) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, help="training run folders (each with splits.json)")
    ap.add_argument("--out", type=Path, default=suite.ROOT / "bench" / "results" / "tta.json")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    a = ap.parse_args()
    result = json.loads(a.out.read_text()) if a.out.exists() else {"rows": {}}
    if not a.table:
        named = [(f"{r.parent.name}/{r.name}", r) for r in a.runs]
        for key, run in named:
            if not (run / "splits.json").exists():
                sys.exit(f"{run}: not a training run folder (no splits.json); pass the run's own folder")
            result["rows"][key] = score(run)
            print(key, {s: result["rows"][key][s] for s in SETS}, flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
