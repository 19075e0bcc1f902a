"""Load test for `imgclf serve`: dynamic batching on vs --max-batch 1, side by side, on loopback.

Starts two real servers (`python -m imgclf serve`) on free 127.0.0.1 ports, one batching
(--max-batch 32 --max-wait-ms 5) and one not (--max-batch 1). For each concurrency level it loads
both back to back (so background load on a shared machine hits both alike), with a bounded
number of requests and a time cap per run. Then it soaks the batching server and samples its RSS.

    python bench/serve_load.py                      # untrained SmallerVGGNet at 96x96, 60 s soak
    python bench/serve_load.py --bundle runs/x/model --soak 300

Throughput does not depend on the weights, so without --bundle an untrained SmallerVGGNet
bundle (96x96x3, 10 classes) is written to a temp folder. Writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
SIGN = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets")) / "sign-language-digits"
HOST = "127.0.0.1"  # loopback only, by design


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def untrained_bundle(dst: Path) -> Path:
    from imgclf.core.preprocess import Preprocess
    from imgclf.models.registry import create_model
    from imgclf.runtime.bundle import save_bundle

    model = create_model("smallervggnet", num_classes=10, in_channels=3, img_size=(96, 96))
    return save_bundle(dst, model, Preprocess(size=(96, 96), channels=3), [str(i) for i in range(10)])


def rss_mb(pid: int) -> float:
    """Resident set size of a process from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, bundle: Path, name: str, extra: list[str]) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "imgclf", "serve", str(bundle), "--host", HOST]
        # Every simulated client comes from the one loopback address: no per-address limit.
        cmd += ["--port", str(self.port), "--log-level", "warning", "--max-client-requests", "0", *extra]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"server {name} exited at startup:\n{self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"server {name} did not answer /healthz within 120 s")
            time.sleep(0.2)

    def batch_stats(self) -> tuple[float, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        vals = {}
        for line in text.splitlines():
            if line.startswith(("imgclf_batch_size_sum ", "imgclf_batch_size_count ")):
                k, v = line.split()
                vals[k] = float(v)
        return vals.get("imgclf_batch_size_sum", 0.0), vals.get("imgclf_batch_size_count", 0.0)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # graceful: uvicorn drains, then exits 0
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def build_request(port: int, image: bytes) -> bytes:
    """One keep-alive multipart POST /v1/predict, built once and re-sent as bytes."""
    boundary = "imgclfbench7f3a"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="photo.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request on an open connection; read the whole response; return its status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:"))
    body = await reader.readexactly(length)
    if status == 200 and not body.startswith(b'{"predictions":'):
        return -1
    return status


async def load(url: str, image: bytes, concurrency: int, max_requests: int, max_seconds: float) -> dict:
    """`concurrency` clients, each with its own keep-alive connection sending one request at a
    time, until the request count or the time runs out.

    A bare asyncio HTTP/1.1 client rather than httpx: httpx spent about 6 ms of CPU per request
    here, as much as the server, and on a 2-core machine the load generator would then throttle
    the very arrival rate that batching depends on.
    """
    port = int(url.rsplit(":", 1)[1])
    request = build_request(port, image)
    lat: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    t_end = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal sent
        conn = None
        while sent < max_requests and time.perf_counter() < t_end:
            sent += 1
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(HOST, port)
                status = await asyncio.wait_for(_exchange(*conn, request), 60)
                key = None if status == 200 else f"HTTP {status}"
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                key = type(e).__name__
                if conn is not None:
                    conn[1].close()
                conn = None
            if key is None:
                lat.append(time.perf_counter() - t0)
            else:
                errors[key] = errors.get(key, 0) + 1
        if conn is not None:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    a = np.array(lat) * 1000 if lat else np.array([np.nan])
    return {
        "requests_ok": len(lat),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "rps": round(len(lat) / elapsed, 1),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "max_ms": round(float(np.max(a)), 1),
    }


def run_level(srv: Server, image: bytes, c: int, n: int, secs: float, warmup: int) -> dict:
    asyncio.run(load(srv.url, image, min(c, warmup), warmup, secs))
    s0, n0 = srv.batch_stats()
    res = asyncio.run(load(srv.url, image, c, n, secs))
    s1, n1 = srv.batch_stats()
    res["mean_batch"] = round((s1 - s0) / (n1 - n0), 2) if n1 > n0 else None
    return {"server": srv.name, "concurrency": c, **res}


