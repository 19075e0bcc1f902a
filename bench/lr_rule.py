"""How stable is the auto recipe's learning-rate rule? Range tests only, no training.

The auto recipe picks its rate from one 80-step range test (``auto.find_lr``). This script runs
the test ``--repeats`` times per dataset and seed on the same freshly built model (each repeat
draws the next batches of the same stream, so only the batches differ) and applies every rule
in ``auto.LR_RULES`` to each trace. A rule whose pick moves a lot between repeats turns batch
noise (or another CPU's rounding) into a different training run.

  python bench/lr_rule.py --datasets fashion28m mnist28m --seeds 42 43 --repeats 5 --threads 2

Datasets are bench/small_images.py's (fashion28m, mnist28m, natural, ...) plus the suite's
``sign`` and ``hymeno``. Writes bench/results/lr_rule.json and prints, for each rule, each
set's median pick and the spread of log10(pick) between repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import small_images  # noqa: E402
import suite  # noqa: E402

import imgclf  # noqa: E402
from imgclf.training import auto  # noqa: E402


class _Done(Exception):
    """Raised once the range tests ran: the trainer stops before its first epoch."""


def traces(run: dict[str, Any], repeats: int, out: Path) -> list[list[tuple[float, float]]]:
    """``repeats`` range-test traces of the auto recipe's model for one ``imgclf.train`` call."""
    found: list[list[tuple[float, float]]] = []
    real = auto.find_lr

    def record(
        model: Any, make_opt: Any, batches: Any, loss_fn: Any, optimizer: str, steps: int = auto.LR_STEPS
    ) -> Any:
        for _ in range(repeats):
            found.append(real(model, make_opt, batches, loss_fn, optimizer, steps, repeats=1)[2])
        raise _Done

    auto.find_lr = record
    try:
        imgclf.train(**run, out=str(out), progress=False)
    except _Done:
        pass
    finally:
        auto.find_lr = real
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["fashion28m", "mnist28m"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[42, 43])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra imgclf.train keys")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", choices=suite.config_choices("precision"), default="fp32")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "imgclf-small-images")
    ap.add_argument("--out", type=Path, default=suite.ROOT / "bench" / "results" / "lr_rule.json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgclf-lr-rule-"))
    keys = {"tensorboard": False, "precision": a.precision, **suite.parse_set(a.set)}
    if a.threads:
        keys["threads"] = a.threads
    result = json.loads(a.out.read_text()) if a.out.exists() else {"rows": {}}
    for ds in a.datasets:
        if ds in ("sign", "hymeno"):
            args = suite.dataset_args(ds, work, 0)
        else:
            args = small_images.dataset_args(ds, a.cache, work)
        for seed in a.seeds:
            t0 = time.time()
            tr = traces({**args, **keys, "seed": seed}, a.repeats, work / f"{ds}-{seed}")
            opt = auto.STATIC["optimizer"]  # the auto recipe's optimizer, whose clamp the picks obey
            picks = {rule: [auto.pick_lr(t, opt, rule)[0] for t in tr] for rule in auto.LR_RULES}
            result["rows"].setdefault(ds, {})[str(seed)] = {
                "picks": picks,
                "traces": [[[round(lr, 8), round(loss, 5)] for lr, loss in t] for t in tr],
                "seconds": round(time.time() - t0, 1),
                "cpu": suite.cpu_tag(),
            }
            result["cpu"] = suite.cpu_facts()
            a.out.write_text(json.dumps(result, indent=1) + "\n")
            print(ds, seed, {r: [f"{v:.2g}" for v in p] for r, p in picks.items()}, flush=True)
    print(table(result["rows"]))
    print(f"wrote {a.out}")


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: per rule and set, the median pick and the mean spread (max/min) between repeats."""
    lines = ["| rule | set | seeds | median pick | spread between repeats (max/min, mean over seeds) |"]
    lines.append("|---|---|---|---|---|")
    for rule in auto.LR_RULES:
        for ds, seeds in rows.items():
            all_p = sorted(p for s in seeds.values() for p in s["picks"].get(rule, []))
            if not all_p:
                continue
            spread = [max(s["picks"][rule]) / min(s["picks"][rule]) for s in seeds.values()]
            med = all_p[len(all_p) // 2]
            lines.append(
                f"| {rule} | {ds} | {len(seeds)} | {med:.2g} | "
                f"{math.exp(sum(math.log(x) for x in spread) / len(spread)):.2f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
