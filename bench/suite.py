"""The dataset suite: one named training configuration on every suite dataset, one table.

Datasets (all from ../shared/datasets, each with a fixed seeded, duplicate-aware split):
  sign      Sign Language Digits (hands on a plain background, 2,062 photos, 10 classes)
  hymeno    hymenoptera (ants vs bees, 398 full-size photos, its own train/val folders;
            val is split 50/50 into val and test here, seeded)
  natural   natural-images (6,899 photos at 30 px, 8 classes)
  fashion   Fashion-MNIST (70,000 28x28; ``--fashion-subset`` training images, official test)

A configuration is a name from CONFIGS (a dict of ``imgclf.train`` keys; ``--set KEY=VALUE``
adds more). Every default decision should be made leave-one-dataset-out: chosen on three of
these and reported on the fourth; the table has one row per dataset for that reason.

  python bench/suite.py --config tutorial-smallervggnet           # hours on 2 cores
  python bench/suite.py --config best --datasets sign hymeno --quick   # minutes: few epochs
  python bench/suite.py --table                                   # every configuration, one table

Writes bench/results/suite-<config>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))
os.environ.setdefault("IMGCLF_DATA_DIR", str(SHARED))
sys.path.insert(0, str(ROOT))

import imgclf  # noqa: E402

# Folder datasets get the same seeded 70/10/20 split in every configuration (seed 42).
SPLIT = {"val_split": 0.1, "test_split": 0.2, "seed": 42}
CONFIGS: dict[str, dict[str, Any]] = {
    "best": {"recipe": "best"},
    "tutorial-smallervggnet": {"recipe": "tutorial", "model": "smallervggnet"},
    "tutorial-simplecnn": {"recipe": "tutorial", "model": "simplecnn"},
    # Fashion-MNIST's own tutorial (LeNet, SGD 0.01, 50 epochs); the folder tutorials above are
    # SmallerVGGNet at 96 px for 100 epochs, hours a run on 28 px clothes here.
    "tutorial-lenet": {"recipe": "tutorial", "model": "lenet"},
    "default": {"recipe": "default"},
    "auto": {"recipe": "auto"},
    # imgclf tune with --budget seconds a dataset; the row is the best-by-validation trial's test.
    "tune": {},
}


def _hymenoptera_split(work: Path) -> Path:
    """hymenoptera with its val folder halved into val/test (seeded), as links: no copies of data."""
    import random

    src = SHARED / "hymenoptera"
    dst = work / "hymenoptera"
    if dst.exists():
        return dst
    rng = random.Random(42)
    for cls in sorted(p.name for p in (src / "train").iterdir() if p.is_dir()):
        (dst / "train" / cls).mkdir(parents=True)
        for f in sorted((src / "train" / cls).iterdir()):
            (dst / "train" / cls / f.name).symlink_to(f)
        val = sorted((src / "val" / cls).iterdir())
        rng.shuffle(val)
        for part, files in (("val", val[: len(val) // 2]), ("test", val[len(val) // 2 :])):
            (dst / part / cls).mkdir(parents=True)
            for f in files:
                (dst / part / cls / f.name).symlink_to(f)
    return dst


def dataset_args(name: str, work: Path, fashion_subset: int, seed: int = 42) -> dict[str, Any]:
    """``imgclf.train`` keys for a suite dataset. ``seed`` draws the split of sign/natural (and
    fashion's training subset) and seeds training; hymenoptera's split is fixed by its folders."""
    if name == "sign":
        return {"data": str(SHARED / "sign-language-digits"), **SPLIT, "seed": seed}
    if name == "natural":
        return {"data": str(SHARED / "natural-images"), **SPLIT, "seed": seed}
    if name == "hymeno":
        return {"data": str(_hymenoptera_split(work)), "seed": seed}
    if name == "fashion":
        return {"data": "fashion-mnist", "subset": fashion_subset, "seed": seed}
    raise SystemExit(f"unknown dataset {name!r}")


def cpu_facts() -> dict[str, Any]:
    """CPU model and the flags that decide speed (figures compare only within one CPU)."""
    model, flags = platform.processor(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(
            (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), model
        )
        have = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        flags = [f for f in have if f.startswith(("avx", "amx", "fma"))]
    except OSError:
        pass
    return {"model": model, "flags": flags, "cores": os.cpu_count()}


def cpu_tag() -> str:
    """One line for a row: benches that keep rows across runs (small_images, lr_rule) span CPU
    draws, so each row says which CPU it ran on rather than the file's last writer."""
    facts = cpu_facts()
    keys = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in facts["flags"]]
    return f"{facts['model']}, {facts['cores']} cores, {' '.join(keys) or 'no avx2'}"


