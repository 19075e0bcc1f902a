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

Server mode: ``imgclf serve`` in its own process; two normal clients post one real photo each in
a loop, first alone (idle p99), then while hostile clients run: one posting 64 images just
under the per-image pixel limit in one 8 MB request, one opening connections that send half a
body and stall, one calling /v1/explain on a large PNG. Reported: 5xx count, normal p99 idle
vs under attack, and the server's RSS at start and after the soak.

Writes bench/results/chaos.json (server mode: chaos_server.json) and prints a table.
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
from collections.abc import Callable
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


def _png(w: int, h: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    tile = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # compressible but not trivial
    buf = io.BytesIO()
    Image.fromarray(np.tile(tile, (h // 64 + 1, w // 64 + 1, 1))[:h, :w]).save(
        buf, format="PNG", compress_level=9
    )
    return buf.getvalue()


def server_soak(soak: float, out: Path) -> None:
    import socket
    import threading

    import httpx

    work = Path(tempfile.mkdtemp(prefix="imgclf-soak-"))
    env = dict(
        os.environ, IMGCLF_DATA_DIR=str(SHARED), IMGCLF_CACHE_DIR=str(work / "cache"), PYTHONPATH=str(ROOT)
    )
    sign = SHARED / "sign-language-digits"
    args = "--model smallervggnet --img-size 64 --epochs 1 --subset 300 --no-tensorboard --no-progress"
    cmd = imgclf_cmd("train", "--data", str(sign), *args.split(), "--out", str(work / "run"))
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    port = 18000 + random.randint(0, 999)
    srv = subprocess.Popen(
        imgclf_cmd("serve", str(work / "run"), "--port", str(port), "--log-level", "error"), env=env
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    photo = next((sign / "3").iterdir()).read_bytes()
    statuses: list[int] = []
    stop = threading.Event()

    def normal(lat: list[float]) -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                t = time.perf_counter()
                r = c.post(url + "/v1/predict", content=photo)
                lat.append(time.perf_counter() - t)
                statuses.append(r.status_code)

    def phase(seconds: float, hostile: list[Callable[[], None]]) -> list[float]:
        lat: list[float] = []
        stop.clear()
        threads = [threading.Thread(target=normal, args=(lat,)) for _ in range(2)]
        threads += [threading.Thread(target=h) for h in hostile]
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        return lat

    side = int((39_000_000) ** 0.5)  # each image just under the 40 MP per-image limit
    big = _png(side, side, 1)
    files = [("f", (f"{i}.png", big, "image/png")) for i in range(64)]
    explain_png = _png(3000, 3000, 2)

    def flood() -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                statuses.append(c.post(url + "/v1/predict", files=files).status_code)

    def slow() -> None:
        while not stop.is_set():
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(
                    b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + photo[:500]
                )
                stop.wait(5)

    def explain() -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                statuses.append(c.post(url + "/v1/explain", content=explain_png).status_code)

    rss0 = _rss_mb(srv.pid)
    idle = phase(min(20.0, soak / 4), [])
    attacked = phase(soak, [flood, slow, explain])
    time.sleep(3)
    rss1 = _rss_mb(srv.pid)
    srv.send_signal(signal.SIGINT)
    srv.wait(timeout=60)

    def p99(x: list[float]) -> float:
        return sorted(x)[int(0.99 * (len(x) - 1))] * 1000 if x else float("nan")

    res = {
        "soak_s": soak,
        "requests": len(statuses),
        "status_counts": {str(k): statuses.count(k) for k in sorted(set(statuses))},
        "5xx": sum(s >= 500 for s in statuses),
        "normal_p99_ms_idle": p99(idle),
        "normal_p99_ms_under_attack": p99(attacked),
        "p99_ratio": p99(attacked) / p99(idle),
        "normal_requests_under_attack": len(attacked),
        "rss_mb_start": rss0,
        "rss_mb_end": rss1,
        "rss_ratio": rss1 / rss0,
        "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": "),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print("| 5xx | normal p99 idle ms | under attack ms | ratio | RSS start MB | end MB | ratio |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {res['5xx']} | {res['normal_p99_ms_idle']:.0f} | {res['normal_p99_ms_under_attack']:.0f} | "
        f"{res['p99_ratio']:.2f} | {rss0:.0f} | {rss1:.0f} | {res['rss_ratio']:.2f} |"
    )
    print(f"status counts {res['status_counts']}; wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="killed runs (each killed 1-3 times)")
    ap.add_argument("--quick", action="store_true", help="digits instead of an MNIST subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server", action="store_true", help="the server soak with hostile clients instead")
    ap.add_argument("--soak", type=float, default=60.0, help="server mode: seconds under attack")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.server:
        server_soak(a.soak, a.out or ROOT / "bench" / "results" / "chaos_server.json")
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
