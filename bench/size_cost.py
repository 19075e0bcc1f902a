"""Training cost of one model across input sizes, side by side in one run (what the auto recipe's
image-size rule trades against).

For each size: the bare training step (forward, backward, AdamW; channels_last, batch 32, random
tensors, no data handling) in ms an image, the first stage's side (the feature map after the stem),
and the ratio to the cheapest size. Sizes are measured interleaved ``--repeats`` times and the
median is reported, because this machine is noisy.

  python bench/size_cost.py                          # resnet10s at 32/48/64/96/128, one thread
  python bench/size_cost.py --model smallervggnet --threads 2

Writes bench/results/size_cost.json (with the CPU's model and flags).
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402  (CPU facts)

from imgclf.models.registry import create_model  # noqa: E402


def _step_ms(model: torch.nn.Module, side: int, batch: int, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 8, (batch,))
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps / batch * 1000


def _first_stage(model: torch.nn.Module, side: int) -> int | None:
    """Side of the first feature map that a residual block or conv stage sees (resnet10s layout)."""
    feats = getattr(model, "features", None)
    if feats is None:
        return None
    x = torch.zeros(1, 3, side, side)
    with torch.no_grad():
        for layer in feats:
            if type(layer).__name__ == "_BasicBlock":
                return int(x.shape[-1])
            x = layer(x)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet10s")
    ap.add_argument("--sizes", nargs="+", type=int, default=[32, 48, 64, 96, 128])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per size and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=suite.ROOT / "bench" / "results" / "size_cost.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    models = {
        s: create_model(a.model, num_classes=8, in_channels=3, img_size=(s, s)).to(
            memory_format=torch.channels_last
        )
        for s in a.sizes
    }
    times: dict[int, list[float]] = {s: [] for s in a.sizes}
    for _ in range(a.repeats):
        for s in a.sizes:  # interleaved: a load change hits every size alike
            times[s].append(_step_ms(models[s], s, a.batch, a.steps))
    med = {s: st.median(v) for s, v in times.items()}
    low = min(med.values())
    rows = [
        {
            "size": s,
            "ms_per_image": round(med[s], 2),
            "spread_ms": [round(min(times[s]), 2), round(max(times[s]), 2)],
            "vs_cheapest": round(med[s] / low, 2),
            "first_stage_px": _first_stage(models[s], s),
        }
        for s in a.sizes
    ]
    print(f"{a.model}, batch {a.batch}, {a.threads} thread(s), median of {a.repeats}")
    print("| input px | first stage px | ms / image (train step) | vs cheapest |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['first_stage_px']} | {r['ms_per_image']:.2f} | {r['vs_cheapest']:.2f}x |")
    out = {
        "model": a.model,
        "batch": a.batch,
        "threads": a.threads,
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cpu": suite.cpu_facts(),
        "rows": rows,
    }
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
