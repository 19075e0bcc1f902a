"""Training cost of one model across input sizes, side by side in one run (what the auto recipe's
image-size rule trades against).

For each size: the bare training step (forward, backward, AdamW; channels_last, batch 32, random
tensors, no data handling) in ms an image, the first stage's side (the feature map after the stem),
and the ratio to the cheapest size. Sizes are measured interleaved ``--repeats`` times and the
median is reported, because this machine is noisy.

  python bench/size_cost.py                          # resnet10s at 32/48/64/96/128, one thread
  python bench/size_cost.py --model smallervggnet --threads 2
  python bench/size_cost.py --sizes 64 128 --data DIR  # + whole epochs through imgclf.train on DIR

``--data DIR`` adds the whole pipeline: ``--epochs`` epochs of the real trainer on the folder at
each size (decode, augmentation as auto chooses it, prefetch, validation; the rate fixed so no
range test runs), interleaved like the steps; the median epoch after the first is reported.

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


def _epoch_s(data: str, model: str, side: int, epochs: int, threads: int, precision: str) -> float:
    """Median seconds of epochs 2.. of a real ``imgclf.train`` run on ``data`` at ``side`` px."""
    import csv
    import tempfile

    import imgclf

    with tempfile.TemporaryDirectory(prefix="imgclf-size-cost-") as out:
        res = imgclf.train(
            data=data, model=model, img_size=side, epochs=epochs, lr=0.003, seed=0,
            threads=threads, precision=precision, tensorboard=False, progress=False, out=out,
        )  # fmt: skip
        with open(Path(res.run_dir) / "history.csv") as f:
            times = [float(r["time_s"]) for r in csv.DictReader(f)]
    return st.median(times[1:] or times)


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
    ap.add_argument("--data", default=None, help="also time whole training epochs on this folder")
    ap.add_argument(
        "--epochs", type=int, default=3, help="with --data: epochs per run (the first is not counted)"
    )
    ap.add_argument(
        "--precision",
        choices=suite.config_choices("precision"),
        default="auto",
        help="with --data: the runs' precision",
    )
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
    epoch_s: dict[int, list[float]] = {s: [] for s in a.sizes}
    for _ in range(a.repeats if a.data else 0):
        for s in a.sizes:
            epoch_s[s].append(_epoch_s(a.data, a.model, s, a.epochs, a.threads, a.precision))
    med = {s: st.median(v) for s, v in times.items()}
    low = min(med.values())
    rows = [
        {
            "size": s,
            "ms_per_image": round(med[s], 2),
            "spread_ms": [round(min(times[s]), 2), round(max(times[s]), 2)],
            "vs_cheapest": round(med[s] / low, 2),
            "first_stage_px": _first_stage(models[s], s),
            **(
                {
                    "epoch_s": round(st.median(epoch_s[s]), 2),
                    "epoch_spread_s": [round(min(epoch_s[s]), 2), round(max(epoch_s[s]), 2)],
                }
                if a.data
                else {}
            ),
        }
        for s in a.sizes
    ]
    if a.data:
        low_e = min(r["epoch_s"] for r in rows)
        for r in rows:
            r["epoch_vs_cheapest"] = round(r["epoch_s"] / low_e, 2)
    print(f"{a.model}, batch {a.batch}, {a.threads} thread(s), median of {a.repeats}")
    extra = " whole epoch s | epoch vs cheapest |" if a.data else ""
    print("| input px | first stage px | ms / image (train step) | vs cheapest |" + extra)
    print("|---|---|---|---|" + ("---|---|" if a.data else ""))
    for r in rows:
        line = f"| {r['size']} | {r['first_stage_px']} | {r['ms_per_image']:.2f} | {r['vs_cheapest']:.2f}x |"
        if a.data:
            line += f" {r['epoch_s']:.1f} | {r['epoch_vs_cheapest']:.2f}x |"
        print(line)
    out = {
        "model": a.model,
        "batch": a.batch,
        "threads": a.threads,
        **({"data": a.data, "epochs": a.epochs, "precision": a.precision} if a.data else {}),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cpu": suite.cpu_facts(),
        "rows": rows,
    }
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
