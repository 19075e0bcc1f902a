"""Small images: which rule the auto recipe should follow when a folder's photos are tiny.

natural-images (30 px photos) is the suite set where the auto default lost to the tutorial
(resnet10s at the native 30 px: 90.5 %; SmallerVGGNet on images upsampled to 64 px: 94.5 %).
natural-images has been looked at, so the rule is decided on other small-photo sets and
then checked on natural-images. Outcome (docs/ACCURACY.md, "Small images"): upsampling was a
wash on the five sets below with 245-2,100 training images and gained on fashion28m and
mnist28m (4,900), so auto upsampled 16-63 px photos to 64 px from 4,000 training images; a
small gain on fashion28h and mnist28h (3,500) then moved that to 2,800.

  sign30    Sign Language Digits shrunk to 30x30 (the suite's seeded 70/10/20 split)
  hymeno30  hymenoptera shrunk to 30x30 (the suite's split: train as given, val halved)
  fashion28 3,000 Fashion-MNIST training images (seeded draw) as a folder of 28x28 PNGs, the
            suite's 70/10/20 split: a third small set (greyscale clothes; a folder, so auto
            treats it as photos, not as the built-in benchmark)
  fashion28m, mnist28m  7,000 Fashion-MNIST / MNIST training images as folders of 28 px
            PNGs, 70/10/20: 4,900 training images, as many as natural-images has (4,829), to
            test whether upsampling pays once a small-photo set is that large
  fashion28h, mnist28h  the same from 5,000 images (3,500 training images): where between
            2,100 and 4,900 training images upsampling starts to pay (the threshold's place)
  natural   natural-images as stored (30x30), the suite's split: the first check
  sign30t, hymeno30t  the same photos shrunk as naive thumbnails: point-sampled (no
            anti-aliasing) and saved as JPEG at PIL's default quality

Each candidate is the auto recipe with some keys fixed (CANDIDATES); every other key is
decided by auto as for a user. The shrunk copies are built once under --cache (never in the
repository): area resampling for the clean sets, point sampling for the thumbnail sets.

  python bench/small_images.py --datasets sign30 hymeno30 --threads 1
  python bench/small_images.py --datasets natural --candidates up64 --threads 1
  python bench/small_images.py --datasets sign30 --candidates bicubic --seeds 42 43 --threads 1
  python bench/small_images.py --table

Writes bench/results/small_images.json (rows kept across runs) and prints a table with each
candidate's accuracy difference and time ratio against ``native`` (today's rule).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402  (the suite's datasets, splits and CPU facts)

import imgclf  # noqa: E402
from imgclf.training import auto  # noqa: E402

SIDE = 30
AUTO_KEY = "_auto"
# Candidate rules for small images: keys fixed on top of the auto recipe. Rows dated before
# 2026-12-03 10:00 UTC ran at its old 2,000-step budget (TARGET_STEPS; 4,000 since commit cb3f6d5).
CANDIDATES: dict[str, dict[str, Any]] = {
    # The images' own size (NATIVE: 30 px, 28 for the MNIST-style folders). Auto's rule up to
    # 2026-12-03 for every small set; since then for those under 4,000 (now 2,800) training images.
    "native": {"img_size": "NATIVE"},
    "up64": {"img_size": 64},  # upsample to 64 px (resnet10s' stride-2 stem then runs at 32 px)
    # Twice the old step budget on a 4,900-image set (27 epochs at 2,000 steps; 50, the cap, at 4,000).
    "up64x50": {"img_size": 64, "epochs": 50},
    # 96 px at the same 50 epochs: resnet10s' first stage at 48 px instead of 32 ("Upsampling further").
    "up96x50": {"img_size": 96, "epochs": 50},
    # 128 px at 50 epochs: the stem's max-pool brings it back to a 32 px first stage, so the model
    # costs what 64 px does; only the input (and the augmentation warps) is finer ("Upsampling to 128 px").
    "up128x50": {"img_size": 128, "epochs": 50},
    # up64x50 plus random erasing on half the images ("Random erasing for larger sets").
    "erase50x50": {"img_size": 64, "epochs": 50, "erase": 0.5},
    # up64x50 with an exponential moving average of the weights ("Weight averaging (EMA)").
    "ema999x50": {"img_size": 64, "epochs": 50, "ema": 0.999},
    # up64x50 with the rate the median of 5 range tests picks ("The rate from 5 range tests").
    # AUTO_KEY holds imgclf.training.auto constants set for the run (rules, not TrainConfig keys).
    "med5x50": {"img_size": 64, "epochs": 50, AUTO_KEY: {"LR_REPEATS": 5}},
    # up64x50 at a fixed rate instead of the range test's (its picks here: 0.0035-0.01; "How much
    # the rate matters"): each seed runs at the rate its baseline did not draw.
    "lr01x50": {"img_size": 64, "epochs": 50, "lr": 0.01},
    "lr004x50": {"img_size": 64, "epochs": 50, "lr": 0.004},
    # The auto recipe as a user gets it, and with a fifth instead of a tenth of the range test's
    # lowest-loss rate ("The rate rule: a fifth"); on the full-size suite sets too.
    "auto": {},
    "min5": {AUTO_KEY: {"LR_RULE": "min5"}},
    # The auto recipe plus MixUp at a = 0.2 ("MixUp for the default"). Mixing is left out of the
    # range test and draws from its own stream, so the run gets its baseline's rate and warps.
    "mix20": {"mixup": 0.2},
    # The auto recipe with full-strength warps below 1,000 training images a class instead of
    # half ("Stronger warps for mid-sized sets").
    "aug1k": {AUTO_KEY: {"STRENGTH_TIERS": ((1000, 1.0),)}},
    # ... and with a quarter instead of half from 200 ("Weaker warps for mid-sized sets"): adopted
    # in session 21, so `auto` rows dated before 2026-12-04 23:55 UTC trained with half strength
    # there and `augq` is what `auto` now trains.
    "augq": {AUTO_KEY: {"STRENGTH_TIERS": ((200, 1.0),)}},
    "vgg64": {"model": "smallervggnet", "img_size": 64},  # the old best's model and size
    # The same at 50 epochs, paired with up64x50 ("SmallerVGGNet for upsampled small photos").
    "vgg64x50": {"model": "smallervggnet", "img_size": 64, "epochs": 50},
    "vgg-native": {"model": "smallervggnet"},  # its model at the native size
    # Native size, augmentation resampled bicubically: a bilinear warp keeps about 60 % of a
    # 30 px image's high-frequency energy (the test images keep all of it), a bicubic one about 80 %.
    "bicubic": {"aug_interp": "bicubic", "img_size": "NATIVE"},
}


def _shrink_tree(src: Path, dst: Path, thumbnail: bool = False) -> Path:
    """Every image under ``src`` resized to SIDE x SIDE into ``dst``, same layout.

    Clean: area resampling, saved as PNG. ``thumbnail``: point-sampled (no anti-aliasing) and
    saved as JPEG at PIL's default quality, as naive thumbnailing leaves small photos."""
    from PIL import Image

    if (dst / ".done").exists():
        return dst
    for f in sorted(src.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        out = dst / f.relative_to(src).with_suffix(".jpg" if thumbnail else ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im:
            rgb = im.convert("RGB")
            if thumbnail:
                rgb.resize((SIDE, SIDE), Image.Resampling.NEAREST).save(out, "JPEG")
            else:
                rgb.resize((SIDE, SIDE), Image.Resampling.BOX).save(out)
    (dst / ".done").write_text("")
    return dst


def _idx_folder(dst: Path, source: str, n: int | None, split: str = "train") -> Path:
    """``n`` seeded images (all with None) of a built-in IDX set's ``split`` as
    ``dst/{class}/{i}.png`` (28x28 grey)."""
    import numpy as np
    from PIL import Image

    from imgclf.data import sources as D

    if (dst / ".done").exists():
        return dst
    index = D.index_source(source)
    pool = np.flatnonzero(index.split == split)
    chosen = pool if n is None else np.random.default_rng(42).choice(pool, n, replace=False)
    for i in sorted(chosen):
        cls = index.classes[int(index.labels[i])].replace("/", "-")
        (dst / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(index.arrays[i]).save(dst / cls / f"{i:05d}.png")
    (dst / ".done").write_text("")
    return dst


def official_test(run_dir: Path, ds: str, cache: Path) -> dict[str, Any]:
    """Accuracy of a fashion*/mnist* run's bundle on its source's official test set (10,000
    images, none of them in the training draw) and which images it got right (``test_official*``
    keys, :func:`suite.right_bits`)."""
    source = IDX_FOLDERS[ds][0]
    folder = _idx_folder(cache / f"{source}-test", source, None, split="test")
    return suite.right_bits(imgclf.evaluate(str(run_dir), data=str(folder)), "test_official")


def paired_table(rows: dict[str, dict[str, dict[str, Any]]], bases: list[str]) -> str:
    """Markdown: each candidate against the first of ``bases`` a dataset has, seed by seed, where both
    rows carry the same ``cpu`` tag: the difference on the images both runs were scored on (the
    official test set for fashion*/mnist*, else the split's test images) and its standard error from
    the images the two runs disagree on (McNemar); "-" for rows kept before their bits were."""
    import numpy as np

    lines = ["| dataset | candidate | seed | base % | candidate % | diff | SE of diff |", "|---" * 7 + "|"]
    for ds, runs in rows.items():
        base = next((b for b in bases if b in runs), None)
        for name, r in runs.items():
            cand, _, seed = name.partition("@")
            b = runs.get(f"{base}@{seed}" if seed else str(base))
            if base is None or cand == base or b is None:
                continue
            if r.get("cpu") is None or r.get("cpu") != b.get("cpu"):
                continue  # a pair is only a pair on one CPU (rows without a tag ran on another draw)
            key = "test_official" if ds in IDX_FOLDERS else "test_split"
            if key + "_right" not in r or key + "_right" not in b:
                if ds in IDX_FOLDERS:
                    continue  # a run scored on its split only (before the official test was kept)
                y, x = 100 * b["test_accuracy"], 100 * r["test_accuracy"]
                lines.append(f"| {ds} | {cand} | {seed or 42} | {y:.2f} | {x:.2f} | {x - y:+.2f} | - |")
                continue
            if r[key + "_items"] != b[key + "_items"]:
                raise SystemExit(f"{ds} {name}: scored on other images than {base}")
            n = r[key + "_size"]
            x, y = (suite.unpack_bits(t[key + "_right"], n) for t in (r, b))
            diff = x.mean() - y.mean()
            se = np.sqrt(((x != y).mean() - diff**2) / n)
            lines.append(
                f"| {ds} | {cand} | {seed or 42} | {100 * y.mean():.2f} | {100 * x.mean():.2f} "
                f"| {100 * diff:+.2f} | {100 * se:.2f} |"
            )
    return "\n".join(lines)


# Built-in IDX sets written out as folders of 28 px PNGs: (source, images). 3,000 (2,100 training),
# 5,000 (3,500) between that and 7,000 (4,900, natural-images' training-set size).
IDX_FOLDERS: dict[str, tuple[str, int]] = {
    "fashion28": ("fashion-mnist", 3000),
    "fashion28h": ("fashion-mnist", 5000),
    "mnist28h": ("mnist", 5000),
    "fashion28m": ("fashion-mnist", 7000),
    "mnist28m": ("mnist", 7000),
}


def dataset_args(name: str, cache: Path, work: Path) -> dict[str, Any]:
    thumb = name.endswith("t")  # sign30t, hymeno30t: the same photos shrunk as thumbnails
    if name in ("sign30", "sign30t"):
        src = suite.SHARED / "sign-language-digits"
        return {"data": str(_shrink_tree(src, cache / name, thumb)), **suite.SPLIT}
    if name in ("hymeno30", "hymeno30t"):
        split = suite._hymenoptera_split(work)
        return {"data": str(_shrink_tree(split, cache / name, thumb)), "seed": 42}
    if name in IDX_FOLDERS:
        source, n = IDX_FOLDERS[name]
        return {"data": str(_idx_folder(cache / name, source, n)), **suite.SPLIT}
    if name in ("natural", "sign", "hymeno"):  # the suite's sets as they are
        return suite.dataset_args(name, work, 0)
    raise SystemExit(f"unknown dataset {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["sign30", "hymeno30"])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[42],
        help="training seeds (hymeno30's split is fixed by its folders; elsewhere it draws the split too)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--precision",
        choices=suite.config_choices("precision"),
        default=None,
        help="pin the training precision (default: the recipe's auto); the rows before 2026-12-03 16:00 "
        "UTC trained in fp32 on CPUs without bf16, so later runs on bf16 CPUs pin fp32 to pair with them",
    )
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "imgclf-small-images")
    ap.add_argument("--out", type=Path, default=suite.ROOT / "bench" / "results" / "small_images.json")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    ap.add_argument(
        "--rescore",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="score finished fashion*/mnist* runs (a work folder's DS/NAME) on the official test set, "
        "add it to row DS/NAME of --out, and stop",
    )
    ap.add_argument(
        "--paired",
        nargs="+",
        metavar="BASE",
        help="--table: candidates vs the first BASE each dataset has (official test where there is one)",
    )
    a = ap.parse_args()
    if a.table:
        rows = json.loads(a.out.read_text())["rows"]
        print(paired_table(rows, a.paired) if a.paired else table(with_suite_native(rows)))
        return
    if a.rescore:
        for run_dir in a.rescore:
            ds, name = run_dir.parent.name, run_dir.name
            extra = official_test(run_dir, ds, a.cache)
            result = _load(a.out)
            if name not in result["rows"].get(ds, {}):
                raise SystemExit(f"{run_dir}: no row {ds}/{name} in {a.out}")
            result["rows"][ds][name].update(extra)
            a.out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"{ds} {name}: official test {100 * extra['test_official']:.2f} %", flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="imgclf-small-"))
    keys = {
        "tensorboard": False,
        **({"threads": a.threads} if a.threads else {}),
        **({"precision": a.precision} if a.precision else {}),
    }
    result = _load(a.out)
    for ds in a.datasets:
        args = dataset_args(ds, a.cache, work)
        for cand, seed in [(c, s) for s in a.seeds for c in a.candidates]:
            name = cand if seed == 42 else f"{cand}@{seed}"
            t0, load0 = time.time(), os.getloadavg()
            fixed = dict(CANDIDATES[cand])
            rules = fixed.pop(AUTO_KEY, {})
            if fixed.get("img_size") == "NATIVE":
                fixed["img_size"] = 28 if ds.startswith(("fashion", "mnist")) else SIDE
            run = {**args, **keys, **fixed, "seed": seed}
            saved = {k: getattr(auto, k) for k in rules}
            for k, v in rules.items():
                setattr(auto, k, v)
            try:
                res = imgclf.train(**run, out=str(work / ds / name), progress=False)
            finally:
                for k, v in saved.items():
                    setattr(auto, k, v)
            row = suite.run_row(res.run_dir, res.metrics, t0, load0, cfg_keys=("lr", "precision"))
            if ds in IDX_FOLDERS:
                row.update(official_test(Path(res.run_dir), ds, a.cache))
            # Re-read before writing: another run of this script (the other core) may have added rows.
            result = _load(a.out)
            result["rows"].setdefault(ds, {})[name] = row
            result["cpu"] = suite.cpu_facts()
            a.out.write_text(json.dumps(result, indent=2) + "\n")  # after every run: a crash loses one
            print(f"{ds} {name}: {row}", flush=True)
    print(table(with_suite_native(result["rows"])))
    print(f"wrote {a.out}")


