"""The one typed training configuration: defaults live here and nowhere else.

It flows CLI -> trainer -> bundle (``model.json['train_config']``). Unknown keys are
rejected with a suggestion, as Ultralytics' cfg does.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from imgclf.core.errors import ConfigError


@dataclass
class TrainConfig:
    """Everything that decides a training run."""

    data: str = "digits"  # folder path, IDX folder, or built-in: mnist, fashion-mnist, digits
    model: str | None = None  # registry name; None: lenet for greyscale built-ins, else smallervggnet
    model_args: dict[str, Any] = field(default_factory=dict)  # extra factory kwargs, e.g. {"blocks": 2}
    init_weights: str | None = (
        None  # safetensors file/bundle: load matching layers (imgclf.training.transfer)
    )
    pretrained: bool = False  # timm:<name> models only: start from timm's pretrained weights
    out: str = "runs/train"
    recipe: str = "default"  # default | tutorial | best (see imgclf.training.recipes)
    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "adam"  # adam | adamw | sgd | adadelta
    lr: float = 1e-3
    lr_decay: float | None = None  # Keras-style lr/(1+decay*iteration); None: lr/epochs for adam
    schedule: str = "keras-decay"  # keras-decay | cosine | onecycle | constant
    warmup_epochs: float = 0.0
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only: Nesterov momentum (Keras' SGD default is off)
    weight_decay: float = 0.0  # never applied to BatchNorm weights or biases
    label_smoothing: float = 0.0
    ema: float = 0.0  # EMA decay of weights (0 = off), e.g. 0.999
    img_size: int | None = None  # None: the model's default input size
    channels: int | None = None  # None: 1 for greyscale data, else 3
    mean: list[float] | None = None  # None: (0,...) with scale 1/255, as the tutorials
    std: list[float] | None = None
    val_split: float = 0.2
    test_split: float | None = None  # None: official split for built-ins, 0.2 for digits, 0 for folders
    seed: int = 42
    subset: int | None = None  # use at most this many training images (stratified), for quick runs
    augment: str = "auto"  # auto (on for folders, off for built-ins) | on | off
    rotation: float = 25.0  # degrees
    shift: float = 0.1  # fraction of width/height
    shear: float = 0.2  # degrees, as Keras' shear_range
    zoom: float = 0.2
    erase: float = 0.0  # random-erasing probability per image (0 = off)
    flip: str = "auto"  # auto (on for folders, off for digits/MNIST) | on | off
    patience: int = 0  # EarlyStopping on val loss; 0 = off
    reduce_lr_patience: int = 0  # ReduceLROnPlateau on val loss; 0 = off
    reduce_lr_factor: float = 0.1
    keep: str = "best"  # which weights go in the bundle: best (lowest val loss) | last
    dedup: str = "group"  # group | keep-one | off (see imgclf.analysis.doctor)
    class_weights: str = "none"  # none | auto (inverse class frequency)
    tensorboard: bool = True
    workers: int = 2  # decoding threads
    threads: int | None = None  # torch intra-op threads; None: torch's default
    cache_dir: str | None = None  # None: $IMGCLF_CACHE_DIR or ~/.cache/imgclf
    max_pixels: int = 100_000_000
    compile: bool = False  # torch.compile the model
    device: str = "cpu"  # cpu | cuda | cuda:N | mps | auto (cuda or mps when present)
    precision: str = "fp32"  # fp32 | bf16 (autocast: conv/linear math in bfloat16) | auto
    ray_workers: int | None = None  # data-parallel training on Ray with this many workers (imgclf[ray])
    ray_address: str | None = None  # Ray cluster: auto, ray://host:10001; None: start a local one
    extra: dict[str, Any] = field(default_factory=dict)  # recipe-specific values

    def validate(self) -> TrainConfig:
        """Check values; raises ConfigError naming the key and the fix."""
        choices = {
            "optimizer": {"adam", "adamw", "sgd", "adadelta"},
            "schedule": {"keras-decay", "cosine", "onecycle", "constant"},
            "augment": {"auto", "on", "off"},
            "flip": {"auto", "on", "off"},
            "keep": {"best", "last"},
            "dedup": {"group", "keep-one", "off"},
            "class_weights": {"none", "auto"},
            "recipe": {"default", "tutorial", "best"},
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {sorted(allowed)}")
        if self.epochs < 1:
            raise ConfigError("epochs must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if not 0.0 <= self.val_split < 1.0:
            raise ConfigError("val_split must be in [0, 1)")
        if self.test_split is not None and not 0.0 <= self.test_split < 1.0:
            raise ConfigError("test_split must be in [0, 1)")
        if self.channels not in (None, 1, 3):
            raise ConfigError("channels must be 1 or 3")
        if self.img_size is not None and self.img_size < 8:
            raise ConfigError("img_size must be >= 8")
        if self.lr <= 0:
            raise ConfigError("lr must be > 0")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ConfigError(f"precision={self.precision!r}: use fp32, bf16 or auto")
        if not 0.0 <= self.erase <= 1.0:
            raise ConfigError("erase must be a probability in [0, 1]")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r}: use cpu, cuda, cuda:N, mps or auto")
        if not isinstance(self.model_args, dict) or not all(isinstance(k, str) for k in self.model_args):
            raise ConfigError(
                f"model_args must map names to values, e.g. {{'blocks': 2}}; got {self.model_args!r}"
            )
        if self.ray_workers is not None and self.ray_workers < 1:
            raise ConfigError("ray_workers must be >= 1 (or leave it out to train in this process)")
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
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: expected a mapping of keys to values")
        cls.from_dict(d)  # unknown keys and bad values fail here, naming the file's key
        return d

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# --help text of every key; the CLI builds `imgclf train` options from these and the fields.
HELP: dict[str, str] = {
    "data": "image folder (<dir>/<class>/<img>, or <dir>/train|val|test/<class>/<img>), "
    "a folder of IDX files, or a built-in: mnist, fashion-mnist, digits",
    "model": "architecture from `imgclf models` (default: lenet for greyscale built-ins, else smallervggnet)",
    "init_weights": "transfer learning: a .safetensors file, bundle or run folder whose layers with "
    "the same name and shape are loaded before training (the classifier head is re-initialised "
    "when the class count differs)",
    "pretrained": "with --model timm:<name>: start from timm's pretrained weights (needs pip install "
    "'imgclf[timm]' and network access the first time)",
    "out": "run folder to create (model/, history.csv, metrics.json, plot.png, logs)",
    "recipe": "training recipe, filling only the keys you do not set: best (our tuned training; "
    "the default for `imgclf train` and imgclf.train()), tutorial (the tutorial's exact settings), "
    "default (the plain values listed here)",
    "epochs": "number of passes over the training set",
    "batch_size": "images per optimisation step",
    "optimizer": "adam | adamw | sgd | adadelta",
    "lr": "initial learning rate",
    "lr_decay": "Keras-style decay: lr/(1+decay*step); default lr/epochs with adam, as the tutorial",
    "schedule": "learning-rate schedule: keras-decay | cosine | onecycle | constant",
    "warmup_epochs": "linear warm-up length in epochs (fractions allowed)",
    "momentum": "SGD momentum",
    "nesterov": "SGD: Nesterov momentum (the tutorials' Keras SGD has it off)",
    "weight_decay": "L2 weight decay (not applied to BatchNorm weights or biases)",
    "label_smoothing": "cross-entropy label smoothing (0 = off)",
    "ema": "exponential moving average of weights, e.g. 0.999 (0 = off)",
    "img_size": "square input side in pixels (default: the model's)",
    "channels": "1 (greyscale) or 3 (RGB); default: 1 for greyscale data, else 3",
    "mean": "per-channel mean subtracted after scaling to [0,1]",
    "std": "per-channel std divided after subtracting the mean",
    "val_split": "fraction of training data held out for validation (stratified, seeded)",
    "test_split": "fraction held out for testing (default: official split for built-ins, "
    "0.2 for digits, 0 for folders)",
    "seed": "random seed for splits, shuffling, augmentation and initialisation",
    "subset": "use at most this many training images (stratified); for quick runs",
    "augment": "auto (on for folders, off for built-ins) | on | off",
    "rotation": "augmentation: max rotation in degrees",
    "shift": "augmentation: max width/height shift as a fraction",
    "shear": "augmentation: max shear in degrees (Keras' shear_range)",
    "zoom": "augmentation: zoom range (0.2 = 0.8x to 1.2x)",
    "erase": "augmentation: random-erasing probability (a random box of 2-25 % of the image "
    "filled with noise; 0 = off)",
    "flip": "horizontal flip: auto (on for folders, off for built-ins) | on | off",
    "patience": "EarlyStopping: stop after this many epochs without val-loss improvement (0 = off)",
    "reduce_lr_patience": "ReduceLROnPlateau: epochs without improvement before lowering lr (0 = off)",
    "reduce_lr_factor": "ReduceLROnPlateau: multiply lr by this",
    "keep": "weights saved in the bundle: best (lowest val loss) | last",
    "dedup": "duplicate handling before splitting: group (keep copies on one side) | keep-one | off",
    "class_weights": "none | auto (weight the loss by inverse class frequency)",
    "tensorboard": "write TensorBoard event files",
    "workers": "threads used to decode images",
    "threads": "PyTorch compute threads (default: all cores)",
    "cache_dir": "decoded-image cache (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf)",
    "max_pixels": "refuse images with more pixels than this (decompression-bomb guard)",
    "device": "where to train: cpu (default), cuda, cuda:N, mps, or auto (a GPU when one is "
    "present); the bundle is saved for the CPU either way",
    "precision": "fp32; bf16: convolutions and dense layers compute in bfloat16 under autocast "
    "(weights, optimizer and the saved bundle stay float32), about 1.6-2x faster training on "
    "CPUs with native bf16 (AVX512-BF16/AMX), slower on others; auto: bf16 when training on "
    "such a CPU, else fp32 (the best recipe's choice)",
    "compile": "torch.compile the model (slower start, may train faster)",
    "ray_workers": "train data-parallel on Ray with this many workers (DDP; needs pip install "
    "'imgclf[ray]'); the global batch size stays --batch-size",
    "ray_address": "Ray cluster to join with --ray-workers: auto (a `ray start` cluster on this "
    "machine) or ray://HEAD:10001; default: start a local one",
    "extra": "recipe-specific values (config files only)",
    "model_args": "extra arguments for the model factory as KEY=VALUE (values read as JSON), "
    "e.g. --model-args blocks=2 width=16; `imgclf models` lists each model's",
}
