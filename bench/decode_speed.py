"""Decode + resize speed on multi-megapixel JPEGs, and proof that epoch 2 reads only the cache.

Makes a temporary folder of large JPEGs by upscaling real Sign Language photos (3000x3000 and
6000x4000) plus the dataset's 3 real 3024x3024 photos, then measures, interleaved:
  * naive: PIL full-resolution decode + resize (what a plain loader does),
  * imgclf: ``imgclf.core.preprocess.load_uint8`` (JPEG draft mode: the decoder scales by 1/2..1/8),
    on one thread and on a thread per core (as ``decode_items`` runs it),
  * ``imgclf.data.sources.decode_items`` cold (empty cache, 2 threads) and warm (cache only), counting
    how many images the warm pass decoded (must be 0).

  python bench/decode_speed.py [--per-size 6] [--size 96] [--repeats 3]

Writes bench/results/decode_speed.json. Data: $IMGCLF_SHARED (default ../shared/datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))
SIGN = SHARED / "sign-language-digits"

from imgclf.core.preprocess import Preprocess, load_uint8  # noqa: E402
from imgclf.data import sources as D  # noqa: E402


def make_folder(dst: Path, per_size: int) -> dict[str, list[Path]]:
    """dst/<class>/*.jpg: upscaled real photos (3000x3000, 6000x4000) and the real 3024x3024 ones."""
    from tqdm import tqdm

    files = sorted(p for p in SIGN.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    big_real = []
    small = []
    for p in files:
        with Image.open(p) as im:
            (big_real if im.width * im.height > 4_000_000 else small).append(p)
    groups: dict[str, list[Path]] = {"3000x3000": [], "6000x4000": [], "real 3024x3024": []}
    picks = small[:: max(1, len(small) // (2 * per_size))][: 2 * per_size]
    jobs = [((3000, 3000), "3000x3000", p) for p in picks[:per_size]]
    jobs += [((6000, 4000), "6000x4000", p) for p in picks[per_size:]]
    for i, (wh, tag, p) in enumerate(tqdm(jobs, desc="making large JPEGs", leave=False)):
        out = dst / p.parent.name / f"up{i}_{tag}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(p) as im:
            im.convert("RGB").resize(wh, Image.BICUBIC).save(out, quality=90)
        groups[tag].append(out)
    for p in big_real:
        out = dst / p.parent.name / p.name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(p.read_bytes())
        groups["real 3024x3024"].append(out)
    return groups


def naive(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-size", type=int, default=6, help="upscaled JPEGs per size (default 6)")
    ap.add_argument("--size", type=int, default=96, help="model input side (default 96)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode_speed.json"))
    args = ap.parse_args(argv)
    if not SIGN.exists():
        print(f"error: {SIGN} not found; set IMGCLF_SHARED to the datasets folder", file=sys.stderr)
        return 2
    pre = Preprocess((args.size, args.size), 3)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="imgclf-decode-") as tmp:
        folder = Path(tmp) / "data"
        groups = make_folder(folder, args.per_size)
        kinds = ("naive", "imgclf", "imgclf_threads")
        rows: dict[str, dict[str, list[float]]] = {g: {k: [] for k in kinds} for g in groups}
        # decode_items decodes with `workers` threads (Pillow releases the GIL while decoding);
        # the threaded column is that, on every core.
        pool = ThreadPoolExecutor(os.cpu_count() or 1)
        for _ in range(args.repeats):
            for g, paths in groups.items():
                work = paths * max(1, -(-12 // len(paths)))  # >= 12 images so every thread has work
                for kind, run in (
                    ("naive", lambda ps: [naive(p, args.size) for p in ps]),
                    ("imgclf", lambda ps: [load_uint8(p, pre) for p in ps]),
                    ("imgclf_threads", lambda ps: list(pool.map(lambda p: load_uint8(p, pre), ps))),
                ):
                    t = time.perf_counter()
                    run(work)
                    rows[g][kind].append(len(work) / (time.perf_counter() - t))
        pool.shutdown()
        res["per_image_type"] = {
            g: {
                "n": len(groups[g]),
                "megapixels": round(
                    Image.open(groups[g][0]).width * Image.open(groups[g][0]).height / 1e6, 1
                ),
                "naive_img_s": st.median(v["naive"]),
                "imgclf_img_s": st.median(v["imgclf"]),
                "imgclf_threads_img_s": st.median(v["imgclf_threads"]),
                "threads": os.cpu_count(),
                "speedup": st.median(v["imgclf"]) / st.median(v["naive"]),
                "raw": v,
            }
            for g, v in rows.items()
        }
        # Through the training data path: cold (decode + cache write, 2 threads), then warm.
        index = D.index_source(str(folder))
        idx = np.arange(len(index))
        cache = str(Path(tmp) / "cache")
        t = time.perf_counter()
        cold = D.decode_items(index, idx, pre, cache_dir=cache, workers=2, progress=False)
        cold_s = time.perf_counter() - t
        calls = [0]
        real = D.load_uint8

        def counting(*a: Any, **k: Any) -> np.ndarray:
            calls[0] += 1
            return real(*a, **k)

        D.load_uint8 = counting  # count decodes in the warm pass: the cache must serve all
        try:
            t = time.perf_counter()
            warm = D.decode_items(index, idx, pre, cache_dir=cache, workers=2, progress=False)
            warm_s = time.perf_counter() - t
        finally:
            D.load_uint8 = real
        assert np.array_equal(cold.images, warm.images), "cache returned different pixels"
        res["decode_items"] = {
            "n": len(idx),
            "cold_img_s": len(idx) / cold_s,
            "warm_img_s": len(idx) / warm_s,
            "warm_decodes": calls[0],
            "identical_pixels": True,
        }
    res["load_avg_end"] = os.getloadavg()
    print(f"\ndecode+resize to {args.size}x{args.size} RGB, median of {args.repeats}, {res['date']}")
    print(f"load average at start {res['load_avg_start'][0]:.1f}, at end {res['load_avg_end'][0]:.1f}")
    threads = f"{os.cpu_count()} threads"
    print(f"{'images':<18}{'n':>4}{'MP':>6}{'naive img/s':>13}{'imgclf img/s':>14}{'speedup':>9}", end="")
    print(f"{'imgclf, ' + threads:>20}")
    for g, r in res["per_image_type"].items():
        print(
            f"{g:<18}{r['n']:>4}{r['megapixels']:>6.1f}{r['naive_img_s']:>13.1f}"
            f"{r['imgclf_img_s']:>14.1f}{r['speedup']:>8.1f}x{r['imgclf_threads_img_s']:>20.1f}"
        )
    d = res["decode_items"]
    print(
        f"decode_items, all {d['n']}: cold {d['cold_img_s']:.1f} img/s (2 threads, cache write), "
        f"warm {d['warm_img_s']:.0f} img/s, images decoded in the warm pass: {d['warm_decodes']}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
