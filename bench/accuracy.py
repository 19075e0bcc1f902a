"""Accuracy bench: (dataset, model, recipe) -> wall time and test accuracy.

Each row trains with ``imgclf.training.trainer`` through the recipe (exactly as ``imgclf train --data D
--model M --recipe R`` would), then measures test accuracy plain and with test-time
augmentation (``imgclf.runtime.tta.predict_tta``). Results merge into bench/results/accuracy.json
(one entry per row id, so rows can be run one at a time) and ``--markdown`` writes the table.

    python bench/accuracy.py --list
    python bench/accuracy.py --rows mnist/lenet/best           # one row, full recipe
    python bench/accuracy.py --rows all                         # every row (hours on 2 cores)
    python bench/accuracy.py --rows mnist/lenet/best --epochs 3 --subset 10000   # quick, marked partial
    python bench/accuracy.py --markdown docs/ACCURACY.md        # table from the JSON only

Datasets: ``mnist`` and ``fashion-mnist`` (official 60k/10k split; 20 % of train held out for
validation) and ``sign`` = ``../shared/datasets/sign-language-digits`` (seeded 70/10/20
train/val/test split, near-duplicates grouped onto one side by imgclf.analysis.doctor), and the
multi-label ``colour-garment`` set built by bench/multilabel_data.py (its accuracy is exact match).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))
DEFAULT_JSON = ROOT / "bench" / "results" / "accuracy.json"

DATASETS = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "sign": str(SHARED / "sign-language-digits"),
    "colour-garment": "built by bench/multilabel_data.py into the runs folder",
}

# (dataset, model, recipe), in table order. The targets are noted in TARGETS.
ROWS: list[tuple[str, str, str]] = [
    ("mnist", "lenet", "tutorial"),
    ("mnist", "lenet", "best"),
    ("fashion-mnist", "lenet", "tutorial"),
    ("fashion-mnist", "lenet", "best"),
    ("fashion-mnist", "minivgg", "tutorial"),
    ("fashion-mnist", "minivgg", "best"),
    ("fashion-mnist", "resnet20", "best"),
    ("sign", "smallervggnet", "tutorial"),
    ("sign", "smallervggnet", "best"),
    # Multi-label (bench/multilabel.py): test accuracy is exact match; mAP and micro-F1 beside it.
    ("colour-garment", "resnet10s", "auto"),
]
TARGETS = {
    "mnist/lenet/tutorial": "98-99 % (tutorial)",
    "mnist/lenet/best": ">= 99.3 % in <= 5 min",
    "fashion-mnist/lenet/tutorial": "~90 % (tutorial)",
    "fashion-mnist/lenet/best": ">= 92.5 %",
    "fashion-mnist/minivgg/tutorial": "~94 % (tutorial)",
    "fashion-mnist/minivgg/best": ">= 94 %",
    "fashion-mnist/resnet20/best": ">= 94 %",
    "sign/smallervggnet/best": ">= 98 %",
}


def row_id(ds: str, model: str, recipe: str) -> str:
    return f"{ds}/{model}/{recipe}"


def parse_rows(spec: list[str]) -> list[tuple[str, str, str]]:
    if spec == ["all"]:
        return list(ROWS)
    out = []
    for s in spec:
        parts = s.split("/")
        if len(parts) != 3 or parts[0] not in DATASETS:
            raise SystemExit(
                f"bad row {s!r}: write DATASET/MODEL/RECIPE with DATASET in {sorted(DATASETS)}, "
                "e.g. mnist/lenet/best (see --list)"
            )
        out.append((parts[0], parts[1], parts[2]))
    return out


def load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def test_arrays(result: Any, data: str, pre: Any) -> tuple[np.ndarray, np.ndarray]:
    """The run's own test split (from splits.json), decoded with the bundle's preprocessing."""
    from imgclf.data import sources as D

    splits = json.loads((Path(result.run_dir) / "splits.json").read_text())
    index = D.index_source(data)
    pos = {index.relpath(it): i for i, it in enumerate(index.items)}
    idx = np.asarray([pos[r] for r in splits.get("test", [])], dtype=np.int64)
    dec = D.decode_items(index, idx, pre, progress=False)
    return dec.images, dec.labels


def run_multilabel_row(model: str, recipe: str, runs_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The colour-garment multi-label row: bench/multilabel.py's data, training and measures."""
    sys.path.insert(0, str(ROOT / "bench"))
    import multilabel
    from multilabel_data import build

    data = runs_dir / "colour_garment"
    if not data.exists():
        build(data, 200, 50, hold_out=["red_dress"], data_dir=SHARED)
    t0 = time.time()
    r = multilabel.run_model(
        model, data, runs_dir / f"colour-garment_{model}", overrides.get("epochs"), overrides.get("threads")
    )
    held = (r.get("held_out") or {}).get("red_dress", {})
    return {
        "id": row_id("colour-garment", model, recipe),
        "dataset": "colour-garment",
        "model": model,
        "recipe": recipe,
        "test_accuracy": r["exact_match"],
        "test_mAP": r["mAP"],
        "test_micro_f1": r["micro_f1"],
        "held_out_both_labels": held.get("both"),
        "test_size": r["test_images"],
        "epochs_run": r["epochs_run"],
        "train_time_s": r["train_time_s"],
        "wall_time_s": round(time.time() - t0, 1),
        "load_avg_start": r["load_avg_start"],
        "load_avg_end": r["load_avg_end"],
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime()),
        "run_dir": r["run_dir"],
    }