def right_bits(res: Any, prefix: str) -> dict[str, Any]:
    """An evaluation's accuracy and which images it got right (hex of packed bits, in evaluation
    order) with a hash of those files, under ``prefix``: two runs scored on the same images can then
    be compared image by image (``small_images.py --table --paired`` gives the SE of a difference)."""
    import hashlib

    import numpy as np

    right = np.asarray(res.correct, dtype=bool)
    return {
        prefix: round(float(right.mean()), 6),
        f"{prefix}_size": int(right.size),
        f"{prefix}_items": hashlib.sha1("\n".join(res.files_rel).encode()).hexdigest()[:12],
        f"{prefix}_right": np.packbits(right).tobytes().hex(),
    }


def unpack_bits(hexed: str, n: int) -> Any:
    """The ``n`` right/wrong flags that :func:`right_bits` packed, as a bool array."""
    import numpy as np

    return np.unpackbits(np.frombuffer(bytes.fromhex(hexed), np.uint8))[:n].astype(bool)


def split_test_bits(run_dir: Path) -> dict[str, Any]:
    """:func:`right_bits` of a run's bundle on the run's own test split (``test_split_*`` keys; its
    accuracy can differ from the trainer's ``test_accuracy`` by the odd image: the bundle predicts
    through the exported graph). Empty when the run kept no test split."""
    splits = run_dir / "splits.json"
    if not splits.exists() or not json.loads(splits.read_text()).get("test"):
        return {}
    return right_bits(imgclf.evaluate(str(run_dir), split="test", progress=False), "test_split")


