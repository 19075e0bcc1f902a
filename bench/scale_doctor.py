"""The dataset doctor at scale: ``inspect`` time and peak memory at 10k / 50k / 200k images, and
near-duplicate recall of the faiss index against exact all-pairs search.

Each dataset is built in memory from real pixel arrays (Fashion-MNIST and MNIST, each also
rotated by 90 degrees: 280,000 distinct 28x28 images) plus 5 % planted near copies (brightness
scaled by 0.9-1.1 and Gaussian noise of sigma 3 grey levels). Each size runs in its own process,
so peak RSS (``ru_maxrss``) is that size's alone; the "inspect" time is what ``imgclf inspect``
runs on an array source: :func:`imgclf.data.dedup.scan` (content hash + 256-bit phash per image),
:func:`imgclf.data.dedup.find_groups` and :func:`imgclf.analysis.doctor.analyse`.

Recall is the share of the exact all-pairs result (:func:`imgclf.data.dedup.near_pairs` at
``NEAR_THRESHOLD``) that the index finds; above ``--exact-max`` images exact search over all
pairs is too slow, so the exact pairs of ``--sample`` random images against all images are
the reference there. The cut-over rows time exact against index on the first m hashes.

    python bench/scale_doctor.py            # 10k, 50k, 200k (about 5 minutes on 2 cores)
    python bench/scale_doctor.py --quick    # 10k and 30k, under 3 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from suite import cpu_facts  # noqa: E402

SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))
OUT = ROOT / "bench" / "results" / "scale_doctor.json"
PLANTED_FRACTION = 0.05


def build(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels, planted (k, 2) original/copy index pairs)."""
    from imgclf.data import sources as D

    os.environ.setdefault("IMGCLF_DATA_DIR", str(SHARED))
    parts, labels = [], []
    for name, offset in (("fashion-mnist", 0), ("mnist", 10)):
        ix = D.index_source(name)
        parts += [ix.arrays, np.rot90(ix.arrays, axes=(1, 2))]
        labels += [ix.labels + offset, ix.labels + offset + 20]
    pool, pool_y = np.concatenate(parts), np.concatenate(labels)
    rng = np.random.default_rng(seed)
    k = int(n * PLANTED_FRACTION)
    if n - k > len(pool):
        raise SystemExit(f"at most {len(pool) + int(len(pool) * PLANTED_FRACTION)} images can be built")
    base = rng.choice(len(pool), n - k, replace=False)
    orig = rng.choice(n - k, k, replace=False)
    src = pool[base[orig]].astype(np.float32)
    copies = src * rng.uniform(0.9, 1.1, (k, 1, 1)) + rng.normal(0, 3, src.shape)
    images = np.concatenate([pool[base], np.clip(copies, 0, 255).round().astype(np.uint8)])
    y = np.concatenate([pool_y[base], pool_y[base[orig]]])
    planted = np.stack([orig, np.arange(n - k, n)], axis=1)
    return np.ascontiguousarray(images), y, planted


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pairset(p: np.ndarray) -> set[tuple[int, int]]:
    return set(map(tuple, p.tolist()))


