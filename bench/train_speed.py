"""Training throughput against this CPU's fp32 ceiling (issue 5), side by side in one run.

Per model it measures, interleaved ``--repeats`` times (medians reported, spread kept):
  * machine fp32 GFLOP/s (a 2048^2 matmul) right before each model measurement,
  * model FLOPs per training image (conv/linear MACs counted with forward hooks; x3 for
    forward + backward),
  * bare loop img/s: the same model, optimizer and batch on in-memory float tensors,
    no augmentation, no data handling,
  * full pipeline img/s through the real ``imgclf.training.trainer.train`` (decode cache warm,
    augmentation as the defaults choose), with the background prefetch on and off,
  * % of ceiling and the overhead ratio pipeline / bare.
``--levers`` adds: optimizer variants, channels_last vs NCHW, batch size, 1 vs 2 threads,
bf16 autocast and (``--compile``) torch.compile with its compile time.

  python bench/train_speed.py                     # ~5 min on 2 quiet cores
  python bench/train_speed.py --levers --compile  # everything, longer

Writes bench/results/train_speed.json. Data: $IMGCLF_SHARED (default ../shared/datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics as st
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))
os.environ.setdefault("IMGCLF_DATA_DIR", str(SHARED))

from imgclf.models.registry import create_model  # noqa: E402
from imgclf.training import trainer as T  # noqa: E402
from imgclf.training.api import train  # noqa: E402
from imgclf.training.config import TrainConfig  # noqa: E402

MODELS = {
    # name: (img size, channels, batch, data, augment)
    "lenet": (28, 1, 128, "mnist", "off"),
    "smallervggnet": (96, 3, 32, "sign", "on"),
}


def matmul_gflops(n: int = 2048, reps: int = 3, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def forward_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """FLOPs (2 x MACs) of conv and linear layers for one image of ``shape`` (C, H, W)."""
    macs = [0]

    def hook(m: torch.nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(m, torch.nn.Conv2d):
            k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
            macs[0] += out[0].numel() * k
        elif isinstance(m, torch.nn.Linear):
            macs[0] += m.in_features * m.out_features

    hs = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in hs:
        h.remove()
    return 2.0 * macs[0]


def bare_loop(
    name: str,
    bs: int,
    steps: int,
    *,
    optimizer: str = "make_optimizer",
    channels_last: bool = True,
    bf16: bool = False,
    compile_model: bool = False,
) -> dict[str, float]:
    """img/s of forward+backward+step on in-memory tensors (first 3 steps are warm-up)."""
    size, ch = MODELS[name][:2]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=ch, img_size=size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    if optimizer == "make_optimizer":
        opt = T.make_optimizer(model, TrainConfig(optimizer="adam"))
    else:
        opt = torch.optim.Adam(model.parameters(), 1e-3, foreach=optimizer == "foreach")
    x = torch.randn(bs, ch, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (bs,))
    step_model = model
    compile_s = 0.0
    if compile_model:
        t = time.perf_counter()
        step_model = torch.compile(model)
        out = step_model(x)
        F.cross_entropy(out, y).backward()
        compile_s = time.perf_counter() - t

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = step_model(x)
            loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return {"img_s": bs * steps / (time.perf_counter() - t), "compile_s": compile_s}


def pipeline(name: str, work: Path, subset: int, prefetch: bool, tag: str, precision: str = "fp32") -> float:
    """Epoch-2 training img/s of a real ``imgclf.training.trainer.train`` run (no validation split).

    ``prefetch`` forces the background batch thread on or off (the default is auto);
    ``precision`` "auto" is what the best recipe (the CLI default) trains with.
    """
    size, ch, bs, data, augment = MODELS[name]
    src = "mnist" if data == "mnist" else str(SHARED / "sign-language-digits")
    cfg = TrainConfig(
        data=src,
        model=name,
        img_size=size,
        batch_size=bs,
        epochs=2,
        subset=subset,
        val_split=0.0,  # time_s then covers training only
        augment=augment,
        out=str(work / f"{name}-{tag}"),
        tensorboard=False,
        cache_dir=str(work / "cache"),
        dedup="off",
        precision=precision,
    )
    T.PREFETCH = prefetch
    try:
        res = train(cfg, progress=False)
    finally:
        T.PREFETCH = None
    h = res.history[-1]
    n_train = len(json.loads((res.run_dir / "splits.json").read_text())["train"])
    return (n_train // bs) * bs / h["time_s"]


def med(v: list[float]) -> float:
    return st.median(v) if v else float("nan")


def spread(v: list[float]) -> str:
    return f"{min(v):.0f}-{max(v):.0f}" if v else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet,smallervggnet", help="comma-separated (default: both)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (medians reported)")
    ap.add_argument("--steps", type=int, default=0, help="bare-loop steps per repeat (0: per model default)")
    ap.add_argument("--mnist-subset", type=int, default=6400, help="LeNet pipeline training images")
    ap.add_argument("--sign-subset", type=int, default=640, help="SmallerVGGNet pipeline training images")
    ap.add_argument("--levers", action="store_true", help="also measure optimizer/layout/batch/threads/bf16")
    ap.add_argument("--compile", action="store_true", help="with --levers: torch.compile (slow to compile)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_speed.json"))
    args = ap.parse_args(argv)
    if not SHARED.exists():
        print(f"error: datasets not found at {SHARED}; set IMGCLF_SHARED", file=sys.stderr)
        return 2
    import logging

    logging.getLogger("imgclf").disabled = True  # per-epoch lines would bury the table
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in MODELS:
            print(f"error: --models {n!r}: choose from {', '.join(MODELS)}", file=sys.stderr)
            return 2
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": os.getloadavg(),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-") as tmp:
        work = Path(tmp)
        for name in names:
            size, ch, bs, data, augment = MODELS[name]
            steps = args.steps or (30 if name == "lenet" else 8)
            subset = args.mnist_subset if data == "mnist" else args.sign_subset
            fl = forward_flops(
                create_model(name, num_classes=10, in_channels=ch, img_size=size), (ch, size, size)
            )
            print(f"[{name}] warm-up run (decode cache)...", file=sys.stderr)
            pipeline(name, work, subset, True, "warm")
            r: dict[str, list[float]] = {"gflops": [], "bare": [], "pipe": [], "pipe_noprefetch": []}
            # The default path: the best recipe trains with precision auto (bf16 autocast on CPUs
            # with native bf16), so measure it too where that differs from fp32.
            auto_bf16 = T.cpu_has_native_bf16()
            if auto_bf16:
                r["pipe_auto"] = []
            for i in range(args.repeats):
                print(f"[{name}] repeat {i + 1}/{args.repeats}", file=sys.stderr)
                r["gflops"].append(matmul_gflops())
                r["bare"].append(bare_loop(name, bs, steps)["img_s"])
                r["pipe"].append(pipeline(name, work, subset, True, f"p{i}"))
                r["pipe_noprefetch"].append(pipeline(name, work, subset, False, f"n{i}"))
                if auto_bf16:
                    r["pipe_auto"].append(pipeline(name, work, subset, True, f"a{i}", precision="auto"))
            gf = med(r["gflops"])
            ceiling = gf * 1e9 / (3 * fl)
            m = {
                "img_size": size,
                "channels": ch,
                "batch": bs,
                "augment": augment,
                "forward_mflop": fl / 1e6,
                "train_gflop_per_img": 3 * fl / 1e9,
                "machine_gflops": gf,
                "ceiling_img_s": ceiling,
                "bare_img_s": med(r["bare"]),
                "pipeline_img_s": med(r["pipe"]),
                "pipeline_noprefetch_img_s": med(r["pipe_noprefetch"]),
                "raw": r,
            }
            if auto_bf16:
                m["pipeline_auto_bf16_img_s"] = med(r["pipe_auto"])
                m["pipeline_auto_bf16_pct_fp32_ceiling"] = 100 * m["pipeline_auto_bf16_img_s"] / ceiling
            m["bare_pct_ceiling"] = 100 * m["bare_img_s"] / ceiling
            m["pipeline_pct_ceiling"] = 100 * m["pipeline_img_s"] / ceiling
            m["pipeline_over_bare"] = m["pipeline_img_s"] / m["bare_img_s"]
            m["prefetch_gain"] = m["pipeline_img_s"] / m["pipeline_noprefetch_img_s"]
            # per-repeat ratios (each pair measured back to back) are less noisy than ratios of medians
            m["pipeline_over_bare_paired"] = med([p / b for p, b in zip(r["pipe"], r["bare"])])
            m["prefetch_gain_paired"] = med([p / q for p, q in zip(r["pipe"], r["pipe_noprefetch"])])
            if args.levers:
                m["levers"] = levers(name, bs, steps, args.repeats, args.compile)
            result["models"][name] = m
    result["load_avg_end"] = os.getloadavg()
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def levers(name: str, bs: int, steps: int, repeats: int, compile_model: bool) -> dict[str, Any]:
    variants: dict[str, dict[str, Any]] = {
        "adam fused (default)": {},
        "adam for-loop": {"optimizer": "loop"},
        "adam foreach": {"optimizer": "foreach"},
        "NCHW (not channels_last)": {"channels_last": False},
        "bf16 autocast": {"bf16": True},
        f"batch {bs * 2}": {"bs": bs * 2},
        f"batch {bs * 4}": {"bs": bs * 4},
        "1 thread": {"threads": 1},
    }
    res: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, kw in variants.items():
            kw = dict(kw)
            b = kw.pop("bs", bs)
            threads = kw.pop("threads", None)
            old = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            try:
                res[k].append(bare_loop(name, b, max(2, steps * bs // b), **kw)["img_s"])
            finally:
                torch.set_num_threads(old)
    out: dict[str, Any] = {k: {"img_s": med(v), "raw": v} for k, v in res.items()}
    base = out["adam fused (default)"]["img_s"]
    for v in out.values():
        v["vs_default"] = v["img_s"] / base
    if compile_model:
        c = bare_loop(name, bs, steps, compile_model=True)
        out["torch.compile"] = {
            "img_s": c["img_s"],
            "compile_s": c["compile_s"],
            "vs_default": c["img_s"] / base,
        }
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{res['cpu']}, {res['machine']}, torch {res['torch']} ({res['torch_threads']} threads)")
    print(f"date {res['date']}")
    print(f"load average at start {res['load_avg_start'][0]:.1f}, at end {res['load_avg_end'][0]:.1f}")
    hdr = (
        f"{'model':<14}{'GFLOP/s':>8}{'GFLOP/img':>10}{'ceiling':>9}{'bare':>8}{'pipeline':>9}"
        f"{'no-prefetch':>12}{'bare%':>7}{'pipe%':>7}{'pipe/bare':>10}{'prefetch':>9}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, m in res["models"].items():
        print(
            f"{name:<14}{m['machine_gflops']:>8.0f}{m['train_gflop_per_img']:>10.3f}{m['ceiling_img_s']:>9.0f}"
            f"{m['bare_img_s']:>8.0f}{m['pipeline_img_s']:>9.0f}{m['pipeline_noprefetch_img_s']:>12.0f}"
            f"{m['bare_pct_ceiling']:>6.0f}%{m['pipeline_pct_ceiling']:>6.0f}%"
            f"{m['pipeline_over_bare_paired']:>10.2f}{m['prefetch_gain_paired']:>9.2f}"
        )
        print(
            f"{'':<14}spread: GFLOP/s {spread(m['raw']['gflops'])}, bare {spread(m['raw']['bare'])}, "
            f"pipeline {spread(m['raw']['pipe'])}, no-prefetch {spread(m['raw']['pipe_noprefetch'])}"
        )
    for name, m in res["models"].items():
        if "pipeline_auto_bf16_img_s" in m:
            auto, pct = m["pipeline_auto_bf16_img_s"], m["pipeline_auto_bf16_pct_fp32_ceiling"]
            print(
                f"{name}: default path (best recipe, precision auto = bf16 autocast here): "
                f"{auto:.0f} img/s = {pct:.0f}% of the fp32 ceiling "
                f"({auto / m['pipeline_img_s']:.2f}x the fp32 pipeline)"
            )
    for name, m in res["models"].items():
        if "levers" in m:
            print(f"\nlevers, {name} (bare loop img/s, ratio to the default):")
            for k, v in m["levers"].items():
                extra = f"  compile {v['compile_s']:.0f}s" if "compile_s" in v else ""
                print(f"  {k:<26}{v['img_s']:>8.0f}{v['vs_default']:>8.2f}x{extra}")


if __name__ == "__main__":
    sys.exit(main())