def run_row(
    run_dir: Path,
    metrics: dict[str, Any],
    t0: float,
    load0: tuple[float, ...],
    cfg_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One bench row of a finished run: test/val accuracy, times, model, size, when and under what
    load, plus ``cfg_keys`` from its config.json (the suite, transfer and small-image benches) and
    which test-split images it got right (:func:`split_test_bits`)."""
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    row = {
        "test_accuracy": metrics.get("test_accuracy"),
        "val_accuracy": metrics.get("val_accuracy"),
        "test_size": metrics.get("test_size"),
        "train_time_s": metrics["train_time_s"],
        "wall_s": round(time.time() - t0, 1),
        "epochs_run": metrics["epochs_run"],
        "model": cfg["model"],
        "img_size": cfg["img_size"],
        **{k: cfg[k] for k in cfg_keys},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_avg_start": [round(x, 2) for x in load0],
        "cpu": cpu_tag(),
        # What --tta would have scored (the trainer's end-of-run check), when the run trained with warps.
        **{k: metrics[k] for k in ("test_accuracy_tta", "tta_views") if k in metrics},
    }
    return {**row, **split_test_bits(run_dir)}


def config_choices(key: str) -> tuple[Any, ...]:
    """The values a TrainConfig key accepts, as the config declares them (for bench flags)."""
    import dataclasses

    from imgclf.training.config import TrainConfig

    return next(f.metadata["choices"] for f in dataclasses.fields(TrainConfig) if f.name == key)


def parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# Columns of the combined table (python bench/suite.py --table): file suffix -> heading.
TABLE = [
    ("auto", "auto (default)"),
    ("tutorial-smallervggnet", "tutorial SmallerVGGNet"),
    ("tutorial-simplecnn", "tutorial SimpleCNN"),
    ("tutorial-lenet", "tutorial LeNet"),
    ("best", "old best"),
    ("tune", "tune"),
]


def table(results: Path) -> str:
    """One Markdown table of every configuration's rows found in ``results`` (test % and train s)."""
    cols = [
        (k, h, json.loads(f.read_text())) for k, h in TABLE if (f := results / f"suite-{k}.json").exists()
    ]
    lines = [
        "| dataset | " + " | ".join(h for _, h, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for ds in ("sign", "hymeno", "natural", "fashion"):
        cells = []
        for _, _, res in cols:
            r = res["rows"].get(ds)
            if r is None or r.get("test_accuracy") is None:
                cells.append("not run")
            else:
                mark = " (earlier run)" if r.get("source") else ""
                cells.append(
                    f"{100 * r['test_accuracy']:.2f} % ({r['model']} {r['img_size']} px, "
                    f"{r['epochs_run']} ep, {r['train_time_s']:.0f} s){mark}"
                )
        lines.append(f"| {ds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seeds_table(results: Path) -> str:
    """Markdown: for each dataset and configuration run with more than one seed, the test % per seed
    (seed 42 is suite-<config>.json, others suite-<config>-seed<N>.json), the mean and the spread."""
    runs: dict[tuple[str, str], dict[int, float]] = {}
    for k, _ in TABLE:
        for f in sorted(results.glob(f"suite-{k}*.json")):
            tail = f.stem[len(f"suite-{k}") :]
            if tail and not tail.startswith("-seed"):
                continue
            seed = int(tail[len("-seed") :]) if tail else 42
            for ds, r in json.loads(f.read_text())["rows"].items():
                if r.get("test_accuracy") is not None:
                    runs.setdefault((ds, k), {})[seed] = 100 * r["test_accuracy"]
    lines = ["| dataset | configuration | test % by seed | mean | min-max |", "|---|---|---|---|---|"]
    for (ds, k), by_seed in sorted(runs.items()):
        if len(by_seed) < 2:
            continue
        vals = list(by_seed.values())
        seeds = ", ".join(f"{s}: {v:.2f}" for s, v in sorted(by_seed.items()))
        mean = sum(vals) / len(vals)
        lines.append(f"| {ds} | {k} | {seeds} | {mean:.2f} | {min(vals):.2f}-{max(vals):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--table", action="store_true", help="print the combined table of bench/results/suite-*.json"
    )
    ap.add_argument(
        "--config", choices=sorted(CONFIGS), help="the configuration to run (needed without --table)"
    )
    ap.add_argument("--datasets", nargs="+", default=["sign", "hymeno", "natural", "fashion"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more imgclf.train keys")
    ap.add_argument("--quick", action="store_true", help="3 epochs (rows marked partial)")
    ap.add_argument("--fashion-subset", type=int, default=12000)
    ap.add_argument("--budget", type=float, default=1800, help="--config tune: seconds of search a dataset")
    ap.add_argument(
        "--seed",
        type=int,
        default=42,
        help="split and training seed; other than 42 writes suite-<config>-seed<N>.json (see --seeds-table)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the run folders (bundles) and print where")
    ap.add_argument(
        "--seeds-table", action="store_true", help="print each configuration's accuracy over the seeds run"
    )
    a = ap.parse_args()
    if a.seeds_table:
        print(seeds_table(ROOT / "bench" / "results"), end="")
        return
    if a.table:
        print(table(ROOT / "bench" / "results"), end="")
        return
    if a.config is None:
        ap.error("give --config NAME (or --table)")
    work = Path(tempfile.mkdtemp(prefix="imgclf-suite-"))
    keys = {**CONFIGS[a.config], **parse_set(a.set), "tensorboard": False}
    if a.quick:
        keys["epochs"] = 3
    if a.threads:
        keys["threads"] = a.threads
    rows = {}
    for ds in a.datasets:
        t0, load0 = time.time(), os.getloadavg()
        if a.config == "tune":
            from imgclf.training.tune import tune

            given = {**dataset_args(ds, work, a.fashion_subset, a.seed), **keys}
            found = tune(given, budget_s=a.budget, out=work / f"{ds}-tune")
            run_dir = Path(found.best_trial_dir)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            extra = {"trials": found.n_trials, "pruned": found.n_pruned, "search_s": round(found.spent_s)}
        else:
            res = imgclf.train(
                **dataset_args(ds, work, a.fashion_subset, a.seed), **keys, out=str(work / ds), progress=False
            )
            run_dir, metrics, extra = res.run_dir, res.metrics, {}
        rows[ds] = {**extra, **run_row(run_dir, metrics, t0, load0)}
        print(f"{ds}: {rows[ds]}", flush=True)
    if a.keep:
        print(f"run folders kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    suffix = ("-quick" if a.quick else "") + ("" if a.seed == 42 else f"-seed{a.seed}")
    out = a.out or ROOT / "bench" / "results" / f"suite-{a.config}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Rows of datasets not run this time are kept: one file a configuration, filled over runs.
    old = json.loads(out.read_text())["rows"] if out.exists() else {}
    result = {
        "config": a.config,
        "keys": keys,
        "partial": a.quick,
        "rows": {**old, **rows},
        "cpu": cpu_facts(),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    tag = a.config + (", partial" if a.quick else "")
    print(f"\n| dataset | model | size | test % | epochs | train s |  ({tag})")
    print("|---|---|---|---|---|---|")
    for ds, r in rows.items():
        acc = "-" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}"
        print(
            f"| {ds} | {r['model']} | {r['img_size']} | {acc} | {r['epochs_run']} | {r['train_time_s']:.0f} |"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
