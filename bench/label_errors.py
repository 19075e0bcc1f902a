"""How well does ``imgclf inspect --labels`` find planted label errors, and how long does it take?

Flips a seeded ``--noise`` fraction (default 5 %) of a dataset's labels, each to another random
class, in memory (the shared data is never written), runs the label finder
(:func:`imgclf.training.kfold.out_of_fold_probs` + :func:`imgclf.analysis.labels.find_label_issues`,
exactly what the command runs) and reports the precision and recall of the flipped set among

* the top N ranked images (N = the number flipped; there precision = recall), and
* the set cleanlab flags,

with the wall time. Prints a table and merges its rows into ``bench/results/label_errors.json``.

    python bench/label_errors.py                          # Sign Language Digits and natural-images
    python bench/label_errors.py --datasets sign --model minivgg --img-size 32 --epochs 6
    python bench/label_errors.py --datasets natural --subset natural=2000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from suite import cpu_facts  # noqa: E402

SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))
OUT = ROOT / "bench" / "results" / "label_errors.json"


def flip_labels(labels: np.ndarray, k: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped indices): ``frac`` of the items, each moved to another random class."""
    rng = np.random.default_rng(seed)
    n_flip = int(round(frac * len(labels)))
    flipped = np.sort(rng.choice(len(labels), n_flip, replace=False))
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, k, n_flip)) % k  # never the true class
    return noisy, flipped


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from imgclf.analysis.labels import find_label_issues, quality_scores
    from imgclf.data import sources as D
    from imgclf.training.kfold import out_of_fold_probs

    os.environ.setdefault("IMGCLF_DATA_DIR", str(SHARED))
    spec = {
        "sign": str(SHARED / "sign-language-digits"),
        "natural": str(SHARED / "natural-images"),
        "fashion": "fashion-mnist",
    }[name]
    index = D.index_source(spec)
    pool = np.flatnonzero(index.split == "train") if name == "fashion" else np.arange(len(index))
    n = args.subset.get(name)
    subset = pool[D.stratified_subset(index.labels[pool], n, seed=args.seed)] if n else pool
    true = index.labels[subset]
    noisy, flipped = flip_labels(true, len(index.classes), args.noise, args.seed)
    overrides = {"model": args.model, "img_size": args.img_size, "epochs": args.epochs}
    t0 = time.perf_counter()
    oof = out_of_fold_probs(
        index,
        folds=args.kfold,
        subset=subset,
        labels=noisy,
        seed=args.seed,
        progress=sys.stderr.isatty(),
        threads=args.threads,
        **overrides,
    )
    pos = {it: j for j, it in enumerate(index.items[i] for i in subset)}
    kept = np.asarray([pos[it] for it in oof.items])  # positions (in subset) of the decoded items
    report = find_label_issues(oof.probs, oof.labels, oof.classes, oof.items)
    seconds = time.perf_counter() - t0
    is_flipped = np.isin(kept, flipped)
    n_flip = int(is_flipped.sum())
    scores = quality_scores(oof.labels, oof.probs)
    top = np.argsort(scores, kind="stable")[:n_flip]
    hits_top = int(is_flipped[top].sum())
    flagged = {it.path for it in report.issues}
    flagged_mask = np.asarray([it in flagged for it in oof.items])
    hits_flag = int((flagged_mask & is_flipped).sum())
    clean_acc = float((oof.probs.argmax(1) == true[kept]).mean())
    return {
        "dataset": name,
        "images": len(oof.items),
        "oof_accuracy": oof.accuracy,
        "fold_accuracy": oof.fold_accuracy,
        "flipped": n_flip,
        "model": oof.settings["model"],
        "img_size": oof.settings["img_size"],
        "epochs": oof.settings["epochs"],
        "folds": args.kfold,
        "seed": args.seed,
        "threads": args.threads,
        "topN_precision": hits_top / max(n_flip, 1),
        "topN_recall": hits_top / max(n_flip, 1),
        "flagged": int(flagged_mask.sum()),
        "flagged_precision": hits_flag / max(int(flagged_mask.sum()), 1),
        "flagged_recall": hits_flag / max(n_flip, 1),
        "oof_acc_vs_true": clean_acc,
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--datasets", nargs="+", default=["sign", "natural"], choices=["sign", "natural", "fashion"]
    )
    ap.add_argument("--noise", type=float, default=0.05, help="fraction of labels flipped (default 0.05)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kfold", type=int, default=5)
    ap.add_argument("--model", default=None, help="default: the command's default")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    ap.add_argument(
        "--subset",
        nargs="*",
        default=["fashion=3000"],
        metavar="NAME=N",
        help="stratified subsets (default: fashion=3000, from its training split)",
    )
    args = ap.parse_args()
    args.subset = {k: int(v) for k, v in (s.split("=") for s in args.subset)}
    rows = [run_one(d, args) for d in args.datasets]
    cols = [
        ("dataset", "{}"),
        ("images", "{}"),
        ("flipped", "{}"),
        ("model", "{}"),
        ("img_size", "{}"),
        ("epochs", "{}"),
        ("topN_precision", "{:.3f}"),
        ("flagged", "{}"),
        ("flagged_precision", "{:.3f}"),
        ("flagged_recall", "{:.3f}"),
        ("oof_acc_vs_true", "{:.3f}"),
        ("seconds", "{}"),
    ]
    print(" | ".join(c for c, _ in cols))
    for r in rows:
        print(" | ".join(f.format(r[c]) for c, f in cols))
    old = json.loads(OUT.read_text()) if OUT.exists() else {"runs": []}
    cmd = "python bench/label_errors.py " + " ".join(sys.argv[1:])
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    old["runs"] = [*old.get("runs", []), *({**r, "command": cmd, "when": stamp} for r in rows)]
    old["cpu"] = cpu_facts()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(old, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
