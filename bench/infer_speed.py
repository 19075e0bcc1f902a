"""Inference speed through the bundle: PyTorch eager vs ONNX Runtime, side by side (issue 5).

Uses ``imgclf.runtime.bundle.load_bundle(path, backend=...)`` for each backend on the same bundle and the
same real Sign Language photos (decoded once; decoding is excluded from the timings), and
measures, interleaved ``--repeats`` times:
  * batch-1 latency of ``Bundle.predict_batch`` (p50 and p99 over ``--calls`` calls),
  * batch-64 throughput (img/s),
  * agreement: max |p_eager - p| and top-1 agreement over the batch.
Backends: PyTorch eager, ONNX Runtime float32, and ONNX Runtime int8 (``imgclf export --int8``,
calibrated on 256 Sign photos), each at every ``--threads`` count.
Without ``--bundle`` it saves an untrained SmallerVGGNet (96x96x3, 10 classes) bundle in a temp
folder: speed does not depend on the weights.

  python bench/infer_speed.py [--bundle runs/x/model] [--repeats 3] [--calls 200] [--threads 1 2]

Writes bench/results/infer_speed.json. Data: $IMGCLF_SHARED (default ../shared/datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))
SIGN = SHARED / "sign-language-digits"


def make_bundle(dst: Path) -> Path:
    from imgclf.core.preprocess import Preprocess
    from imgclf.models.registry import create_model
    from imgclf.runtime.bundle import save_bundle

    model = create_model("smallervggnet", num_classes=10, in_channels=3, img_size=96).eval()
    return save_bundle(dst / "model", model, Preprocess((96, 96), 3), [str(i) for i in range(10)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="bundle or run folder (default: an untrained SmallerVGGNet)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (medians reported)")
    ap.add_argument("--calls", type=int, default=200, help="batch-1 calls per repeat")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to compare")
    ap.add_argument(
        "--backends",
        nargs="+",
        default=["eager", "onnxruntime", "onnxruntime-int8"],
        choices=["eager", "onnxruntime", "onnxruntime-int8"],
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "infer_speed.json"))
    args = ap.parse_args(argv)
    if not SIGN.exists():
        print(f"error: {SIGN} not found; set IMGCLF_SHARED to the datasets folder", file=sys.stderr)
        return 2
    import torch

    from imgclf.runtime.bundle import load_bundle

    tmp = tempfile.TemporaryDirectory(prefix="imgclf-infer-")
    path = Path(args.bundle) if args.bundle else make_bundle(Path(tmp.name))
    files = sorted(p for p in SIGN.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    eager = load_bundle(path, backend="torch")
    cal = np.stack([eager.prepare(f) for f in files[1 :: max(1, len(files) // 256)][:256]])
    files = files[:: max(1, len(files) // args.batch)][: args.batch]
    batch = np.stack([eager.prepare(f) for f in files])
    int8_path = None
    if "onnxruntime-int8" in args.backends:
        from imgclf.exporters.formats import int8_source_onnx
        from imgclf.exporters.int8 import quantize_int8

        int8_path = quantize_int8(int8_source_onnx(eager), cal, Path(tmp.name) / "model.int8.onnx")

    def load(kind: str, threads: int) -> Any:
        torch.set_num_threads(threads)
        os.environ["IMGCLF_ORT_THREADS"] = str(threads)
        if kind == "eager":
            return load_bundle(path, backend="torch")
        return load_bundle(int8_path if kind == "onnxruntime-int8" else path, backend="onnxruntime")

    # One entry per (backend, threads); all measured interleaved in the same run.
    bundles = {(k, t): load(k, t) for t in args.threads for k in args.backends}
    for (_k, t), b in bundles.items():  # warm-up (ORT builds its session here)
        torch.set_num_threads(t)
        # The session is built lazily on the first call and reads its thread count then.
        os.environ["IMGCLF_ORT_THREADS"] = str(t)
        b.predict_batch(batch[:1])
        b.predict_batch(batch)
    lat: dict[Any, list[float]] = {k: [] for k in bundles}
    thr: dict[Any, list[float]] = {k: [] for k in bundles}
    for _ in range(args.repeats):
        for (k, t), b in bundles.items():
            torch.set_num_threads(t)
            for i in range(args.calls):
                x = batch[i % len(batch)][None]
                t0 = time.perf_counter()
                b.predict_batch(x)
                lat[k, t].append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            for _ in range(3):
                b.predict_batch(batch)
            thr[k, t].append(3 * len(batch) / (time.perf_counter() - t0))
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "bundle": str(path) if args.bundle else "untrained smallervggnet 96x96x3",
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "rows": [],
    }
    ref = bundles["eager", args.threads[0]].predict_batch(batch) if "eager" in args.backends else None
    for (k, t), b in bundles.items():
        row = {
            "backend": k,
            "threads": t,
            "p50_ms": float(np.percentile(lat[k, t], 50)),
            "p99_ms": float(np.percentile(lat[k, t], 99)),
            "batch_img_s": st.median(thr[k, t]),
            "batch_img_s_raw": thr[k, t],
        }
        if ref is not None:
            p = b.predict_batch(batch)
            row["max_abs_prob_diff_vs_eager"] = float(np.abs(p - ref).max())
            row["top1_agree_vs_eager"] = float((p.argmax(1) == ref.argmax(1)).mean())
        res["rows"].append(row)
    for r in res["rows"]:
        same = [e for e in res["rows"] if e["backend"] == "eager" and e["threads"] == r["threads"]]
        base = same[0] if same else None
        if base:
            r["latency_speedup_vs_eager"] = base["p50_ms"] / r["p50_ms"]
            r["batch_speedup_vs_eager"] = r["batch_img_s"] / base["batch_img_s"]
    print(f"\n{res['bundle']}; batch {args.batch}; {res['date']}; load average {res['load_avg'][0]:.1f}")
    head = f"{'backend':<18}{'threads':>8}{'p50 ms':>9}{'p99 ms':>9}{'batch img/s':>13}"
    print(head + f"{'vs eager':>16}{'top-1 agree':>13}")
    for r in res["rows"]:
        vs = f"{r.get('latency_speedup_vs_eager', 1):.2f}x / {r.get('batch_speedup_vs_eager', 1):.2f}x"
        print(
            f"{r['backend']:<18}{r['threads']:>8}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['batch_img_s']:>13.0f}"
            f"{vs:>16}{r.get('top1_agree_vs_eager', 1) * 100:>12.1f}%"
        )
    print("vs eager: single-image latency speed-up / batch throughput speed-up at the same thread count")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
