"""The one typed training configuration: every key, its type, default, range and help, declared once.

It flows CLI -> trainer -> bundle (``model.json['train_config']``). Unknown keys are
rejected with a suggestion, as Ultralytics' cfg does.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import operator
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from imgclf.core.errors import ConfigError
from imgclf.runtime.ood import DEFAULT_SCORE as DEFAULT_OOD_SCORE
from imgclf.runtime.ood import SCORES as OOD_SCORES


def option(
    *,
    help: str,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
    choices: tuple[Any, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field whose help, choices and range travel with it (``field(metadata=...)``)."""
    md = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    return field(default=default, default_factory=default_factory, metadata=md)


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "").replace("NoneType", "None")


def _accepted(f: dataclasses.Field) -> str:
    md = f.metadata
    if md["choices"]:
        return ", ".join(str(c) for c in md["choices"])
    parts = [
        f"{op} {md[k]}"
        for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if md[k] is not None
    ]
    return " and ".join(parts)


_BOUNDS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def _check(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """``value`` for field ``f`` of type ``tp``, checked and normalised (integral floats to int)."""
    name = f.name
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args and optional else tp
    origin = typing.get_origin(base) or base
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required (got null); default is {f.default!r}")
    if origin is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected true or false")
    elif origin is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r}: expected a whole number")
    elif origin is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}={value!r}: expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name}={value!r}: expected a finite number")
    elif origin is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r}: expected text")
    elif origin is list:
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
        ):
            raise ConfigError(f"{name}={value!r}: expected a list of finite numbers, e.g. [0.5, 0.5, 0.5]")
        value = [float(v) for v in value]
    elif origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r}: expected a mapping of names to values")
    md = f.metadata
    if md.get("choices") and value not in md["choices"]:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(str(c) for c in md['choices'])}")
    for v in value if isinstance(value, list) else [value]:
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        for key, within in _BOUNDS.items():
            if md.get(key) is not None and not within(v, md[key]):
                raise ConfigError(f"{name}={value!r}: must be in the range {_accepted(f)}")
    return value


# The recipe ``imgclf.train`` and the CLI apply when none is named: values decided from the data
# (imgclf.training.auto). A TrainConfig built directly applies none and says so with
# ``recipe="default"`` (its plain values).
RECIPES = ("auto", "best", "tutorial", "default")
DEFAULT_RECIPE = "auto"
MAX_HELD_OUT = 0.8  # val + test fraction above which too little is left to train on