def soak(srv: Server, image: bytes, seconds: float, concurrency: int) -> dict:
    """Constant load for `seconds`, sampling the server's RSS every ~2 s."""
    samples: list[tuple[float, float]] = []
    total = {"requests_ok": 0, "errors": {}}
    t_start = time.perf_counter()
    bar = tqdm(total=int(seconds), desc=f"soak c={concurrency}", unit="s", leave=False)
    while (elapsed := time.perf_counter() - t_start) < seconds:
        samples.append((round(elapsed, 1), round(rss_mb(srv.proc.pid), 1)))
        chunk = min(2.0, seconds - elapsed)
        r = asyncio.run(load(srv.url, image, concurrency, 10**9, chunk))
        total["requests_ok"] += r["requests_ok"]
        for k, v in r["errors"].items():
            total["errors"][k] = total["errors"].get(k, 0) + v
        bar.update(int(time.perf_counter() - t_start) - bar.n)
    bar.close()
    samples.append((round(time.perf_counter() - t_start, 1), round(rss_mb(srv.proc.pid), 1)))
    rss = [s[1] for s in samples]
    # Compare the last 20% with the 20% after warm-up, to tell growth from start-up allocation.
    k = max(1, len(rss) // 5)
    return {
        "seconds": round(samples[-1][0], 1),
        "concurrency": concurrency,
        **total,
        "rss_mb_first": rss[0],
        "rss_mb_early_mean": round(float(np.mean(rss[k : 2 * k] or rss[:k])), 1),
        "rss_mb_late_mean": round(float(np.mean(rss[-k:])), 1),
        "rss_mb_max": max(rss),
        "samples": samples,
    }


def fmt_row(c: int, a: dict, b: dict) -> str:
    def cell(r: dict) -> str:
        err = sum(r["errors"].values())
        return (
            f"{r['rps']:>7.1f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['mean_batch'] or 0:>5.1f} {err:>4d}"
        )

    speed = a["rps"] / b["rps"] if b["rps"] else float("nan")
    return f"{c:>5d} | {cell(a)} | {cell(b)} | {speed:>5.2f}x"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="bundle folder (default: an untrained SmallerVGGNet at 96x96)")
    p.add_argument("--image", help="image to send (default: a real Sign Language Digits photo)")
    p.add_argument("--concurrency", default="1,8,50", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=600, help="most requests per run")
    p.add_argument("--seconds", type=float, default=20.0, help="most seconds per run")
    p.add_argument("--warmup", type=int, default=20, help="requests sent before each measured run")
    p.add_argument("--max-batch", type=int, default=32, help="--max-batch of the batching server")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="--max-wait-ms of the batching server")
    p.add_argument("--threads", type=int, default=None, help="torch threads per server (default: torch's)")
    p.add_argument("--soak", type=float, default=60.0, help="soak length in seconds (0 = skip)")
    p.add_argument("--soak-concurrency", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = p.parse_args(argv)

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    load_start = os.getloadavg()
    tmp = tempfile.TemporaryDirectory(prefix="imgclf-bench-")
    bundle = Path(args.bundle) if args.bundle else untrained_bundle(Path(tmp.name) / "bundle")
    if args.image:
        image = Path(args.image).read_bytes()
        image_name = args.image
    elif SIGN.exists():
        src = sorted((SIGN / "3").iterdir())[0]
        image, image_name = src.read_bytes(), str(src)
    else:
        raise SystemExit(f"no --image given and {SIGN} not found; pass --image PATH")

    threads = ["--threads", str(args.threads)] if args.threads else []
    batched = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), *threads]
    servers = []
    try:
        print(f"starting servers for {bundle} ...", file=sys.stderr)
        on = Server(bundle, f"batching (max-batch {args.max_batch})", batched)
        servers.append(on)
        off = Server(bundle, "max-batch 1", ["--max-batch", "1", *threads])
        servers.append(off)
        rss_idle = {on.name: rss_mb(on.proc.pid), off.name: rss_mb(off.proc.pid)}
        rows = []
        for c in tqdm(levels, desc="concurrency levels", unit="level"):
            a = run_level(on, image, c, args.requests, args.seconds, args.warmup)
            b = run_level(off, image, c, args.requests, args.seconds, args.warmup)
            rows.append((c, a, b))
        soak_res = soak(on, image, args.soak, args.soak_concurrency) if args.soak > 0 else None
        codes = {s.name: s.stop() for s in servers}
    finally:
        for s in servers:
            s.stop()
        tmp.cleanup()

    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_at_start": load_start,
            "loadavg_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "note": "client and servers share this machine's cores (and, here, other users' jobs)",
        },
        "bundle": str(bundle) if args.bundle else "untrained smallervggnet 96x96x3, 10 classes",
        "image": image_name,
        "image_bytes": len(image),
        "settings": {
            "requests_per_run": args.requests,
            "seconds_per_run": args.seconds,
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "threads": args.threads,
        },
        "rss_mb_idle": rss_idle,
        "runs": [r for _, a, b in rows for r in (a, b)],
        "soak": soak_res,
        "exit_codes": codes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    head = "  req/s  p50 ms  p99 ms batch  err"
    print(f"\n{'':>5} | {'batching on':^35} | {'--max-batch 1':^35} |")
    print(f"{'conc':>5} | {head} | {head} | speed")
    for c, a, b in rows:
        print(fmt_row(c, a, b))
    if soak_res:
        print(
            f"\nsoak {soak_res['seconds']:.0f} s at concurrency {soak_res['concurrency']}: "
            f"{soak_res['requests_ok']} ok, errors {soak_res['errors'] or 0}; RSS MB first "
            f"{soak_res['rss_mb_first']}, early mean {soak_res['rss_mb_early_mean']}, late mean "
            f"{soak_res['rss_mb_late_mean']}, max {soak_res['rss_mb_max']}"
        )
    print(f"servers exited with {codes}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
