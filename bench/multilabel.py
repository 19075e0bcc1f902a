"""Multi-label bench: tinted Fashion-MNIST garments (bench/multilabel_data.py), train, test, compose.

Builds ``{colour}_{garment}/`` folders (3 colours x 10 garments = 13 labels) with one combination
(default ``red_dress``) left out of training entirely, trains ``imgclf train --multi-label`` per
model, and reports on the test split: mAP, micro/macro F1, exact match, Hamming loss. The
compositional check predicts the held-out combination's images: how often both of its labels
are predicted (and each alone), although the model never saw them together.

    python bench/multilabel.py                       # default + lenet rows, 200 images a folder
    python bench/multilabel.py --models lenet --per-class 60 --epochs 4      # quick
Writes bench/results/multilabel.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))
sys.path.insert(0, str(ROOT / "bench"))


def cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have)
    except OSError:
        pass
    return "?"


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run_model(
    model: str | None, data: Path, out: Path, epochs: int | None, threads: int | None
) -> dict[str, Any]:
    from imgclf.analysis.evaluate import evaluate
    from imgclf.runtime.bundle import load_bundle
    from imgclf.runtime.multilabel import predicted_sets
    from imgclf.training.api import train
    from imgclf.training.recipes import config_from

    given: dict[str, Any] = {"data": str(data), "multi_label": True, "out": str(out), "tensorboard": False}
    if model:
        given["model"] = model
    if epochs:
        given["epochs"] = epochs
    if threads:
        given["threads"] = threads
    la0 = load_avg()
    t0 = time.time()
    res = train(config_from(given), progress=False)
    wall = time.time() - t0
    bundle = load_bundle(res.bundle_dir)
    ev = evaluate(bundle, data, split="test", progress=False).metrics
    row: dict[str, Any] = {
        "model": bundle.meta["architecture"]["name"],
        "asked_model": model or "(default)",
        "img_size": bundle.pre.size[0],
        "epochs_run": res.metrics["epochs_run"],
        "train_time_s": res.metrics["train_time_s"],
        "wall_time_s": round(wall, 1),
        "test_images": ev["n_images"],
        "mAP": ev["mAP"],
        "micro_f1": ev["micro_f1"],
        "macro_f1": ev["macro_f1"],
        "exact_match": ev["accuracy"],
        "hamming_loss": ev["hamming_loss"],
        "load_avg_start": la0,
        "load_avg_end": load_avg(),
    }
    held = data / "heldout"
    for combo in sorted(p.name for p in held.iterdir()) if held.exists() else []:
        files = sorted((held / combo).iterdir())
        x = np.stack([bundle.prepare(str(f)) for f in files])
        on = predicted_sets(bundle.predict_batch(x), bundle.thresholds)
        a, b = combo.split("_", 1)
        ia, ib = bundle.classes.index(a), bundle.classes.index(b)
        row.setdefault("held_out", {})[combo] = {
            "images": len(files),
            "both": float((on[:, ia] & on[:, ib]).mean()),
            a: float(on[:, ia].mean()),
            b: float(on[:, ib].mean()),
            "exact": float(((on.sum(axis=1) == 2) & on[:, ia] & on[:, ib]).mean()),
        }
    row["run_dir"] = str(res.run_dir)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | size | epochs | train s | mAP | micro F1 | macro F1 | exact match | Hamming "
        "| held-out: both labels |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        held = "; ".join(
            f"{k}: {v['both'] * 100:.1f} % ({k.split('_')[0]} {v[k.split('_')[0]] * 100:.0f} %, "
            f"{k.split('_', 1)[1]} {v[k.split('_', 1)[1]] * 100:.0f} %)"
            for k, v in (r.get("held_out") or {}).items()
        )
        lines.append(
            f"| {r['model']} ({r['asked_model']}) | {r['img_size']} | {r['epochs_run']} | "
            f"{r['train_time_s']:.0f} | "
            f"{r['mAP']:.4f} | {r['micro_f1']:.4f} | {r['macro_f1']:.4f} | {r['exact_match'] * 100:.2f} % | "
            f"{r['hamming_loss']:.4f} | {held or '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,lenet", help="comma list; 'default' = no --model")
    ap.add_argument("--per-class", type=int, default=200, help="training images per colour_garment folder")
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--hold-out", default="red_dress")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=None, help="folder for the dataset and runs (default: a temp dir)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "multilabel.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("IMGCLF_DATA_DIR", str(SHARED))
    from multilabel_data import build

    work = Path(a.work or tempfile.mkdtemp(prefix="imgclf-multilabel-"))
    data = work / "colour_garment"
    if not data.exists():
        counts = build(data, a.per_class, a.test_per_class, hold_out=a.hold_out.split(","), data_dir=SHARED)
        print(f"built {data}: {counts}", file=sys.stderr)
    rows = []
    for m in a.models.split(","):
        model = None if m == "default" else m
        print(f"[{m}] training (load {load_avg()})", file=sys.stderr, flush=True)
        # data/ holds train/ (training and validation) and test/; heldout/ is outside both.
        rows.append(run_model(model, data, work / f"run_{m}", a.epochs, a.threads) | {"data": str(data)})
    result = {
        "command": "python bench/multilabel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "dataset": {"per_class": a.per_class, "test_per_class": a.test_per_class, "hold_out": a.hold_out},
        "rows": rows,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
