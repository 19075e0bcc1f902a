"""Data bigger than memory (issue 20): train from the decoded store with a bounded buffer.

Steps:
  1. decode Fashion-MNIST's training images at 96x96x3 into the decoded store through the real
     path (``build_store``: the built-in source's arrays, resized by ``decode_items``), timed;
     a second call shows the next run's cost (hashes + index, no decoding);
  2. plan with ``memory_budget_mb`` = a third of the decoded size: the plan must say stream;
  3. the data path alone: batches of random rows per second, streaming from the memory-mapped
     shards with their pages dropped from the page cache first (cold), and from an in-memory
     subset, no model;
  4. SmallerVGGNet training steps (same seed, batch, threads), interleaved in segments so that
     other load on the machine hits both alike: streaming over every row vs an in-memory subset
     that fits the buffer; the background prefetch thread is on in both;
  5. RssAnon (anonymous memory, not page cache) sampled every 20 ms throughout.

  python bench/scale.py --quick      # ~4-7 min on 2 busy cores, >= 1.5 GB decoded
  python bench/scale.py --repeat 3   # the same images repeated: ~4.7 GB decoded

``--ray``: two Ray workers on a local 2-node cluster (``ray.cluster_utils.Cluster``, 1 CPU per
node), one LeNet epoch on a Fashion-MNIST subset several times the per-worker buffer
(``memory_budget_mb``), first streaming from the shared store (``stream: auto``), then with
``stream: off`` (every worker decodes every split into memory) for contrast. The driver samples
RssAnon of each ``ray::RayTrainWorker`` process from /proc every 50 ms; with
``IMGCLF_DEBUG_ROWS=1`` each rank records the rows it read, and the coverage check counts
how often each training row was read in the epoch.

  python bench/scale.py --ray        # ~4-6 min on 2 busy cores

Writes bench/results/scale_quick.json (or scale.json, or scale_ray.json). Data: $IMGCLF_SHARED.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics as st
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))
os.environ.setdefault("IMGCLF_DATA_DIR", str(SHARED))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    keep = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))
    return f"{model}; {' '.join(keep)}"


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakRss:
    """Highest RssAnon seen by a 20 ms sampler thread since the last ``reset``."""

    def __init__(self) -> None:
        self.peak = rss_anon_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_anon_mb())

    def reset(self) -> float:
        p, self.peak = self.peak, rss_anon_mb()
        return p

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def in_memory_pick(n: int, budget_mb: float, size: int) -> np.ndarray:
    """A seeded random subset of as many rows as fit half the buffer."""
    n_mem = min(n, int(budget_mb / 2 * 2**20 // (size * size * 3)))
    return np.sort(np.random.default_rng(0).choice(n, n_mem, replace=False))


def child(args: argparse.Namespace) -> None:
    """One timed training segment in a fresh process; prints one JSON line."""
    import imgclf.models  # noqa: F401
    from imgclf.core.preprocess import Preprocess
    from imgclf.data import sources as D
    from imgclf.data import store as S
    from imgclf.models.registry import create_model
    from imgclf.training.trainer import epoch_batches

    torch.set_num_threads(args.threads)
    pre = Preprocess((args.size, args.size), 3)
    index = D.index_source("fashion-mnist")
    dec = S.build_store(
        index, np.flatnonzero(index.split == "train"), pre, cache_dir=args.cache_dir, progress=False
    )
    x_all, y_all = dec.images, torch.from_numpy(dec.labels)
    if args.child == "in_memory":
        pick = in_memory_pick(len(x_all), args.budget, args.size)
        x_all, y_all = torch.from_numpy(np.asarray(x_all.subset(pick))), y_all[pick]
    torch.manual_seed(0)
    m = create_model("smallervggnet", num_classes=10, in_channels=3, img_size=args.size)
    m = m.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(2)

    def steps(n: int) -> float:
        perm = torch.randperm(len(y_all), generator=g)
        t = time.time()
        batches = epoch_batches(x_all, y_all, perm, args.batch, n, pre, None, g, prefetch=True)
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        batches.close()
        return args.batch * n / (time.time() - t)

    steps(2)  # warm-up: allocator, kernels
    model_rss = rss_anon_mb()
    rss = PeakRss()
    rate = steps(args.steps)
    rss.stop()
    print(json.dumps({"img_s": rate, "model_rss_anon_mb": model_rss, "peak_rss_anon_mb": rss.peak}))


def worker_pids() -> list[int]:
    """Processes titled ``ray::RayTrainWorker`` (Ray Train's per-rank actors)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def rss_anon_of(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class WorkerRss:
    """RssAnon of every Ray Train worker process alive while it runs, sampled every 50 ms."""

    def __init__(self) -> None:
        self.samples: dict[int, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in worker_pids():
                mb = rss_anon_of(pid)
                if mb is not None:
                    self.samples.setdefault(pid, []).append((time.time(), mb))

    def stop(self, phases: dict[str, float]) -> list[dict[str, float]]:
        """Per worker (by peak): the peak overall and within each phase (name -> start time)."""
        self._stop.set()
        self._t.join()
        bounds = sorted(phases.items(), key=lambda kv: kv[1]) + [("", float("inf"))]
        out = []
        for xs in self.samples.values():
            w = {"peak": round(max(mb for _, mb in xs), 1)}
            for (name, t0), (_, t1) in zip(bounds, bounds[1:]):
                w[name] = round(max((mb for t, mb in xs if t0 <= t < t1), default=float("nan")), 1)
            out.append(w)
        return sorted(out, key=lambda w: w["peak"])


def log_times(train_log: Path) -> dict[str, float]:
    """When each phase of a run began, from train.log's timestamps (local time, as time.time())."""
    from datetime import datetime

    marks = {"data": "data ", "train": "split: ", "finish": "epoch 1/"}
    out: dict[str, float] = {}
    for ln in train_log.read_text().splitlines():
        for name, text in marks.items():
            if name not in out and f" INFO {text}" in ln:
                out[name] = datetime.strptime(ln[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    out["data"] = 0.0  # the worker's start (Ray, torch, the source index) counts as data set-up
    return out


def coverage(rows_dir: Path, n_train: int, batch: int, world: int, epoch: int = 1) -> dict[str, Any]:
    """How often each training row was read by any rank in ``epoch`` (from IMGCLF_DEBUG_ROWS files)."""
    parts = [np.fromfile(rows_dir / f"epoch-{epoch}-rank-{r}.i64", dtype=np.int64) for r in range(world)]
    counts = np.bincount(np.concatenate(parts), minlength=n_train)
    steps = n_train // batch
    sets = [set(p.tolist()) for p in parts]
    return {
        "train_rows": n_train,
        "rows_per_rank": [len(p) for p in parts],
        "read_once": int((counts == 1).sum()),
        "read_twice_or_more": int((counts > 1).sum()),
        "not_read": int((counts == 0).sum()),
        "dropped_partial_batch": n_train - steps * batch,
        "ranks_disjoint": not set.intersection(*sets) if world > 1 else True,
    }


def ray_part(args: argparse.Namespace) -> int:
    """Two Ray workers on two local nodes: per-worker RssAnon streaming vs in memory, and coverage."""
    import ray
    from ray.cluster_utils import Cluster

    from imgclf.training.api import train
    from imgclf.training.config import TrainConfig

    tmp = Path(tempfile.mkdtemp(prefix="imgclf-scale-ray-"))
    cache = args.cache_dir or str(tmp / "cache")
    row_mb = args.size * args.size * 3 / 2**20
    # The buffer is a quarter of the training rows alone.
    budget = round(args.ray_subset * row_mb / 4, 1)
    res: dict[str, Any] = {"cpu": cpu_flags(), "load_avg_start": os.getloadavg(), "size": args.size,
                           "subset": args.ray_subset, "batch": args.batch, "memory_budget_mb": budget,
                           "nodes": "2 local (Cluster), 1 CPU each", "workers": 2}  # fmt: skip
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    os.environ["IMGCLF_DEBUG_ROWS"] = "1"
    try:
        for mode in ("auto", "off"):
            cfg = TrainConfig(
                data="fashion-mnist", model="lenet", img_size=args.size, channels=3, epochs=1,
                subset=args.ray_subset, batch_size=args.batch, tensorboard=False, threads=1,
                cache_dir=cache, stream=mode, memory_budget_mb=budget, out=str(tmp / f"run-{mode}"),
                ray_workers=2, ood_score="none",
            )  # fmt: skip
            rss = WorkerRss()
            t0 = time.time()
            r = train(cfg, progress=False)
            key = "stream" if mode == "auto" else "in_memory"
            res[f"{key}_wall_s"] = round(time.time() - t0, 1)
            res[f"{key}_worker_rss_anon_mb"] = rss.stop(log_times(r.run_dir / "train.log"))
            res[f"{key}_test_accuracy"] = round(r.metrics["test_accuracy"], 4)
            res[f"{key}_log"] = next(
                ln.split(" INFO ", 1)[-1] for ln in (r.run_dir / "train.log").read_text().splitlines()
                if "data: " in ln
            )  # fmt: skip
            splits = json.loads((r.run_dir / "splits.json").read_text())
            n_train = len(splits["train"])
            res["train_images"] = n_train
            res["decoded_mb_all_splits"] = round(sum(len(v) for v in splits.values()) * row_mb, 1)
            res["decoded_mb_train"] = round(n_train * row_mb, 1)
            res[f"{key}_coverage"] = coverage(r.run_dir / "rows", n_train, args.batch, 2)
    finally:
        os.environ.pop("IMGCLF_DEBUG_ROWS", None)
        ray.shutdown()
        cluster.shutdown()
    res["load_avg_end"] = os.getloadavg()
    res["note"] = (
        "worker_rss_anon_mb: per ray::RayTrainWorker process, the highest RssAnon (anonymous memory: "
        "not the page cache the memory-mapped shards live in), sampled every 50 ms by the driver, overall "
        "(peak) and per phase: data (worker start to the split line: Ray, torch, the source's index, "
        "decoding), train (the epoch and rank 0's validation), finish (rank 0: evaluation of val and "
        "test, bundle, plot; rank 1 waits), split by rank 0's train.log. Ranks are not told apart: "
        "rank 0 evaluates 256-image batches, so it is taken to be the larger. coverage: rows of the "
        "training split read in epoch 1 by both ranks together; the trainer drops the last partial "
        "global batch (dropped_partial_batch rows, a different set each epoch), as in one process."
    )
    c = res["stream_coverage"]
    rows = [
        ("data", f"{res['train_images']:,} training images at {args.size}x{args.size}x3 = "
                 f"{res['decoded_mb_train']:.0f} MB ({res['decoded_mb_all_splits']:.0f} MB all splits)"),
        ("per-worker buffer", f"{budget:.0f} MB (memory_budget_mb)"),
        ("stream: auto (store)", f"{res['stream_log']}"),
        ("  worker RssAnon MB", f"{res['stream_worker_rss_anon_mb']}, {res['stream_wall_s']} s"),
        ("stream: off (in memory) MB", f"{res['in_memory_worker_rss_anon_mb']}, {res['in_memory_wall_s']} s"),
        ("coverage epoch 1", f"{c['read_once']:,} read once, {c['read_twice_or_more']} twice+, "
                             f"{c['not_read']} not read ({c['dropped_partial_batch']} = partial batch)"),
        ("test accuracy stream / memory", f"{res['stream_test_accuracy']} / "
                                          f"{res['in_memory_test_accuracy']}"),
        ("load average", f"{res['load_avg_start']} -> {res['load_avg_end']}"),
    ]  # fmt: skip
    for a, b in rows:
        print(f"{a:<32}{b}")
    print(res["cpu"])
    name = "scale_ray.json" if args.ray_subset == 16000 else f"scale_ray_{args.ray_subset}.json"
    out = ROOT / "bench" / "results" / name
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one copy of the 60,000 training images (~1.6 GB)")
    ap.add_argument("--repeat", type=int, default=1, help="repeat the images this many times (distinct rows)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="training steps per segment")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved segments per mode")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None, help="store location (default: a fresh temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    ap.add_argument("--ray", action="store_true", help="two Ray workers on two local nodes (see above)")
    ap.add_argument("--ray-subset", type=int, default=16000, help="--ray: training images")
    ap.add_argument("--child", choices=("streaming", "in_memory"), help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ray:
        if args.size == 96:
            args.size = 48  # LeNet's epoch stays short on shared cores
        return ray_part(args)
    if args.child:
        child(args)
        return 0
    torch.set_num_threads(args.threads)

    import imgclf.models  # noqa: F401  (registers the architectures)
    from imgclf.core.preprocess import Preprocess
    from imgclf.data import sources as D
    from imgclf.data import store as S
    from imgclf.training.trainer import make_batch

    cache = args.cache_dir or tempfile.mkdtemp(prefix="imgclf-scale-")
    rss = PeakRss()
    base_rss = rss_anon_mb()
    pre = Preprocess((args.size, args.size), 3)
    index = D.index_source("fashion-mnist")
    train_idx = np.flatnonzero(index.split == "train")
    res: dict[str, Any] = {
        "cpu": cpu_flags(),
        "threads": args.threads,
        "batch": args.batch,
        "cache_dir": cache,
    }

    # 1. decode into the store (repeats as distinct rows written straight from the decoded arrays)
    t0 = time.time()
    dec = S.build_store(index, train_idx, pre, cache_dir=cache, progress=False, shard_mb=256)
    res["build_s"] = round(time.time() - t0, 1)
    arr = dec.images
    labels = dec.labels
    if args.repeat > 1:
        base = dec.images  # each repeat copies the original rows once (not the growing array)
        for r in range(1, args.repeat):
            keys = [f"repeat{r}:{i}" for i in range(len(base))]
            rows = (base[i] for i in range(len(base)))
            more = S.store_arrays(keys, rows, pre, cache_dir=cache)
            arr = S.StoreArray(
                more.files,
                more.counts,
                more.row_shape,
                np.concatenate([arr.shard_of, more.shard_of]),
                np.concatenate([arr.row_of, more.row_of]),
            )
            labels = np.concatenate([labels, dec.labels])
        res["build_s"] = round(time.time() - t0, 1)
    res["build_peak_rss_anon_mb"] = round(rss.reset(), 1)
    t0 = time.time()
    S.build_store(index, train_idx, pre, cache_dir=cache, progress=False)
    res["reopen_s"] = round(time.time() - t0, 2)
    info = S.store_info(cache)["stores"][0]
    res.update(
        images=len(arr),
        decoded_mb=round(arr.nbytes / 2**20, 1),
        store_disk_mb=round(info["bytes"] / 2**20, 1),
    )
    res["shards"] = info["shards"]

    # 2. the plan with a buffer of a third of the data
    budget = res["decoded_mb"] / 3
    plan = S.plan_storage(len(arr), pre, "auto", budget)
    res.update(
        memory_budget_mb=round(budget, 1), plan=("stream" if plan.stream else "memory") + f": {plan.reason}"
    )

    # 3. the data path alone, streaming first (nothing else in memory), then an in-memory subset
    def data_rate(x_all: Any, y_all: torch.Tensor, n_batches: int) -> float:
        g = torch.Generator().manual_seed(1)
        t = time.time()
        for _ in range(n_batches):
            make_batch(
                x_all, y_all, torch.randint(0, len(y_all), (args.batch,), generator=g), pre, None, None
            )
        return args.batch * n_batches / (time.time() - t)

    st_y = torch.from_numpy(labels)
    rss.reset()
    arr.drop_page_cache()
    res["data_path_stream_cold_img_s"] = round(data_rate(arr, st_y, 100), 0)
    res["data_path_stream_warm_img_s"] = round(data_rate(arr, st_y, 100), 0)
    res["data_path_stream_peak_rss_anon_mb"] = round(rss.reset(), 1)
    pick = in_memory_pick(len(arr), budget, args.size)
    mem_x = torch.from_numpy(np.asarray(arr.subset(pick)))
    res["data_path_in_memory_img_s"] = round(data_rate(mem_x, torch.from_numpy(labels[pick]), 100), 0)
    res["in_memory_images"] = len(pick)
    res["in_memory_mb"] = round(mem_x.numel() / 2**20, 1)
    del mem_x
    rss.stop()

    # 4. training, one child process per segment (so each one's RssAnon is its own), alternating
    arr.drop_page_cache()  # streaming starts cold: its pages come from disk as training reads them
    runs: dict[str, list[dict[str, float]]] = {"streaming": [], "in_memory": []}
    for _ in range(args.rounds):
        for mode in runs:
            cmd = [sys.executable, __file__, "--child", mode, "--cache-dir", cache, "--budget", str(budget)]
            cmd += ["--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps)]
            cmd += ["--threads", str(args.threads), "--repeat", str(args.repeat)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    for mode, rs in runs.items():
        key = "streaming" if mode == "streaming" else "in_memory"
        res[f"{key}_img_s"] = round(st.median(r["img_s"] for r in rs), 2)
        res[f"{key}_segments_img_s"] = [round(r["img_s"], 2) for r in rs]
        res[f"{key}_model_rss_anon_mb"] = round(st.median(r["model_rss_anon_mb"] for r in rs), 1)
        res[f"{key}_peak_rss_anon_mb"] = round(max(r["peak_rss_anon_mb"] for r in rs), 1)
    res["peak_rss_anon_mb"] = res["streaming_peak_rss_anon_mb"]
    res["ratio"] = round(res["streaming_img_s"] / res["in_memory_img_s"], 3)
    res["baseline_rss_anon_mb"] = round(base_rss, 1)
    res["note"] = (
        "peak_rss_anon_mb: a streaming training process (python + torch + SmallerVGGNet, its optimizer "
        "and activations, plus the batches); *_model_rss_anon_mb: the same process after model, optimizer "
        "and 2 warm-up steps, before the timed steps. The buffer bounds the decoded images held in memory."
    )

    r = res
    rows = [
        ("images / decoded", f"{r['images']:,} x {args.size}x{args.size}x3 = {r['decoded_mb']:,.0f} MB"),
        ("store on disk", f"{r['store_disk_mb']:,.0f} MB, {r['shards']} shards, built in {r['build_s']} s"),
        ("next run (index + hashes)", f"{r['reopen_s']} s"),
        ("memory budget / plan", f"{r['memory_budget_mb']:.0f} MB / {r['plan']}"),
        ("RssAnon build / data path", f"{r['build_peak_rss_anon_mb']:.0f} / {r['data_path_stream_peak_rss_anon_mb']:.0f} MB"),  # noqa: E501
        ("RssAnon train stream", f"{r['streaming_model_rss_anon_mb']:.0f} model, {r['peak_rss_anon_mb']:.0f} peak MB"),  # noqa: E501
        ("RssAnon train in memory", f"{r['in_memory_model_rss_anon_mb']:.0f} model, {r['in_memory_peak_rss_anon_mb']:.0f} peak MB"),  # noqa: E501
        ("data path stream cold / warm", f"{r['data_path_stream_cold_img_s']:,.0f} / {r['data_path_stream_warm_img_s']:,.0f} img/s"),  # noqa: E501
        ("data path in memory", f"{r['data_path_in_memory_img_s']:,.0f} img/s"),
        ("train streaming", f"{r['streaming_img_s']} img/s {r['streaming_segments_img_s']}"),
        ("train in memory", f"{r['in_memory_img_s']} img/s {r['in_memory_segments_img_s']} ({r['in_memory_images']:,} img)"),  # noqa: E501
        ("streaming / in memory", f"{r['ratio']}"),
    ]  # fmt: skip
    for a, b in rows:
        print(f"{a:<32}{b}")
    print(res["cpu"])
    out = ROOT / "bench" / "results" / ("scale_quick.json" if args.quick else "scale.json")
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    if not args.cache_dir and not args.keep:
        shutil.rmtree(cache, ignore_errors=True)  # the bench's own temporary cache, arrays still open
    return 0


if __name__ == "__main__":
    sys.exit(main())
