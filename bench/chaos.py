"""Kill -9 training at random moments, resume each time, and compare with an uninterrupted run.

One uninterrupted reference run, then ``--kills`` killed runs: each is started with
``imgclf train``, killed with SIGKILL at a random moment (before the first checkpoint too),
then continued with ``imgclf train --resume`` (killed again while kills remain) until it
finishes. Reported per run: kills survived, epochs lost (epochs the kill threw away), whether
the learning-rate trace equals the reference's, final test accuracy against the reference, and
whether every file in the run folder still reads (JSON, safetensors, the bundle). All runs use
one thread, so an interrupted run can match the reference exactly.

  python bench/chaos.py --kills 20            # ~10 min on 2 cores
  python bench/chaos.py --kills 3 --quick     # a minute
  python bench/chaos.py --server --soak 300   # the server under hostile clients, 5 min
  python bench/chaos.py --server --ab /tmp/old --rounds 3 --soak 30 --idle 15  # A/B two checkouts

Server mode: ``imgclf serve`` (default options) in its own process; two normal clients post one
real photo each in a loop from 127.0.0.1. Phases: idle; "flood" (the issue's case: one hostile
client posting 64 PNGs in one 8 MB request, together just under the 200 MP request budget, so
every image is decoded); "all" (the flood, plus a client opening connections that send half a
body and stall, plus one calling /v1/explain on a 9 MP PNG); idle again. Each hostile client is
its own process on its own loopback address (127.0.0.2-4), so its CPU work does not hold the
normal clients' GIL and the server can tell it apart. Reported per phase: normal p50/p99 and
the 1-minute load average (other people's jobs share the machine); overall 5xx count, RSS at
start and end, and the CPU model and vector flags.

A/B (``--server --ab DIR``): this checkout's server against the one in DIR (another commit,
e.g. ``git archive COMMIT | tar -x -C DIR``), each round running an idle then a flood phase on a
fresh server of each, in alternating order (A B, B A, ...), so background load from other jobs
hits both alike; reported per round and as medians: normal p99 idle and under the flood, their
ratio, the flood client's own throughput (images/s), a bulk client's throughput alone (64-image
requests of photos, where inference dominates, and of the flood's PNGs) and the load average.

Writes bench/results/chaos.json (server mode: chaos_server.json, A/B: chaos_server_ab.json) and
prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))


def imgclf_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgclf", *args]


def train_args(out: Path, quick: bool) -> list[str]:
    data = (
        ["--data", "digits", "--epochs", "4"]
        if quick
        else ["--data", "mnist", "--subset", "6000", "--epochs", "6"]
    )
    return [
        "train",
        *data,
        "--model",
        "lenet",
        "--threads",
        "1",
        "--no-tensorboard",
        "--no-progress",
        "--out",
        str(out),
    ]


def lr_trace(run: Path) -> list[float]:
    with open(run / "history.csv") as f:
        return [float(r["lr"]) for r in csv.DictReader(f)]


def epochs_done(run: Path) -> int:
    try:
        from safetensors import safe_open

        with safe_open(str(run / "checkpoints" / "last.safetensors"), framework="pt") as f:
            return int(json.loads(f.metadata()["state"])["epoch"])
    except Exception:  # no checkpoint yet, or one being replaced: nothing completed that we can see
        return 0


def files_intact(run: Path) -> list[str]:
    """Names of files in the run folder that do not read back (empty list = all fine)."""
    from safetensors.torch import load_file

    import imgclf

    bad = []
    for p in run.rglob("*"):
        if not p.is_file() or "tensorboard" in p.parts:
            continue
        try:
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".safetensors":
                load_file(str(p))
            elif p.suffix == ".tmp":
                bad.append(f"{p.name} (stale temporary)")
        except Exception as e:
            bad.append(f"{p.relative_to(run)} ({type(e).__name__})")
    try:
        imgclf.load(run)
    except Exception as e:
        bad.append(f"bundle ({e})")
    return bad


def run_to_end(out: Path, quick: bool, kills: int, rng: random.Random, window: float, env: dict) -> dict:
    killed, kept = 0, []
    cmd = first = imgclf_cmd(*train_args(out, quick))
    while True:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if killed < kills:
            time.sleep(rng.uniform(0.5, window))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
                killed += 1
                kept.append(epochs_done(out))  # the resume point: only the epoch in flight is redone
                # Killed before its folder held anything (no config.json yet): start it again, as a
                # user would; everything after that moment is a real resume.
                started = (out / "config.json").exists()
                cmd = imgclf_cmd("train", "--resume", str(out), "--no-progress") if started else first
                continue
        if p.wait() != 0:
            return {"killed": killed, "finished": False}
        if (out / "model" / "model.json").exists():
            break
        cmd = imgclf_cmd("train", "--resume", str(out), "--no-progress")
    m = json.loads((out / "metrics.json").read_text())
    return {
        "killed": killed,
        "finished": True,
        "resumed_from_epochs": kept,
        "test_accuracy": m["test_accuracy"],
    }


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _png(w: int, h: int, seed: int, tile_px: int = 64) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    tile = rng.integers(0, 255, (tile_px, tile_px, 3), dtype=np.uint8)  # compressible but not trivial
    buf = io.BytesIO()
    Image.fromarray(np.tile(tile, (h // tile_px + 1, w // tile_px + 1, 1))[:h, :w]).save(
        buf, format="PNG", compress_level=9
    )
    return buf.getvalue()


def _cpu() -> dict:
    """CPU model, core count and the vector flags that matter for inference speed."""
    info = Path("/proc/cpuinfo").read_text()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?"
    )
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    vec = sorted(f for f in flags if f in ("avx", "avx2", "fma", "f16c") or f.startswith("avx512"))
    return {"model": model, "cores": os.cpu_count(), "flags": vec}


def _hostile(kind: str, url: str, payload: bytes, source: str, stop, results) -> None:
    """One hostile client in its own process (its CPU work does not hold the normal clients' GIL),
    connecting from its own loopback address (the server tells clients apart by address)."""
    import socket
    import threading

    import httpx

    statuses: list[int] = []
    seconds: list[float] = []  # per finished request (the flood's bulk throughput)
    port = int(url.rsplit(":", 1)[1])
    transport = httpx.HTTPTransport(local_address=source)

    def flood() -> None:
        # The hostile client: 64 images in one ~8 MB request, just under the request's
        # pixel budget, so the server accepts and decodes every one of them.
        files = [("f", (f"{i}.png", payload, "image/png")) for i in range(64)]
        with httpx.Client(timeout=120, transport=transport) as c:
            while not stop.is_set():
                t = time.perf_counter()
                statuses.append(c.post(url + "/v1/predict", files=files).status_code)
                seconds.append(time.perf_counter() - t)

    def slow() -> None:
        # Connections that send half a body and stall (each refused with 408 after 30 s).
        conns = []
        while not stop.is_set():
            s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
            s.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + payload[:500]
            )
            conns.append(s)
            stop.wait(5)
        for s in conns:
            s.close()

    def explain() -> None:
        with httpx.Client(timeout=120, transport=transport) as c:
            while not stop.is_set():
                statuses.append(c.post(url + "/v1/explain", content=payload).status_code)

    t = threading.Thread(target={"flood": flood, "slow": slow, "explain": explain}[kind])
    t.start()
    t.join()
    results.put((kind, statuses, seconds))


def _p99(x: list[float]) -> float:
    return sorted(x)[int(0.99 * (len(x) - 1))] * 1000 if x else float("nan")


def _p50(x: list[float]) -> float:
    return sorted(x)[len(x) // 2] * 1000 if x else float("nan")


class _Bench:
    """The server bench's pieces: a trained model, payloads, servers from a checkout, phases."""

    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="imgclf-soak-"))
        self.env = dict(os.environ, IMGCLF_DATA_DIR=str(SHARED), IMGCLF_CACHE_DIR=str(self.work / "cache"))
        sign = SHARED / "sign-language-digits"
        args = "--model smallervggnet --img-size 64 --epochs 1 --subset 300 --no-tensorboard --no-progress"
        cmd = imgclf_cmd("train", "--data", str(sign), *args.split(), "--out", str(self.work / "run"))
        subprocess.run(cmd, env={**self.env, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
        self.photo = next((sign / "3").iterdir()).read_bytes()
        self.side = int((200_000_000 / 64) ** 0.5) - 2  # 64 of them just under the 200 MP budget
        # A 16-pixel tile makes each 3.1 MP PNG 125 kB: the 64 of them are the 8 MB request.
        self.payloads = {
            "flood": _png(self.side, self.side, 1, tile_px=16),
            "slow": self.photo,
            "explain": _png(3000, 3000, 2),
        }

    def start(self, root: Path) -> tuple[subprocess.Popen, str, list[str]]:
        """``imgclf serve`` (default options) from the checkout at ``root``; waits until healthy."""
        import httpx

        port = 18000 + random.randint(0, 999)
        serve_cmd = imgclf_cmd("serve", str(self.work / "run"), "--port", str(port), "--log-level", "error")
        srv = subprocess.Popen(serve_cmd, env={**self.env, "PYTHONPATH": str(root)})
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        return srv, url, serve_cmd

    def phase(self, url: str, seconds: float, hostile: list[str]) -> dict:
        """Two normal clients for ``seconds`` while ``hostile`` clients run; one phase's figures."""
        import multiprocessing as mp
        import threading

        import httpx

        lat: list[float] = []
        statuses: list[int] = []
        stop = threading.Event()

        def normal() -> None:
            with httpx.Client(timeout=60) as c:  # from 127.0.0.1
                while not stop.is_set():
                    t = time.perf_counter()
                    r = c.post(url + "/v1/predict", content=self.photo)
                    lat.append(time.perf_counter() - t)
                    statuses.append(r.status_code)

        ctx = mp.get_context("fork")
        hstop, results = ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(target=_hostile, args=(k, url, self.payloads[k], f"127.0.0.{i + 2}", hstop, results))
            for i, k in enumerate(hostile)
        ]
        for p in procs:
            p.start()
        time.sleep(2 if hostile else 0)  # let the attack get going before measuring
        threads = [threading.Thread(target=normal) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        load = os.getloadavg()[0]
        hstop.set()
        got = {}
        flood_s: list[float] = []
        for _ in procs:
            kind, st, secs = results.get(timeout=180)
            got[kind] = st
            flood_s += secs if kind == "flood" else []
        for p in procs:
            p.join(timeout=60)
        ok = sum(s == 200 for s in got.get("flood", []))
        return {
            "hostile": hostile,
            "seconds": seconds,
            "normal_requests": len(lat),
            "normal_p50_ms": _p50(lat),
            "normal_p99_ms": _p99(lat),
            "hostile_status_counts": {
                k: {str(c): v.count(c) for c in sorted(set(v))} for k, v in got.items()
            },
            # The bulk client's own throughput: images answered per second of its requests.
            "flood_images_per_s": 64 * ok / sum(flood_s) if flood_s else None,
            "flood_request_s_median": sorted(flood_s)[len(flood_s) // 2] if flood_s else None,
            "load_average_1min_at_end": load,
            "statuses": statuses + [c for v in got.values() for c in v],
        }

    def bulk_alone(self, url: str) -> dict:
        """A bulk client alone (no other requests): images/s over 64-image requests of the flood's
        3.1 MP PNGs (decoding dominates) and of the 100x100 photo (inference dominates)."""
        import httpx

        out = {}
        with httpx.Client(timeout=300) as c:
            for name, payload, n in (
                ("photo_64", self.photo, 6),
                ("flood_png_64", self.payloads["flood"], 2),
            ):
                files = [("f", (f"{i}.img", payload, "application/octet-stream")) for i in range(64)]
                c.post(url + "/v1/predict", files=files)  # warm-up
                t = time.perf_counter()
                ok = sum(c.post(url + "/v1/predict", files=files).status_code == 200 for _ in range(n))
                out[name] = 64 * ok / (time.perf_counter() - t)
        return out


def server_soak(soak: float, out: Path, idle_s: float) -> None:
    bench = _Bench()
    srv, url, serve_cmd = bench.start(ROOT)
    rss0 = _rss_mb(srv.pid)
    load0 = os.getloadavg()[0]
    phases = {}
    statuses: list[int] = []
    for name, hostile, secs in [
        ("idle", [], idle_s),
        ("flood", ["flood"], soak),
        ("all", ["flood", "slow", "explain"], soak),
        ("idle_after", [], idle_s),
    ]:
        ph = bench.phase(url, secs, hostile)
        statuses += ph.pop("statuses")
        # Per phase: a plateau is one-time growth (arenas, warm-up), a steady rise a leak.
        ph["rss_mb_after"] = _rss_mb(srv.pid)
        phases[name] = ph
        print(
            f"{name}: normal p99 {ph['normal_p99_ms']:.0f} ms, {ph['normal_requests']} requests; hostile "
            f"{ph['hostile_status_counts']}; load {ph['load_average_1min_at_end']:.1f}; "
            f"RSS {ph['rss_mb_after']:.0f} MB",
            flush=True,
        )
    time.sleep(3)
    rss1 = _rss_mb(srv.pid)
    srv.send_signal(signal.SIGINT)
    srv.wait(timeout=60)
    idle = min(phases["idle"]["normal_p99_ms"], phases["idle_after"]["normal_p99_ms"])
    res = {
        "command": f"python bench/chaos.py --server --soak {soak:g} --idle {idle_s:g}",
        "server": " ".join(["imgclf", *serve_cmd[3:]]) + "  (all other options at their defaults)",
        "flood_request": {"images": 64, "side_px": bench.side, "bytes": 64 * len(bench.payloads["flood"])},
        "explain_image": {"side_px": 3000, "bytes": len(bench.payloads["explain"])},
        "soak_s": soak,
        "phases": phases,
        "requests": len(statuses),
        "status_counts": {str(k): statuses.count(k) for k in sorted(set(statuses))},
        "5xx": sum(s >= 500 for s in statuses),
        "normal_p99_ms_idle": idle,
        "normal_p99_ms_flood": phases["flood"]["normal_p99_ms"],
        "normal_p99_ms_under_attack": phases["all"]["normal_p99_ms"],
        "p99_ratio_flood": phases["flood"]["normal_p99_ms"] / idle,
        "p99_ratio": phases["all"]["normal_p99_ms"] / idle,
        "rss_mb_start": rss0,
        "rss_mb_end": rss1,
        "rss_ratio": rss1 / rss0,
        "load_average_1min_at_start": load0,
        "cpu": _cpu(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print("| phase | hostile clients | normal requests | p50 ms | p99 ms | p99 / idle p99 | load (1 min) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, ph in phases.items():
        print(
            f"| {name} | {', '.join(ph['hostile']) or '-'} | {ph['normal_requests']} | "
            f"{ph['normal_p50_ms']:.0f} | {ph['normal_p99_ms']:.0f} | {ph['normal_p99_ms'] / idle:.2f} | "
            f"{ph['load_average_1min_at_end']:.1f} |"
        )
    print(
        f"5xx {res['5xx']}; RSS {rss0:.0f} -> {rss1:.0f} MB; status counts {res['status_counts']}; "
        f"idle p99 = the lower of the two idle phases; wrote {out}"
    )


def server_ab(other: Path, rounds: int, soak: float, idle_s: float, out: Path) -> None:
    """This checkout's server against the one at ``other``, alternating (A B, B A, ...): each
    round and server runs an idle phase then a flood phase on a fresh server, so both meet the
    same background load; the flood/idle p99 ratio is taken within one server's round."""
    bench = _Bench()
    servers = {"this": ROOT, "other": other.resolve()}
    rows = []
    for r in range(rounds):
        for name in ("this", "other") if r % 2 == 0 else ("other", "this"):
            srv, url, _ = bench.start(servers[name])
            idle = bench.phase(url, idle_s, [])
            flood = bench.phase(url, soak, ["flood"])
            alone = bench.bulk_alone(url)
            load_alone = os.getloadavg()[0]
            srv.send_signal(signal.SIGINT)
            srv.wait(timeout=60)
            statuses = idle.pop("statuses") + flood.pop("statuses")
            row = {
                "round": r,
                "server": name,
                "idle_p50_ms": idle["normal_p50_ms"],
                "idle_p99_ms": idle["normal_p99_ms"],
                "flood_p50_ms": flood["normal_p50_ms"],
                "flood_p99_ms": flood["normal_p99_ms"],
                "ratio": flood["normal_p99_ms"] / idle["normal_p99_ms"],
                "normal_requests": idle["normal_requests"] + flood["normal_requests"],
                "flood_requests_ok": flood["hostile_status_counts"].get("flood", {}).get("200", 0),
                "flood_images_per_s": flood["flood_images_per_s"],
                "bulk_alone_photo_images_per_s": alone["photo_64"],
                "bulk_alone_png_images_per_s": alone["flood_png_64"],
                "load_idle": idle["load_average_1min_at_end"],
                "load_flood": flood["load_average_1min_at_end"],
                "load_bulk_alone": load_alone,
                "5xx": sum(s >= 500 for s in statuses),
            }
            rows.append(row)
            print(
                f"round {r} {name:5s}: idle p99 {row['idle_p99_ms']:.0f} ms, flood p50/p99 "
                f"{row['flood_p50_ms']:.0f}/{row['flood_p99_ms']:.0f} ms, ratio {row['ratio']:.2f}x, "
                f"bulk {row['flood_images_per_s'] or 0:.1f} img/s (alone: photos "
                f"{row['bulk_alone_photo_images_per_s']:.0f}, "
                f"PNGs {row['bulk_alone_png_images_per_s']:.1f}), "
                f"load {row['load_idle']:.1f}/{row['load_flood']:.1f}/{row['load_bulk_alone']:.1f}, "
                f"5xx {row['5xx']}",
                flush=True,
            )

    def med(name: str, key: str) -> float:
        v = sorted(x[key] for x in rows if x["server"] == name and x[key] is not None)
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    keys = (
        "idle_p99_ms",
        "flood_p50_ms",
        "flood_p99_ms",
        "ratio",
        "flood_images_per_s",
        "bulk_alone_photo_images_per_s",
        "bulk_alone_png_images_per_s",
    )
    summary = {name: {k: med(name, k) for k in keys} for name in servers}
    res = {
        "command": f"python bench/chaos.py --server --ab {other} --rounds {rounds} --soak {soak:g} "
        f"--idle {idle_s:g}",
        "servers": {k: str(v) for k, v in servers.items()},
        "rows": rows,
        "median": summary,
        "cpu": _cpu(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(
        "| server | idle p99 ms | flood p50 ms | flood p99 ms | flood p99 / idle p99 | flood img/s | "
        "bulk alone img/s: photos / PNGs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in summary.items():
        print(
            f"| {name} ({servers[name]}) | {m['idle_p99_ms']:.0f} | {m['flood_p50_ms']:.0f} | "
            f"{m['flood_p99_ms']:.0f} | {m['ratio']:.2f}x | {m['flood_images_per_s']:.1f} | "
            f"{m['bulk_alone_photo_images_per_s']:.0f} / {m['bulk_alone_png_images_per_s']:.1f} |"
        )
    print(f"medians over {rounds} rounds; wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="killed runs (each killed 1-3 times)")
    ap.add_argument("--quick", action="store_true", help="digits instead of an MNIST subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server", action="store_true", help="the server soak with hostile clients instead")
    ap.add_argument("--soak", type=float, default=60.0, help="server mode: seconds of each attack phase")
    ap.add_argument("--idle", type=float, default=20.0, help="server mode: seconds of each idle phase")
    ap.add_argument(
        "--ab",
        type=Path,
        default=None,
        metavar="DIR",
        help="server mode: alternate this checkout's server with the one at DIR (e.g. `git archive "
        "COMMIT | tar -x -C DIR`), idle then flood phases only, and compare",
    )
    ap.add_argument("--rounds", type=int, default=3, help="--ab: rounds (each runs both servers)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.server and a.ab:
        server_ab(
            a.ab, a.rounds, a.soak, a.idle, a.out or ROOT / "bench" / "results" / "chaos_server_ab.json"
        )
        return
    if a.server:
        server_soak(a.soak, a.out or ROOT / "bench" / "results" / "chaos_server.json", a.idle)
        return
    a.out = a.out or ROOT / "bench" / "results" / "chaos.json"
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="imgclf-chaos-"))
    env = dict(
        os.environ, IMGCLF_DATA_DIR=str(SHARED), IMGCLF_CACHE_DIR=str(work / "cache"), PYTHONPATH=str(ROOT)
    )
    t0 = time.time()
    subprocess.run(imgclf_cmd(*train_args(work / "ref", a.quick)), env=env, check=True, capture_output=True)
    ref_time = time.time() - t0
    ref_lr = lr_trace(work / "ref")
    ref_acc = json.loads((work / "ref" / "metrics.json").read_text())["test_accuracy"]
    rows = []
    for i in range(a.kills):
        out = work / f"k{i}"
        r = run_to_end(out, a.quick, rng.randint(1, 3), rng, ref_time * 0.9, env)
        if r["finished"]:
            r["lr_trace_identical"] = lr_trace(out) == ref_lr
            r["bad_files"] = files_intact(out)
        rows.append(r)
        print(
            f"run {i}: killed {r['killed']}x, finished {r['finished']}, "
            f"acc {r.get('test_accuracy', float('nan')):.4f} (ref {ref_acc:.4f}), "
            f"lr identical {r.get('lr_trace_identical')}, bad files {r.get('bad_files')}",
            flush=True,
        )
    done = [r for r in rows if r["finished"]]
    summary = {
        "runs": len(rows),
        "kills": sum(r["killed"] for r in rows),
        "unrecoverable_runs": len(rows) - len(done),
        "runs_with_corrupt_files": sum(bool(r["bad_files"]) for r in done),
        "lr_trace_identical": sum(r["lr_trace_identical"] for r in done),
        "reference_test_accuracy": ref_acc,
        "resumed_test_accuracy_min": min((r["test_accuracy"] for r in done), default=None),
        "resumed_test_accuracy_max": max((r["test_accuracy"] for r in done), default=None),
        "seconds": round(time.time() - t0),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"summary": summary, "runs": rows, "quick": a.quick}, indent=2) + "\n")
    cols = [
        "runs",
        "kills",
        "unrecoverable",
        "corrupt files",
        "lr trace identical",
        "test acc ref",
        "resumed",
    ]
    lo, hi = summary["resumed_test_accuracy_min"] or 0.0, summary["resumed_test_accuracy_max"] or 0.0
    vals = [
        summary["runs"],
        summary["kills"],
        summary["unrecoverable_runs"],
        summary["runs_with_corrupt_files"],
    ]
    vals += [f"{summary['lr_trace_identical']}/{len(done)}", f"{ref_acc:.4f}", f"{lo:.4f}-{hi:.4f}"]
    print(
        "\n| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|\n| " + " | ".join(map(str, vals)) + " |"
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