def _sample_truth(h: np.ndarray, rows: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    """Exact pairs (i < j) within ``threshold`` bits with i or j in ``rows``: rows against all."""
    words = np.ascontiguousarray(h).view(np.uint64)
    out: set[tuple[int, int]] = set()
    for s in range(0, len(rows), 256):
        r = rows[s : s + 256]
        d = np.zeros((len(r), len(h)), dtype=np.int32)
        for k in range(words.shape[1]):
            d += np.bitwise_count(words[r, k, None] ^ words[None, :, k])
        a, b = np.nonzero(d <= threshold)
        a = r[a]
        keep = a != b
        out |= set(zip(np.minimum(a, b)[keep].tolist(), np.maximum(a, b)[keep].tolist()))
    return out


def run_one(n: int, exact_max: int, sample: int, cutover: bool) -> dict[str, Any]:
    """Everything measured at one size, in this process."""
    from imgclf.analysis.doctor import analyse
    from imgclf.data import dedup
    from imgclf.data import sources as D

    images, y, planted = build(n)
    index = D.SourceIndex(
        f"scale{n}", "idx", [str(c) for c in range(40)], [f"scale:{i}" for i in range(n)], y,
        np.asarray([""] * n, dtype=object), 1, arrays=images,
    )  # fmt: skip
    rss0 = _rss_mb()
    peak = [rss0]
    done = threading.Event()

    def sample_rss() -> None:  # ru_maxrss would include building the data set; sample instead
        while not done.wait(0.05):
            peak.append(_rss_mb())

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    infos = dedup.scan(index, workers=2, progress=False)
    t_scan = time.perf_counter() - t0
    method = dedup.choose_method(n)
    t1 = time.perf_counter()
    groups = dedup.find_groups(infos)
    t_groups = time.perf_counter() - t1
    report = analyse(index, infos, groups, seconds=time.perf_counter() - t0)
    total = time.perf_counter() - t0
    done.set()
    sampler.join()
    comp = groups.component
    row: dict[str, Any] = {
        "images": n,
        "planted_copies": len(planted),
        "method": method,
        "scan_s": round(t_scan, 2),
        "groups_s": round(t_groups, 2),
        "inspect_s": round(total, 2),
        "us_per_image": round(1e6 * total / n, 1),
        "rss_before_mb": round(rss0, 1),
        "peak_rss_mb": round(max(peak), 1),
        "inspect_rss_mb": round(max(peak) - rss0, 1),  # what inspect added to the data set's RSS
        "near_groups": len(report.near_duplicates),
        "exact_groups": len(report.exact_duplicates),
        "planted_found": round(float(np.mean(comp[planted[:, 0]] == comp[planted[:, 1]])), 4),
    }
    del report
    hashes = np.stack([i.phash for i in infos])
    t2 = time.perf_counter()
    index_p, _ = dedup.near_pairs_indexed(hashes)
    row["index_pairs_s"] = round(time.perf_counter() - t2, 2)
    found = _pairset(index_p)
    if n <= exact_max:
        t3 = time.perf_counter()
        exact_p, _ = dedup.near_pairs(hashes)
        row["exact_pairs_s"] = round(time.perf_counter() - t3, 2)
        truth = _pairset(exact_p)
        row["recall_reference"] = "all pairs"
    else:
        rows = np.sort(np.random.default_rng(1).choice(n, min(n, sample), replace=False))
        truth = _sample_truth(hashes, rows, dedup.NEAR_THRESHOLD)
        member = np.zeros(n, dtype=bool)
        member[rows] = True
        found = {p for p in found if member[p[0]] or member[p[1]]}
        row["recall_reference"] = f"pairs of {len(rows)} random images against all"
    row["exact_pairs"] = len(truth)
    row["recall"] = round(len(truth & found) / max(1, len(truth)), 4)
    row["false_pairs"] = len(found - truth)  # must be 0: every reported distance is exact
    if cutover:
        cut = []
        for m in (1000, 2000, 3000, 4000, 6000, 8000):
            if m > n:
                break
            h = hashes[:m]
            te, ti = [], []
            for _ in range(3):  # best of three: the machine is shared
                t = time.perf_counter()
                dedup.near_pairs(h)
                te.append(time.perf_counter() - t)
                t = time.perf_counter()
                dedup.near_pairs_indexed(h)
                ti.append(time.perf_counter() - t)
            cut.append({"hashes": m, "exact_s": round(min(te), 3), "index_s": round(min(ti), 3)})
        row["cutover"] = cut
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,50000,200000")
    ap.add_argument("--quick", action="store_true", help="10k and 30k only, sampled recall at 30k")
    ap.add_argument("--exact-max", type=int, default=50000, help="largest size compared against all pairs")
    ap.add_argument("--sample", type=int, default=5000, help="images whose exact pairs are the reference")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one size, JSON out
    ap.add_argument("--cutover", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.exact_max, args.sample, args.cutover)))
        return
    sizes = [10000, 30000] if args.quick else [int(s) for s in args.sizes.split(",")]
    exact_max = 10000 if args.quick else args.exact_max
    rows = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--exact-max", str(exact_max)]
        cmd += ["--sample", str(args.sample)] + (["--cutover"] if n == sizes[0] else [])
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if res.returncode:
            raise SystemExit(res.stderr[-2000:])
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{r['images']:>8,} {r['method']:>6} inspect {r['inspect_s']:7.1f}s"
            f" ({r['us_per_image']:6.0f} us/img)"
            f"  pairs {r['groups_s']:6.2f}s  RSS {r['peak_rss_mb']:5.0f} MB (+{r['inspect_rss_mb']:.0f})"
            f"  recall {r['recall']:.4f} of {r['exact_pairs']} ({r['recall_reference']})"
            f"  planted found {r['planted_found']:.4f}",
            flush=True,
        )
    for c in rows[0].get("cutover", []):
        print(f"cut-over {c['hashes']:>6,} hashes: exact {c['exact_s']:.3f}s  index {c['index_s']:.3f}s")
    import faiss

    out = {
        "cpu": cpu_facts(),
        "faiss": faiss.__version__,
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python", "bench/scale_doctor.py", *sys.argv[1:]]),
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