def _load(out: Path) -> dict[str, Any]:
    return json.loads(out.read_text()) if out.exists() else {"rows": {}}


def with_suite_native(rows: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """natural-images' ``native`` runs are the suite's auto rows, one per seed (same split, seed and
    decisions: the transfer bench repeated one to the digit), so they are not trained again here."""
    if "natural" not in rows:
        return rows
    native = {}
    results = suite.ROOT / "bench" / "results"
    # suite-auto.json is seed 42; suite.py --seed N writes suite-auto-seedN.json.
    for path in sorted(results.glob("suite-auto.json")) + sorted(results.glob("suite-auto-seed*.json")):
        seed = path.stem.removeprefix("suite-auto").removeprefix("-seed")
        row = json.loads(path.read_text())["rows"].get("natural")
        key = f"native@{seed}" if seed else "native"
        if row and key not in rows["natural"]:
            native[key] = {**row, "source": path.name}
    return {**rows, "natural": {**native, **rows["natural"]}}


def table(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: each candidate's mean test % over its seeds, the difference from ``native`` on the
    same seeds, and its time ratio."""
    cols = "dataset candidate model size seeds test-%-(mean) vs-native epochs train-s time/native".split()
    lines = ["| " + " | ".join(c.replace("-", " ") for c in cols) + " |"]
    lines.append("|---" * len(cols) + "|")
    for ds, runs in rows.items():
        by_cand: dict[str, dict[str, dict[str, Any]]] = {}
        for name, r in runs.items():
            cand, _, seed = name.partition("@")
            by_cand.setdefault(cand, {})[seed or "42"] = r
        base = by_cand.get("native", {})
        for cand, seeds in by_cand.items():
            acc = sum(r["test_accuracy"] for r in seeds.values()) / len(seeds)
            secs = sum(r["train_time_s"] for r in seeds.values()) / len(seeds)
            diff = ratio = "-"
            shared = [s for s in seeds if s in base]
            if shared and cand != "native":
                d = sum(seeds[s]["test_accuracy"] - base[s]["test_accuracy"] for s in shared) / len(shared)
                t = sum(seeds[s]["train_time_s"] / base[s]["train_time_s"] for s in shared) / len(shared)
                diff, ratio = f"{100 * d:+.2f}", f"{t:.2f}x"
            r = next(iter(seeds.values()))
            lines.append(
                f"| {ds} | {cand} | {r['model']} | {r['img_size']} | {len(seeds)} | {100 * acc:.2f} | {diff} "
                f"| {r['epochs_run']} | {secs:.0f} | {ratio} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
