"""imgclf models"""

from __future__ import annotations

import argparse

NAME = "models"
HELP = "list the registered architectures with parameter counts and default input"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", type=int, default=10, help="number of classes used for the parameter count")


def run(args: argparse.Namespace) -> int:
    from imgclf.models.registry import count_parameters, create_model, get_spec, list_models

    print(f"{'name':<20}{'input':>12}{'params':>14}  description")
    for name in list_models():
        spec = get_spec(name)
        m = create_model(name, num_classes=args.classes)
        size = f"{spec.default_size}x{spec.default_size}x{spec.default_channels}"
        extra = {k: v for k, v in m.arch_args.items() if k not in ("num_classes", "in_channels", "img_size")}
        # The factory's own arguments, settable with `imgclf train --model-args KEY=VALUE`.
        args_note = f" [--model-args {' '.join(f'{k}={v}' for k, v in extra.items())}]" if extra else ""
        print(f"{name:<20}{size:>12}{count_parameters(m):>14,}  {spec.description}{args_note}")
    return 0