@dataclass
class TrainConfig:
    """Everything that decides a training run. Each field's type, default, choices, range and help
    are declared here once; validation, ``imgclf train`` options, ``--help`` and the docs table
    (:func:`options_table`) are made from them."""

    data: str = option(
        default="digits",
        help=(
            "image folder (<dir>/<class>/<img>, or <dir>/train|val|test/<class>/<img>), a manifest"
            " (.csv/.jsonl/.parquet with path,label[,split]; paths relative to it), a folder of IDX"
            " files, or a built-in: mnist, fashion-mnist, digits"
        ),
    )
    multi_label: bool = option(
        default=False,
        help=(
            "several labels per image: sigmoid outputs with binary cross-entropy and a per-label "
            "threshold chosen on validation (best F1); labels from folder names split on --label-sep "
            "or from a manifest's labels column ('red|dress'; empty = no label)"
        ),
    )
    label_sep: str = option(
        default="_", help="--multi-label with class folders: the separator in folder names (red_dress)"
    )
    pos_weight: str = option(
        default="none",
        help="--multi-label: auto weights each label's positives by negatives/positives (rare labels)",
        choices=("none", "auto"),
    )
    model: str | None = option(
        default=None,
        help=(
            "architecture from `imgclf models` (default: lenet for greyscale built-ins, else resnet10s "
            "with --recipe auto and smallervggnet with the other recipes)"
        ),
    )
    model_args: dict[str, Any] = option(
        default_factory=dict,
        help=(
            "extra arguments for the model factory as KEY=VALUE (values read as JSON), e.g. "
            "--model-args blocks=2 width=16; `imgclf models` lists each model's"
        ),
    )
    init_weights: str | None = option(
        default=None,
        help=(
            "transfer learning: a .safetensors file, bundle or run folder whose layers with the same "
            "name and shape are loaded before training (the classifier head is re-initialised when the "
            "class count differs)"
        ),
    )
    pretrained: bool = option(
        default=False,
        help=(
            "with --model timm:<name>: start from timm's pretrained weights (needs pip install "
            "'imgclf[timm]' and network access the first time)"
        ),
    )
    freeze_epochs: int = option(
        default=0,
        help=(
            "fine-tuning: train only the layers that --init-weights/--pretrained did not load (the new "
            "head) for this many epochs first, as fastai's fine_tune"
        ),
        ge=0,
    )
    layer_lr_min: float = option(
        default=1.0,
        help=(
            "fine-tuning: learning-rate multiplier of the first loaded layer; the loaded layers' "
            "multipliers rise geometrically to 1 at the last, new layers get 1 (0.01 = fastai's "
            "slice(lr/100, lr); 1 = one rate for all)"
        ),
        gt=0,
        le=1,
    )
    out: str = option(
        default="runs/train", help="run folder to create (model/, history.csv, metrics.json, plot.png, logs)"
    )
    recipe: str = option(
        default="default",
        help=(
            "training recipe, filling only the keys you do not set: auto (decided from your data: model, "
            "image size, batch size, epochs, augmentation, flip and a learning-rate range test; the "
            "default of `imgclf train` and imgclf.train(); the log says what it chose and why), best "
            "(our measured settings per dataset and model), tutorial (the tutorial's exact settings), "
            "default (the plain values listed here; also what a TrainConfig built directly holds)"
        ),
        choices=RECIPES,
    )
    epochs: int = option(default=20, help="number of passes over the training set", ge=1)
    batch_size: int = option(default=32, help="images per optimisation step", ge=1)
    optimizer: str = option(default="adam", help="optimizer", choices=("adam", "adamw", "sgd", "adadelta"))
    lr: float = option(default=1e-3, help="initial learning rate", gt=0)
    lr_decay: float | None = option(
        default=None,
        help="Keras-style decay: lr/(1+decay*step); default lr/epochs with adam, as the tutorial",
        ge=0,
    )
    schedule: str = option(
        default="keras-decay",
        help="learning-rate schedule",
        choices=("keras-decay", "cosine", "onecycle", "constant"),
    )
    warmup_epochs: float = option(
        default=0.0, help="linear warm-up length in epochs (fractions allowed)", ge=0
    )
    momentum: float = option(default=0.9, help="SGD momentum", ge=0, lt=1)
    nesterov: bool = option(default=True, help="SGD: Nesterov momentum (the tutorials' Keras SGD has it off)")
    weight_decay: float = option(
        default=0.0, help="L2 weight decay (not applied to BatchNorm weights or biases)", ge=0, lt=1
    )
    label_smoothing: float = option(default=0.0, help="cross-entropy label smoothing (0 = off)", ge=0, lt=1)
    ema: float = option(
        default=0.0, help="exponential moving average of weights, e.g. 0.999 (0 = off)", ge=0, lt=1
    )
    img_size: int | None = option(
        default=None, help="square input side in pixels (default: the model's)", ge=8, le=4096
    )
    channels: int | None = option(
        default=None, help="1 (greyscale) or 3 (RGB); default: 1 for greyscale data, else 3", choices=(1, 3)
    )
    mean: list[float] | None = option(default=None, help="per-channel mean subtracted after scaling to [0,1]")
    std: list[float] | None = option(
        default=None, help="per-channel std divided after subtracting the mean", gt=0
    )
    val_split: float = option(
        default=0.2, help="fraction of training data held out for validation (stratified, seeded)", ge=0, lt=1
    )
    test_split: float | None = option(
        default=None,
        help=(
            "fraction held out for testing (default: official split for built-ins, 0.2 for digits, 0 "
            "for folders)"
        ),
        ge=0,
        lt=1,
    )
    seed: int = option(default=42, help="random seed for splits, shuffling, augmentation and initialisation")
    subset: int | None = option(
        default=None, help="use at most this many training images (stratified); for quick runs", ge=1
    )
    augment: str = option(
        default="auto",
        help="augmentation: auto (on for folders, off for built-ins)",
        choices=("auto", "on", "off"),
    )
    rotation: float = option(default=25.0, help="augmentation: max rotation in degrees", ge=0, le=180)
    shift: float = option(default=0.1, help="augmentation: max width/height shift as a fraction", ge=0, le=1)
    shear: float = option(
        default=0.2, help="augmentation: max shear in degrees (Keras' shear_range)", ge=0, le=90
    )
    zoom: float = option(default=0.2, help="augmentation: zoom range (0.2 = 0.8x to 1.2x)", ge=0, lt=1)
    erase: float = option(
        default=0.0,
        help=(
            "augmentation: random-erasing probability (a random box of 2-25 % of the image filled with "
            "noise; 0 = off)"
        ),
        ge=0,
        le=1,
    )
    mixup: float = option(
        default=0.0,
        help=(
            "MixUp: blend each training batch with a shuffled copy of itself and weigh the two labels "
            "by the blend, drawn from Beta(a, a) with this a (0 = off; 0.2 is usual)"
        ),
        ge=0,
        le=10,
    )
    cutmix: float = option(
        default=0.0,
        help=(
            "CutMix: paste a box from a shuffled copy of each batch, the labels weighed by area; Beta(a, a) "
            "draws the area (0 = off; 1.0 is usual; with --mixup too, each batch takes one of the two)"
        ),
        ge=0,
        le=10,
    )
    aug_interp: str = option(
        default="bilinear",
        help=(
            "augmentation: how warped pixels are resampled; bilinear (as Keras) softens every training "
            "image, bicubic keeps small images about as sharp as the ones it is tested on (no more "
            "accurate on three small sets: docs/ACCURACY.md)"
        ),
        choices=("bilinear", "bicubic"),
    )
    flip: str = option(
        default="auto",
        help="horizontal flip: auto (on for folders, off for built-ins)",
        choices=("auto", "on", "off"),
    )
    patience: int = option(
        default=0,
        help="EarlyStopping: stop after this many epochs without val-loss improvement (0 = off)",
        ge=0,
    )
    reduce_lr_patience: int = option(
        default=0, help="ReduceLROnPlateau: epochs without improvement before lowering lr (0 = off)", ge=0
    )
    reduce_lr_factor: float = option(default=0.1, help="ReduceLROnPlateau: multiply lr by this", gt=0, lt=1)
    keep: str = option(
        default="best",
        help="weights saved in the bundle: best (lowest val loss) or last",
        choices=("best", "last"),
    )
    calibrate: str = option(
        default="temperature",
        help="after training, fit temperature scaling on the validation split so the probabilities "
        "match the accuracy (ECE before/after in metrics.json); none keeps the raw softmax",
        choices=("temperature", "none"),
    )
    ood_score: str = option(
        default=DEFAULT_OOD_SCORE,
        help="unknown-image score fitted after training (bench/ood.py measured them; none turns "
        "rejection off): predict, serve and exports answer unknown when it crosses the threshold",
        choices=(*OOD_SCORES, "none"),
    )
    keep_rate: float = option(
        default=0.95,
        help="share of validation images the unknown-image threshold keeps as known",
        gt=0,
        le=1,
    )
    negatives: str | None = option(
        default=None,
        help='folder of "none of these" images: the unknown threshold also rejects as many of them as it can',
    )
    dedup: str = option(
        default="group",
        help="duplicate handling before splitting: group (keep copies on one side), keep-one, off",
        choices=("group", "keep-one", "off"),
    )
    class_weights: str = option(
        default="none", help="auto weights the loss by inverse class frequency", choices=("none", "auto")
    )
    tta_check: bool = option(
        default=True,
        help="end training by scoring --tta's views on val and test beside one view (at most 30,000 "
        "predictions a split); it reports, predictions stay one view",
    )
    tensorboard: bool = option(default=True, help="write TensorBoard event files")
    workers: int = option(default=2, help="threads used to decode images", ge=1)
    threads: int | None = option(default=None, help="PyTorch compute threads (default: all cores)", ge=1)
    cache_dir: str | None = option(
        default=None, help="decoded-image cache (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf)"
    )
    max_pixels: int = option(
        default=100_000_000, help="refuse images with more pixels than this (decompression-bomb guard)", ge=1
    )
    stream: str = option(
        default="auto",
        help=(
            "where decoded images live: off (in memory), on (memory-mapped shards of the decoded store "
            "in cache_dir, read a batch at a time), auto (on when they exceed memory_budget_mb, "
            "and always with ray_workers > 1: each worker reads only its rows)"
        ),
        choices=("auto", "on", "off"),
    )
    memory_budget_mb: float = option(
        default=2048,
        help="decoded images (all splits) held in memory at most; beyond it stream: auto streams",
        gt=0,
    )
    shard_mb: float = option(default=256, help="size of one decoded-store shard file", gt=0)
    compile: bool = option(default=False, help="torch.compile the model (slower start, may train faster)")
    device: str = option(
        default="cpu",
        help=(
            "where to train: cpu (default), cuda, cuda:N, mps, or auto (a GPU when one is present); the"
            " bundle is saved for the CPU either way"
        ),
    )
    precision: str = option(
        default="fp32",
        help=(
            "fp32, or bf16: convolutions and dense layers compute in bfloat16 under autocast (weights, "
            "optimizer and the saved bundle stay float32), about 1.6-2x faster training on CPUs with "
            "native bf16 (AVX512-BF16/AMX), slower on others; auto: bf16 when training on such a CPU, "
            "else fp32 (the best recipe's choice)"
        ),
        choices=("fp32", "bf16", "auto"),
    )
    ray_workers: int | None = option(
        default=None,
        help=(
            "train data-parallel on Ray with this many workers (DDP; needs pip install 'imgclf[ray]'); "
            "the global batch size stays --batch-size"
        ),
        ge=1,
    )
    ray_address: str | None = option(
        default=None,
        help=(
            "Ray cluster to join with --ray-workers: auto (a `ray start` cluster on this machine) or "
            "ray://HEAD:10001; default: start a local one"
        ),
    )
    extra: dict[str, Any] = option(default_factory=dict, help="recipe-specific values (config files only)")

    def validate(self) -> TrainConfig:
        """Check every value's type, choices and range, then the cross-key rules.

        Raises :class:`ConfigError` naming the key, the value and what is accepted.
        """
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            setattr(self, f.name, _check(f, hints[f.name], getattr(self, f.name)))
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r}: use cpu, cuda, cuda:N, mps or auto")
        if not all(isinstance(k, str) for k in self.model_args):
            raise ConfigError(
                f"model_args must map names to values, e.g. {{'blocks': 2}}; got {self.model_args!r}"
            )
        held_out = self.val_split + (self.test_split or 0.0)
        if held_out > MAX_HELD_OUT:
            raise ConfigError(
                f"val_split {self.val_split} + test_split {self.test_split} holds out {held_out:.0%} of the "
                f"images, leaving {1 - held_out:.0%} to train on; keep the sum at or below {MAX_HELD_OUT}"
            )
        if not self.label_sep:
            raise ConfigError("label_sep: give a non-empty separator, e.g. _")
        for key in ("mean", "std"):
            vals = getattr(self, key)
            if vals is not None and self.channels is not None and len(vals) != self.channels:
                raise ConfigError(
                    f"{key} has {len(vals)} value(s) for {self.channels} channel(s); give one per channel"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, rejecting unknown keys with a close-match suggestion."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            msgs = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                msgs.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ConfigError(
                "unknown config key(s): " + ", ".join(msgs) + f". Valid keys: {', '.join(names)}"
            )
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a JSON or YAML config file."""
        return cls.from_dict(cls.read_file(path))

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        """The keys a JSON or YAML config file sets (unknown keys rejected), as written."""
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        if p.is_dir():
            raise ConfigError(f"{p}: is a folder; give a .yaml or .json config file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the config file ({e})") from None
        import yaml

        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                d = yaml.safe_load(text) or {}
            else:
                d = json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            kind = "YAML" if p.suffix.lower() in (".yaml", ".yml") else "JSON"
            detail = " ".join(str(e).strip().splitlines()[:3])
            raise ConfigError(f"{p}: not valid {kind} ({detail})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: expected a mapping of keys to values")
        try:
            cls.from_dict(d).validate()  # unknown keys and bad values fail here
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        return d

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


HELP: dict[str, str] = {f.name: f.metadata["help"] for f in fields(TrainConfig)}


def options_table() -> str:
    """The Markdown table of every key (type, default, accepted values, help), for the docs."""
    hints = typing.get_type_hints(TrainConfig)
    rows = ["| key | type | default | accepted | meaning |", "|---|---|---|---|---|"]
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if f.name == "recipe":
            default = f"{DEFAULT_RECIPE} (CLI and imgclf.train)"
        cells = [
            f"`{f.name}`",
            f"`{_type_name(hints[f.name])}`",
            f"`{default}`",
            _accepted(f),
            f.metadata["help"],
        ]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def options_markdown() -> str:
    """docs/OPTIONS.md, whole."""
    return (
        "# Training options\n\nEvery key of `imgclf train` (as `--key-name`), of `--config` files and of "
        "`imgclf.train(...)`.\nThis table is generated from `imgclf/training/config.py` "
        "(`python -m imgclf.training.config > docs/OPTIONS.md`);\n`tests/test_api.py` fails when it is "
        "out of date.\n\n" + options_table()
    )


if __name__ == "__main__":
    print(options_markdown(), end="")