def run_row(
    ds: str, model: str, recipe: str, runs_dir: Path, overrides: dict[str, Any], tta: bool, progress: bool
) -> dict[str, Any]:
    import torch

    if ds == "colour-garment":
        return run_multilabel_row(model, recipe, runs_dir, overrides)

    from imgclf.runtime.bundle import load_bundle
    from imgclf.runtime.tta import auto_views, predict_tta
    from imgclf.training.api import train
    from imgclf.training.recipes import config_from

    rid = row_id(ds, model, recipe)
    out = runs_dir / rid.replace("/", "_")
    given = {"data": DATASETS[ds], "model": model, "recipe": recipe, "out": str(out), "tensorboard": False}
    given.update(overrides)
    cfg = config_from(given)
    print(f"[{rid}] training (load average {load_avg()})", file=sys.stderr, flush=True)
    la0 = load_avg()
    t0 = time.time()
    res = train(cfg, progress=progress)
    wall = time.time() - t0
    m = res.metrics
    row: dict[str, Any] = {
        "id": rid,
        "dataset": ds,
        "model": model,
        "recipe": recipe,
        "partial": bool(overrides),
        "overrides": overrides,
        "test_accuracy": m.get("test_accuracy"),
        "val_accuracy": m.get("val_accuracy"),
        "test_size": m.get("test_size"),
        "epochs_run": m.get("epochs_run"),
        "best_epoch": m.get("best_epoch"),
        "train_time_s": m.get("train_time_s"),
        "wall_time_s": round(wall, 1),
        "config": json.loads((Path(res.run_dir) / "config.json").read_text()),
        "load_avg_start": la0,
        "load_avg_end": load_avg(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime()),
    }
    if tta:
        bundle = load_bundle(res.bundle_dir)
        x, y = test_arrays(res, DATASETS[ds], bundle.pre)
        views = auto_views(bundle)
        probs = predict_tta(bundle, x, views)
        row["tta_views"] = views
        row["test_accuracy_tta"] = float((probs.argmax(1) == y).mean()) if len(y) else None
    row["run_dir"] = str(res.run_dir)
    return row


def read_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"rows": {}}


def pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def markdown(results: dict[str, Any]) -> str:
    """README-ready table, in ROWS order (then any extra rows)."""
    rows = results.get("rows", {})
    order = [row_id(*r) for r in ROWS]
    keys = [k for k in order if k in rows] + sorted(k for k in rows if k not in order)
    lines = [
        "| dataset | model | recipe | test acc % | with TTA % | epochs | train time | wall time "
        "| target | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in keys:
        r = rows[k]
        base = k.split("@")[0]
        note = (
            " (partial: " + ", ".join(f"{a}={b}" for a, b in r["overrides"].items()) + ")"
            if r["partial"]
            else ""
        )
        la = r.get("load_avg_start") or []
        target = TARGETS.get(base, "")
        if "test_mAP" in r:  # multi-label: exact match in the accuracy column, the rest here
            target = f"mAP {r['test_mAP']:.4f}, micro-F1 {r['test_micro_f1']:.4f} (multi-label)"
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['recipe']}{note} | {pct(r['test_accuracy'])} | "
            f"{pct(r.get('test_accuracy_tta'))} | {r['epochs_run']} | {r['train_time_s']:.0f} s | "
            f"{r['wall_time_s']:.0f} s | {target} | {la[0] if la else ''} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="bench/accuracy.py"
    )
    p.add_argument("--rows", nargs="+", default=None, help="DATASET/MODEL/RECIPE ids, or 'all' (see --list)")
    p.add_argument("--list", action="store_true", help="print the row ids and exit")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--markdown", type=Path, help="write the table (from the JSON) to this file and exit")
    p.add_argument("--runs-dir", type=Path, help="where run folders go (default: a temporary folder)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (row is marked partial)")
    p.add_argument("--subset", type=int, help="train on at most N images (row is marked partial)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-tta", action="store_true", help="skip the test-time-augmentation column")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.list:
        for r in ROWS:
            print(row_id(*r), "  target:", TARGETS.get(row_id(*r), "-"))
        return 0
    results = read_results(a.json)
    if a.markdown:
        table = markdown(results)
        text = a.markdown.read_text() if a.markdown.exists() else ""
        start, end = "<!-- table:start -->", "<!-- table:end -->"
        if start in text and end in text:  # refresh the table inside an annotated document
            head, rest = text.split(start, 1)
            text = head + start + "\n" + table + end + rest.split(end, 1)[1]
        else:
            text = table
        a.markdown.write_text(text)
        print(f"wrote {a.markdown}")
        return 0
    if not a.rows:
        p.error("give --rows (ids from --list, or all), or --markdown FILE")
    rows = parse_rows(a.rows)
    if not Path(DATASETS["sign"]).exists() and any(r[0] == "sign" for r in rows):
        raise SystemExit(f"{DATASETS['sign']}: not found; set IMGCLF_SHARED to the shared datasets folder")
    os.environ.setdefault("IMGCLF_DATA_DIR", str(SHARED))  # built-ins from the shared copy, offline
    overrides: dict[str, Any] = {}
    if a.epochs:
        overrides["epochs"] = a.epochs
    if a.subset:
        overrides["subset"] = a.subset
    if a.threads:
        overrides["threads"] = a.threads
    runs_dir = a.runs_dir or Path(tempfile.mkdtemp(prefix="imgclf-bench-"))
    for ds, model, recipe in rows:
        ov = dict(overrides)
        partial = {k: v for k, v in ov.items() if k != "threads"}
        row = run_row(ds, model, recipe, runs_dir, ov, tta=not a.no_tta, progress=not a.no_progress)
        row["partial"] = bool(partial)
        row["overrides"] = partial
        key = row["id"] + ("@" + ",".join(f"{k}={v}" for k, v in partial.items()) if partial else "")
        results.setdefault("rows", {})[key] = row
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1) + "\n")  # after every row: long runs keep progress
        print(
            f"[{key}] test {pct(row['test_accuracy'])} %  tta {pct(row.get('test_accuracy_tta'))} %  "
            f"train {row['train_time_s']} s  wall {row['wall_time_s']} s",
            flush=True,
        )
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
