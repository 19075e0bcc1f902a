"""imgclf tune"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Any

from imgclf.commands import key_value

NAME = "tune"
HELP = "search training hyperparameters within a time budget; writes a config for imgclf train"
DESCRIPTION = (
    "Search learning rate, weight decay, optimizer, label smoothing, batch size, augmentation,\n"
    "model and image size (the ones you do not fix) for a dataset within a time budget. Bad trials\n"
    "are stopped early (ASHA). The winner is written as OUT/best.yaml for imgclf train --config.\n"
    "Running the same command again resumes the search and spends only what is left of the budget.\n\n"
    "Examples:\n"
    "  imgclf tune --data path/to/dataset --budget 30m --out runs/tune\n"
    "  imgclf tune --data digits --model lenet --budget 90s --max-epochs 10\n"
    "  imgclf tune --data path/to/dataset --budget 2h --ray-address auto      (trials on a Ray cluster)\n"
    "  imgclf train --config runs/tune/best.yaml --out runs/best              (then train the winner)\n\n"
    "See docs/TUNE.md for the search space and the files written."
)

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_budget(text: str) -> float:
    """``90s``, ``30m``, ``1.5h`` or plain seconds (``3600``) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|min|h)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; give e.g. 90s, 30m, 1.5h or 3600")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be more than 0 seconds")
    return seconds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--data", help="image folder or built-in dataset (as imgclf train --data)")
    p.add_argument(
        "--budget",
        type=parse_budget,
        metavar="DURATION",
        help="search time for the whole search in OUT: 90s, 30m, 1.5h or seconds (default: none, with "
        "--trials; one of the two is needed)",
    )
    p.add_argument(
        "--trials", type=int, metavar="N", help="stop after this many trials in OUT (default: budget only)"
    )
    p.add_argument(
        "--max-epochs",
        type=int,
        default=30,
        metavar="N",
        help="epochs of a trial no rung stops (default: 30; --set epochs=N fixes it too)",
    )
    p.add_argument(
        "--min-epochs",
        type=int,
        metavar="N",
        help="epochs before the first pruning decision; later rungs at 3x, 9x... (default: a tenth of "
        "--max-epochs, at least 1)",
    )
    p.add_argument(
        "--pruner",
        choices=("asha", "hyperband", "none"),
        default="asha",
        help="how bad trials are stopped early (default: asha)",
    )
    p.add_argument(
        "--ray-address",
        help="run the trials on Ray Tune: auto (a `ray start` cluster here), ray://HEAD:10001, or local "
        "(start one in this process); default: trials one after another in this process",
    )
    p.add_argument(
        "--cpus-per-trial",
        type=int,
        default=2,
        metavar="N",
        help="with --ray-address: CPUs (and threads) per trial",
    )
    p.add_argument("--out", default="runs/tune", help="search folder (default: runs/tune)")
    p.add_argument("--config", help="YAML or JSON file of fixed config keys (the options below override it)")
    p.add_argument(
        "--set",
        dest="sets",
        type=key_value,
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        default=[],
        help="fix any imgclf train key, e.g. --set optimizer=adamw val_split=0.2 (fixed keys are not "
        "searched)",
    )
    p.add_argument("--model", help="fix the model (default: searched among a few that suit the data)")
    p.add_argument("--img-size", type=int, dest="img_size", help="fix the input size (default: searched)")
    p.add_argument("--subset", type=int, help="use at most this many training images (quick searches)")
    p.add_argument("--seed", type=int, help="seed of the splits, the trials and the sampler (default: 42)")
    p.add_argument("--recipe", help="the recipe that fills the keys neither searched nor fixed")
    p.add_argument("--device", help="where trials train: cpu, cuda, cuda:N, mps, auto")
    p.add_argument("--verbose", action="store_true", help="show every trial's epoch lines too")
    p.add_argument("--quiet", action="store_true", help="no line per trial, only the result")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fixed config keys: --config file, then --set, then the named options."""
    from imgclf.training.config import TrainConfig

    given: dict[str, Any] = dict(TrainConfig.read_file(args.config)) if args.config else {}
    given.update(dict(args.sets))
    for key in ("data", "model", "img_size", "subset", "seed", "recipe", "device"):
        if getattr(args, key) is not None:
            given[key] = getattr(args, key)
    return given


def run(args: argparse.Namespace) -> int:
    from imgclf.core.errors import ConfigError
    from imgclf.training.tune import tune

    given = given_options(args)
    if "data" not in given:
        raise ConfigError("give --data (an image folder or a built-in such as digits)")
    if args.budget is None and args.trials is None:
        raise ConfigError("give --budget (e.g. 30m) or --trials N, or both")
    try:
        result = tune(
            given,
            budget_s=args.budget if args.budget is not None else math.inf,
            out=args.out,
            trials=args.trials,
            max_epochs=args.max_epochs,
            min_epochs=args.min_epochs,
            pruner=args.pruner,
            ray_address=args.ray_address,
            ray_cpus_per_trial=args.cpus_per_trial,
            progress=not args.quiet,
            quiet=not args.verbose,
        )
    except KeyboardInterrupt:
        print(
            f"imgclf tune: interrupted; what was found so far is in {args.out}. Run the same command "
            "again to continue the search.",
            file=sys.stderr,
        )
        return 130
    print(f"next: imgclf train --config {result.config_path} --out {args.out.rstrip('/')}-best")
    return 0
