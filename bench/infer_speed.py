"""Inference speed through the bundle: PyTorch eager vs ONNX Runtime, side by side (issue 5).

Uses ``imgclf.bundle.load_bundle(path, backend=...)`` for each backend on the same bundle and the
same real Sign Language photos (decoded once; decoding is excluded from the timings), and
measures, interleaved ``--repeats`` times:
  * batch-1 latency of ``Bundle.predict_batch`` (p50 and p99 over ``--calls`` calls),
  * batch-64 throughput (img/s),
  * agreement: max |p_eager - p_ort| over the batch.
Without ``--bundle`` it saves an untrained SmallerVGGNet (96x96x3, 10 classes) bundle in a temp
folder: speed does not depend on the weights.

  python bench/infer_speed.py [--bundle runs/x/model] [--repeats 3] [--calls 200]

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
    from imgclf.bundle import save_bundle
    from imgclf.models import create_model
    from imgclf.preprocess import Preprocess

    model = create_model("smallervggnet", num_classes=10, in_channels=3, img_size=96).eval()
    return save_bundle(dst / "model", model, Preprocess((96, 96), 3), [str(i) for i in range(10)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="bundle or run folder (default: an untrained SmallerVGGNet)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (medians reported)")
    ap.add_argument("--calls", type=int, default=200, help="batch-1 calls per repeat")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "infer_speed.json"))
    args = ap.parse_args(argv)
    if not SIGN.exists():
        print(f"error: {SIGN} not found; set IMGCLF_SHARED to the datasets folder", file=sys.stderr)
        return 2
    import torch

    from imgclf.bundle import load_bundle

    tmp = tempfile.TemporaryDirectory(prefix="imgclf-infer-")
    path = Path(args.bundle) if args.bundle else make_bundle(Path(tmp.name))
    bundles = {"eager": load_bundle(path, backend="torch")}
    try:
        bundles["onnxruntime"] = load_bundle(path, backend="onnxruntime")
    except Exception as e:  # noqa: BLE001 - report and measure eager alone
        print(f"onnxruntime backend unavailable: {e}", file=sys.stderr)
    files = sorted(p for p in SIGN.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    files = files[:: max(1, len(files) // args.batch)][: args.batch]
    b0 = bundles["eager"]
    batch = np.stack([b0.prepare(f) for f in files])
    for b in bundles.values():  # warm-up (ORT builds its session here)
        b.predict_batch(batch[:1])
        b.predict_batch(batch)
    lat: dict[str, list[float]] = {k: [] for k in bundles}
    thr: dict[str, list[float]] = {k: [] for k in bundles}
    for _ in range(args.repeats):
        for k, b in bundles.items():
            for i in range(args.calls):
                x = batch[i % len(batch)][None]
                t = time.perf_counter()
                b.predict_batch(x)
                lat[k].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            for _ in range(3):
                b.predict_batch(batch)
            thr[k].append(3 * len(batch) / (time.perf_counter() - t))
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "bundle": str(path) if args.bundle else "untrained smallervggnet 96x96x3",
        "torch_threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "backends": {},
    }
    for k in bundles:
        res["backends"][k] = {
            "p50_ms": float(np.percentile(lat[k], 50)),
            "p99_ms": float(np.percentile(lat[k], 99)),
            "batch_img_s": st.median(thr[k]),
            "batch_img_s_raw": thr[k],
        }
    if "onnxruntime" in bundles:
        diff = np.abs(
            bundles["eager"].predict_batch(batch) - bundles["onnxruntime"].predict_batch(batch)
        ).max()
        res["max_abs_prob_diff"] = float(diff)
        e, o = res["backends"]["eager"], res["backends"]["onnxruntime"]
        res["ort_vs_eager"] = {
            "latency_p50": e["p50_ms"] / o["p50_ms"],
            "batch": o["batch_img_s"] / e["batch_img_s"],
        }
    print(f"\n{res['bundle']}; batch {args.batch}; {res['date']}; load average {res['load_avg'][0]:.1f}")
    print(f"{'backend':<14}{'p50 ms':>9}{'p99 ms':>9}{'batch img/s':>13}")
    for k, r in res["backends"].items():
        print(f"{k:<14}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['batch_img_s']:>13.0f}")
    if "ort_vs_eager" in res:
        r = res["ort_vs_eager"]
        print(
            f"onnxruntime vs eager: latency {r['latency_p50']:.2f}x faster, batch {r['batch']:.2f}x; "
            f"max |dp| {res['max_abs_prob_diff']:.1e}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
