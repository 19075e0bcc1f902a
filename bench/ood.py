"""Unknown-image ("out-of-distribution") bench: which score separates unknowns best.

Trains three small in-distribution models with ``imgclf.train`` (cached under ``--work``, so a
rerun reuses them), then for each (model, unknown set) pair and each score of
``imgclf.runtime.ood`` reports the AUROC (in-distribution test images vs unknowns) and the share
of unknowns rejected at the threshold that keeps 95 % of the model's VALIDATION images, with the
keep rate that threshold actually achieves on the test images. Scorers are fitted on the
recorded TRAINING split only. Images of every set pass through the bundle's own preprocessing
(``imgclf.data.sources.decode_items`` -> ``imgclf.core.preprocess.load_uint8``).

    python bench/ood.py --work /tmp/ood-work --threads 1           # train (cached) + table + JSON
    python bench/ood.py --work /tmp/ood-work --stage train          # only train the models

Pairs: LeNet/MNIST vs Fashion-MNIST test, LeNet/Fashion-MNIST vs MNIST test, ResNet10s/Sign
Language Digits vs natural-images and vs hymenoptera (the four that decide the default), plus
Sign vs MNIST and Sign vs Fashion-MNIST (reported, not used to decide).
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
sys.path.insert(0, str(ROOT / "bench"))
from suite import cpu_facts  # noqa: E402

SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))
DEFAULT_JSON = ROOT / "bench" / "results" / "ood.json"
KEEP_RATE = 0.95
# Unknown sets larger than this are sampled (seeded): AUROC over 3,000 images is stable to ~0.005.
MAX_UNKNOWN = 3000
# Images of the unknown set handed to threshold_for_keep_rate as --negatives (never evaluated).
N_NEGATIVES = 500


def models(epochs_scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """The in-distribution models: small but honest settings (see the module docstring)."""
    e = lambda n: max(1, round(n * epochs_scale))  # noqa: E731
    return {
        # The `best` LeNet recipe (SGD one-cycle), 15k training images, 4 epochs.
        "mnist": {"data": "mnist", "model": "lenet", "subset": 15000, "epochs": e(4)},
        "fashion": {"data": "fashion-mnist", "model": "lenet", "subset": 15000, "epochs": e(6)},
        # The auto recipe's kind of choice for photos (imgclf tune's first trial), fixed lr so no
        # range test runs: resnet10s, AdamW 2e-3, cosine, 64 px; 70/10/20 seeded split.
        "sign": {
            "data": str(SHARED / "sign-language-digits"),
            "recipe": "auto",
            "model": "resnet10s",
            "img_size": 64,
            "lr": 2e-3,
            "batch_size": 32,
            "epochs": e(15),
        },
    }


# (model, unknown set, decides the default)
PAIRS: list[tuple[str, str, bool]] = [
    ("mnist", "fashion-mnist", True),
    ("fashion", "mnist", True),
    ("sign", "natural-images", True),
    ("sign", "hymenoptera", True),
    ("sign", "mnist", False),
    ("sign", "fashion-mnist", False),
]


def train_or_reuse(name: str, spec: dict[str, Any], work: Path, threads: int) -> tuple[Path, dict]:
    """Train ``spec`` into ``work/name`` with imgclf.train, or reuse the bundle already there."""
    import imgclf

    out = work / name
    info_p = out / "ood_bench_train.json"
    if (out / "model" / "model.json").exists() and info_p.exists():
        info = json.loads(info_p.read_text())
        if info.get("spec") == spec:
            print(f"[{name}] reusing {out / 'model'}", flush=True)
            return out / "model", info
    t0 = time.time()
    print(f"[{name}] training {spec}", flush=True)
    res = imgclf.train(out=str(out), threads=threads, tensorboard=False, progress=False, **spec)
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    info = {"spec": spec, "train_s": round(time.time() - t0, 1), "metrics": metrics}
    info_p.write_text(json.dumps(info, indent=1))
    print(f"[{name}] trained in {info['train_s']} s", flush=True)
    return Path(res.bundle_dir), info


def _decode(index: Any, idx: np.ndarray, bundle: Any, work: Path) -> np.ndarray:
    from imgclf.data.sources import decode_items

    dec = decode_items(index, idx, bundle.pre, cache_dir=str(work / "cache"), workers=1, progress=False)
    return dec.images


def split_images(bundle: Any, work: Path) -> dict[str, np.ndarray]:
    """uint8 images of the run's recorded train / val / test splits, by the bundle's preprocessing."""
    from imgclf.data.sources import index_source
    from imgclf.runtime.bundle import recorded_splits

    rec, p = recorded_splits(bundle)
    if not rec:
        raise SystemExit(f"{bundle.path}: no recorded splits ({p})")
    index = index_source(str(bundle.meta["data_source"]))
    pos = {index.relpath(it): i for i, it in enumerate(index.items)}
    out: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for name in ("train", "val", "test"):
        idx = np.asarray([pos[r] for r in rec.get(name, []) if r in pos], dtype=np.int64)
        out[name] = _decode(index, idx, bundle, work)
        labels[name] = index.labels[idx]
    out["train_labels"], out["test_labels"] = labels["train"], labels["test"]
    return out


def unknown_images(name: str, bundle: Any, work: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(evaluated unknowns, "negatives" for --negatives), disjoint, seeded.

    MNIST / Fashion-MNIST: test images (sampled to MAX_UNKNOWN) and N_NEGATIVES training images.
    Folders: a quarter (at most N_NEGATIVES) as negatives, the rest (at most MAX_UNKNOWN) evaluated.
    """
    from imgclf.data.sources import index_source

    rng = np.random.default_rng(seed)
    spec = name if name in ("mnist", "fashion-mnist") else str(SHARED / name)
    index = index_source(spec)
    if name in ("mnist", "fashion-mnist"):
        ev = rng.permutation(np.flatnonzero(index.split == "test"))
        neg = rng.permutation(np.flatnonzero(index.split == "train"))[:N_NEGATIVES]
    else:
        perm = rng.permutation(len(index))
        cut = min(N_NEGATIVES, len(perm) // 4)
        neg, ev = perm[:cut], perm[cut:]
    ev = np.sort(ev[:MAX_UNKNOWN])
    return _decode(index, ev, bundle, work), _decode(index, np.sort(neg), bundle, work)


def features(bundle: Any, images: np.ndarray, batch: int = 256) -> tuple[Any, Any]:
    """Penultimate features and raw logits (fp32, eval mode) for uint8 NHWC images."""
    import torch

    from imgclf.core.preprocess import normalize
    from imgclf.runtime.ood import features_and_logits

    fs, ls = [], []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            x = normalize(torch.as_tensor(images[s : s + batch]), bundle.pre)
            f, lg = features_and_logits(bundle.model, x)
            fs.append(f.float())
            ls.append(lg.float())
    return torch.cat(fs), torch.cat(ls)


def variants() -> list[tuple[str, str, dict[str, Any]]]:
    """(row name, score kind, fit kwargs): the four scores at their defaults plus a few settings."""
    return [
        ("msp", "msp", {}),
        ("energy", "energy", {}),
        ("mahalanobis", "mahalanobis", {}),  # L2-normalised features (the default)
        ("mahalanobis raw", "mahalanobis", {"normalize": False}),
        ("knn", "knn", {}),  # k=1 (the default)
        ("knn k=10", "knn", {"k": 10}),
        ("knn k=50", "knn", {"k": 50}),
    ]


def score_model(name: str, bundle_dir: Path, unknowns: list[str], work: Path) -> list[dict[str, Any]]:
    import torch

    import imgclf
    from imgclf.runtime import ood

    bundle = imgclf.load(bundle_dir, backend="torch")
    t0 = time.time()
    imgs = split_images(bundle, work)
    feats = {s: features(bundle, imgs[s]) for s in ("train", "val", "test")}
    from imgclf.models.registry import logits_to_probs

    acc = float((logits_to_probs(feats["test"][1]).argmax(1).numpy() == imgs["test_labels"]).mean())
    unk, negs = {}, {}
    for u in unknowns:
        ev, neg = unknown_images(u, bundle, work)
        unk[u], negs[u] = features(bundle, ev), features(bundle, neg)
    print(
        f"[{name}] test accuracy {100 * acc:.2f} %; features: train {len(imgs['train'])}, "
        f"val {len(imgs['val'])}, test {len(imgs['test'])}, "
        + ", ".join(f"{u} {len(unk[u][0])}" for u in unknowns)
        + f" ({time.time() - t0:.0f} s)",
        flush=True,
    )
    labels = torch.as_tensor(imgs["train_labels"])
    rows = []
    for row, kind, kw in variants():
        t1 = time.time()
        scorer = ood.fit_scorer(kind, feats["train"][0], labels, len(bundle.classes), **kw)
        with torch.inference_mode():
            val = scorer(*feats["val"]).numpy()
            test = scorer(*feats["test"]).numpy()
            thr = ood.threshold_for_keep_rate(val, KEEP_RATE)
            for u in unknowns:
                out = scorer(*unk[u]).numpy()
                neg = scorer(*negs[u]).numpy()
                thr_neg = ood.threshold_for_keep_rate(val, KEEP_RATE, negative_scores=neg)
                rows.append(
                    {
                        "model": name,
                        "unknown": u,
                        "score": row,
                        "kind": kind,
                        "config": scorer.config(),
                        "auroc": round(ood.auroc(test, out), 4),
                        "rejected_at_95": round(float((out > thr).mean()), 4),
                        "test_kept": round(float((test <= thr).mean()), 4),
                        "rejected_with_negatives": round(float((out > thr_neg).mean()), 4),
                        "test_kept_with_negatives": round(float((test <= thr_neg).mean()), 4),
                        "n_negatives": len(neg),
                        "test_accuracy": round(acc, 4),
                        "n_in_test": len(test),
                        "n_val": len(val),
                        "n_unknown": len(out),
                        "fit_score_s": round(time.time() - t1, 2),
                    }
                )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | unknowns | score | AUROC | unknowns rejected at 95 % kept | test kept "
        "| with --negatives: rejected | test kept |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['unknown']} | {r['score']} | {r['auroc']:.3f} | "
            f"{100 * r['rejected_at_95']:.1f} % | {100 * r['test_kept']:.1f} % | "
            f"{100 * r['rejected_with_negatives']:.1f} % | {100 * r['test_kept_with_negatives']:.1f} % |"
        )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str, list[str]]:
    """Mean AUROC / rejection per score over the deciding pairs; the best score; disagreeing pairs."""
    deciding = {(m, u) for m, u, d in PAIRS if d}
    scores = list(dict.fromkeys(r["score"] for r in rows))
    out = []
    for s in scores:
        rs = [r for r in rows if r["score"] == s and (r["model"], r["unknown"]) in deciding]
        if rs:
            out.append(
                {
                    "score": s,
                    "pairs": len(rs),
                    "mean_auroc": round(float(np.mean([r["auroc"] for r in rs])), 4),
                    "mean_rejected_at_95": round(float(np.mean([r["rejected_at_95"] for r in rs])), 4),
                    "mean_test_kept": round(float(np.mean([r["test_kept"] for r in rs])), 4),
                    "mean_rejected_with_negatives": round(
                        float(np.mean([r["rejected_with_negatives"] for r in rs])), 4
                    ),
                    "mean_test_kept_with_negatives": round(
                        float(np.mean([r["test_kept_with_negatives"] for r in rs])), 4
                    ),
                }
            )
    best = max(out, key=lambda r: (r["mean_auroc"], r["mean_rejected_at_95"]))["score"]
    disagree = []
    for m, u, d in PAIRS:
        rs = [r for r in rows if r["model"] == m and r["unknown"] == u]
        if rs and d:
            top = max(rs, key=lambda r: r["auroc"])
            mine = next(r for r in rs if r["score"] == best)
            if top["auroc"] > mine["auroc"] + 0.001:  # not a tie at the table's precision
                disagree.append(
                    f"{m} vs {u}: best is {top['score']} ({top['auroc']:.3f}; {best} {mine['auroc']:.3f})"
                )
    return out, best, disagree


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/imgclf-ood-bench", help="trained models and decode cache")
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads")
    ap.add_argument("--stage", choices=("all", "train"), default="all")
    ap.add_argument("--models", default="mnist,fashion,sign", help="comma-separated subset")
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("IMGCLF_DATA_DIR", str(SHARED))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("IMGCLF_CACHE_DIR", str(work / "cache"))
    t_start = time.time()
    chosen = [m for m in args.models.split(",") if m]
    specs = models()
    bundles = {m: train_or_reuse(m, specs[m], work, args.threads) for m in chosen}
    if args.stage == "train":
        return 0
    rows: list[dict[str, Any]] = []
    for m in chosen:
        unknowns = [u for mm, u, _ in PAIRS if mm == m]
        rows += score_model(m, bundles[m][0], unknowns, work)
    print(table(rows))
    summ, best, disagree = summary(rows)
    print()
    print(
        "| score | mean AUROC | mean rejected at 95 % kept | mean test kept "
        "| with --negatives: rejected | test kept |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for s in summ:
        print(
            f"| {s['score']} | {s['mean_auroc']:.3f} | {100 * s['mean_rejected_at_95']:.1f} % | "
            f"{100 * s['mean_test_kept']:.1f} % | {100 * s['mean_rejected_with_negatives']:.1f} % | "
            f"{100 * s['mean_test_kept_with_negatives']:.1f} % |"
        )
    print(f"\nbest on average over the deciding pairs: {best}")
    for d in disagree:
        print(f"  disagrees: {d}")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu_facts(),
        "threads": args.threads,
        "keep_rate": KEEP_RATE,
        "max_unknown": MAX_UNKNOWN,
        "n_negatives": N_NEGATIVES,
        "models": {m: {"bundle": str(bundles[m][0]), **bundles[m][1]} for m in chosen},
        "pairs": [{"model": m, "unknown": u, "decides_default": d} for m, u, d in PAIRS],
        "rows": rows,
        "summary": summ,
        "best": best,
        "disagreeing_pairs": disagree,
        "wall_s": round(time.time() - t_start, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
