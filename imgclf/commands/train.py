"""imgclf train"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import Any

from imgclf.commands import key_value
from imgclf.training.config import DEFAULT_RECIPE, TrainConfig

NAME = "train"
HELP = "train a model on a folder or built-in dataset into a bundle"
DESCRIPTION = (
    "Train an image classifier. Examples:\n"
    "  imgclf train --data path/to/dataset --model smallervggnet --out runs/pokedex\n"
    "  imgclf train --data mnist --model lenet --epochs 20 --out runs/mnist\n"
    "  imgclf train --resume runs/mnist          (continue an interrupted run)\n\n"
    "The recipe (--recipe auto by default) decides the training values from your data: model,\n"
    "image size, batch size, epochs, augmentation, flip and a learning-rate range test, each\n"
    "logged with its reason (docs/ACCURACY.md). Any option given here is kept as given. The\n"
    "defaults printed below are the plain values, used where no recipe value applies.\n"
    "To search instead: imgclf tune --data DIR --budget 30m (docs/TUNE.md)."
)


def _base_type(tp: Any) -> Any:
    if isinstance(tp, str):
        tp = eval(tp, {"list": list, "dict": dict, "Any": Any})  # noqa: S307 - our own annotations
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", help="YAML or JSON file of config keys (command-line options override it)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue this run from its last checkpoint, with the learning rates an uninterrupted run "
        "would have (a run killed before its first checkpoint starts again). With --epochs N the plan "
        "grows to N epochs: keras-decay continues its per-step decay, cosine and onecycle are stretched "
        "to end at epoch N",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per epoch only)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "recipe":
            default = DEFAULT_RECIPE
        h = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
        choices = f.metadata["choices"]
        if tp is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif tp is dict or typing.get_origin(tp) is dict:
            p.add_argument(
                flag, dest=f.name, type=key_value, nargs="+", metavar="KEY=VALUE", default=None, help=h
            )
        elif tp is list or typing.get_origin(tp) is list:
            p.add_argument(flag, dest=f.name, type=float, nargs="+", default=None, help=h)
        else:
            p.add_argument(flag, dest=f.name, type=tp, default=None, choices=choices, help=h)
    p.add_argument(
        "--no-augment", dest="augment", action="store_const", const="off", help="same as --augment off"
    )


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys set on the command line (None means 'not given')."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "model_args" in given:
        given["model_args"] = dict(given["model_args"])
    return given


def run(args: argparse.Namespace) -> int:
    from imgclf.training.api import resume, train
    from imgclf.training.recipes import config_from

    progress = False if args.no_progress else None
    given = given_options(args)
    if args.resume:
        extra = set(given) - {"epochs"}
        if extra:
            print(f"imgclf train: --resume takes only --epochs; ignoring {sorted(extra)}", file=sys.stderr)
        result = resume(args.resume, epochs=given.get("epochs"), progress=progress)
    else:
        base: dict[str, Any] = {}
        if args.config:
            # Every key the file names counts as given (it beats the recipe), even when its
            # value equals the plain default.
            base = TrainConfig.read_file(args.config)
        result = train(config_from({**base, **given}), progress=progress)
    print(json.dumps({"run_dir": str(result.run_dir), **result.metrics}, indent=2))
    return 0
