"""The ``auto`` recipe: training values decided from the data and short measurements.

Nothing here looks a dataset up by name. The decisions, each logged with its reason:

* from the listing (before decoding, :func:`plan`): the model when none is given, the image
  size (the images' own median short side, within a pixel budget per epoch; for resnet10s large
  photos never below 64 px and small photos of a large set upsampled to it), the batch size
  and the number of epochs (from the training-set size), early-stopping patience and the
  augmentation strength;
* from the decoded training images (:func:`flip_test`): whether a horizontal flip keeps an
  image in its class (held-out images, as they are and mirrored, go through a nearest-class-mean
  classifier);
* from a short measurement on the built model (:func:`find_lr`): the learning rate, by a
  range test as fastai's ``lr_find`` (Smith 2017): the rate rises exponentially over a few
  dozen steps and the choice is a tenth of the rate with the lowest smoothed loss.

Values the user gives are never changed: only the keys in ``cfg.extra["auto"]`` (set by
:func:`imgclf.training.recipes.config_from` to the keys the user left unset) are decided.
Every rule was chosen on some of the suite's datasets and checked on the others
(docs/ACCURACY.md, "The auto recipe").
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.data import sources as D

log = logging.getLogger("imgclf")

# Keys the auto recipe fills without the data (recipes.config_from puts them in).
STATIC: dict[str, Any] = {
    "optimizer": "adamw",
    "weight_decay": 0.05,
    "schedule": "cosine",
    "warmup_epochs": 1.0,
    "label_smoothing": 0.1,
    "precision": "auto",
    "augment": "on",
    "shear": 0.0,
    "keep": "best",
}
# Keys decided from the data; a key the user gave is left out of cfg.extra["auto"].
DATA_KEYS = (
    "model",
    "img_size",
    "batch_size",
    "epochs",
    "patience",
    "rotation",
    "shift",
    "zoom",
    "flip",
    "lr",
    "freeze_epochs",
    "layer_lr_min",
)
LATE_KEYS = ("flip", "lr")  # decided in Trainer.setup: they need decoded images / the built model
# Training pixels per epoch that set the image size (about 9-13 s an epoch of resnet10s here). For
# resnet10s the cost follows its first stage, not the input: 32, 64 and 128 px inputs all reach a
# 32 px first stage and cost alike, 48 and 96 px reach 48 px and cost about twice as much
# (bench/size_cost.py); so for it the budget never shrinks a photo of 64+ px below UPSAMPLE_TO,
# and photos of LARGE_PHOTO_MIN+ px skip the budget (below).
PIXEL_BUDGET = 8_000_000
SIZES = (32, 48, 64, 96, 128)
# Small photos (16-63 px) go to UPSAMPLE_TO px for resnet10s once the training split holds
# UPSAMPLE_MIN_TRAIN images (the stem's stride 2 brings 64 px to a 32 px first stage, about the
# native 30, so the cost is 1.1-1.3x; why it pays is not known). Upsampling was a wash on five
# small sets of 245-2,100 training images and a gain on
# five sets of 3,500-4,900; the threshold is the midpoint of 2,100 and 3,500 (docs/ACCURACY.md,
# "Larger small-photo sets" and "Where the threshold sits").
UPSAMPLE_TO = 64
UPSAMPLE_MIN_TRAIN = 2800
# Photos of LARGE_PHOTO_MIN px or more train resnet10s at LARGE_PHOTO_SIZE whatever the set's size:
# 128 px costs it what 64 px does (the stem's max-pool gives the same 32 px first stage) while the
# budget's 96 px step costs twice as much, and hymenoptera measured 128 px 5.6 points above 64 px
# (docs/ACCURACY.md, "Large photos at 128 px"; Sign, the one other set it changes, lost 0.16 points
# over three seeds, within the one test image the rule allowed, at 1.3x the epoch time).
LARGE_PHOTO_MIN = 96
LARGE_PHOTO_SIZE = 128
# Optimizer steps a run aims at (epochs = this / steps per epoch, within EPOCHS). 4,000 beat 2,000
# by +0.83 (Fashion-MNIST) and +1.10 (fashion28m) over two seeds each, and natural-images, the
# check, held (93.84 vs 93.70 over three): docs/ACCURACY.md, "Step budget".
TARGET_STEPS = 4000
EPOCHS = (10, 50)
# Warp strength by training images a class: (below this many, strength) in order, else
# STRENGTH_REST; strength 1 is rotation 20, shift 0.2, zoom 0.3. Fewer images -> more invariance
# must come from the warps. Half strength for 200-999 a class (the unmeasured first rule) lost to a
# quarter by +0.99 (fashion28m) and +0.40 (natural-images) over two seeds, checks held (mnist28m
# +0.12, natural-images' third seed +1.01); full strength lost on all four runs: docs/ACCURACY.md,
# "Weaker warps for mid-sized sets".
STRENGTH_TIERS: tuple[tuple[int, float], ...] = ((200, 1.0),)
STRENGTH_REST = 0.25
# Flip off when mirrored images keep less of the nearest-mean margin than FLIP_KEEP ... Placed
# between the two sets where a flip A/B exists (Sign Language 12 %: off was better; Fashion-MNIST
# 83 %: on was better); MNIST (59 %), natural-images (90 %), hymenoptera (100 %) confirm it.
FLIP_KEEP = 0.7
FLIP_Z = 3.0  # ... and the loss is this clear (paired z), so small noisy sets keep the flip
LR_STEPS = 80
# Range of the test per optimizer family: adaptive rates live about 100x below SGD rates.
LR_RANGE = {"sgd": (1e-4, 10.0), "adadelta": (1e-2, 100.0)}
LR_RANGE_ADAPTIVE = (1e-5, 1.0)
# How a range test's trace becomes a rate (pick_lr); LR_RULES are the rules it knows.
LR_RULES = ("min10", "min5", "valley", "steep")
LR_RULE = "min10"
# Range tests whose picks' median is the rate: one test's pick moves 2-5x with its batches alone
# (bench/lr_rule.py), and so with the CPU's rounding.
LR_REPEATS = 1
LR_CLAMP = {"adam": (1e-4, 1e-2), "adamw": (1e-4, 1e-2), "sgd": (1e-3, 0.5), "adadelta": (0.1, 10.0)}


@dataclass
class Plan:
    """What the auto recipe decided and why (one reason a key), written into the run's config."""

    values: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: Any, reason: str) -> None:
        self.values[key] = value
        self.reasons[key] = reason


def auto_keys(cfg: Any) -> set[str]:
    """The keys this run's auto recipe may still decide."""
    if cfg.recipe != "auto":
        return set()
    return set(cfg.extra.get("auto", []))


def _native_side(index: D.SourceIndex, sample: int = 200) -> tuple[int, int]:
    """(median short side, images measured) from up to ``sample`` evenly spaced headers."""
    if index.arrays is not None:
        return int(min(index.arrays.shape[1:3])), len(index)
    from imgclf.core.imageio import image_size

    step = max(1, len(index) // sample)
    sides = []
    for path in index.items[::step][:sample]:
        try:
            if index.reader:  # tar members
                size = image_size(index.reader(path))
            else:
                with open(path, "rb") as f:
                    size = image_size(f.read())
        except OSError:
            size = None
        if size:
            sides.append(min(size))
    return (int(np.median(sides)) if sides else 64), len(sides)


def _train_count(cfg: Any, index: D.SourceIndex) -> int:
    if index.has_predefined_split:
        n = int((index.split == "train").sum())
        if not (index.split == "val").any():
            n = int(n * (1 - cfg.val_split))
    else:
        n = int(len(index) * (1 - cfg.val_split - (cfg.test_split or 0.0)))
    if cfg.subset:
        n = min(n, int(cfg.subset))
    return max(n, 1)


def plan(cfg: Any, index: D.SourceIndex) -> Plan:
    """Decisions from the listing: model, image size, batch size, epochs, patience, augmentation."""
    keys = auto_keys(cfg)
    p = Plan()
    n = _train_count(cfg, index)
    k = len(index.classes)
    grey_builtin = index.kind in ("idx", "digits") and index.native_channels == 1
    if "model" in keys:
        if grey_builtin:
            p.set("model", "lenet", "greyscale digit/clothing benchmark: LeNet trains in minutes on a CPU")
        else:
            p.set("model", "resnet10s", "photos: a small ResNet (batch norm, residuals, global pooling)")
    if "img_size" in keys:
        native, measured = _native_side(index)
        budget = math.sqrt(PIXEL_BUDGET / n)
        fits = [s for s in SIZES if s <= budget] or [SIZES[0]]
        size = min(fits[-1], native) if native >= 16 else max(native, 8)
        why = (
            f"median short side {native} px over {measured} images; {n} training images fit "
            f"{int(budget)} px within {PIXEL_BUDGET / 1e6:.0f} MP an epoch"
        )
        model = p.values.get("model", cfg.model)
        if model == "resnet10s" and native >= LARGE_PHOTO_MIN and size != LARGE_PHOTO_SIZE:
            size = LARGE_PHOTO_SIZE
            why += (
                f"; photos of {LARGE_PHOTO_MIN}+ px train at {LARGE_PHOTO_SIZE} px: it costs resnet10s what "
                "64 px does (both reach a 32 px first stage) and beat 64 px by 5.6 points on hymenoptera"
            )
        elif native >= 16 and size < UPSAMPLE_TO and model == "resnet10s":
            if native >= UPSAMPLE_TO:
                # A 32-48 px copy of a large photo is what the small sets measured at their own
                # size, and it lost to 64 px on every larger set; 64 px costs what 32 px does.
                size = UPSAMPLE_TO
                why += (
                    f"; not shrunk below {UPSAMPLE_TO} px: it costs resnet10s what 32 px does (both reach a "
                    "32 px first stage) and beat ~30 px by 0.1-4.3 points on 5 sets of 3,500-4,900"
                )
            elif n >= UPSAMPLE_MIN_TRAIN:
                size = UPSAMPLE_TO
                why += (
                    f"; small photos upsampled to {UPSAMPLE_TO} px: with {UPSAMPLE_MIN_TRAIN}+ training "
                    "images it paid 0.1-4.3 points on 5 sets of 3,500-4,900"
                )
            else:
                why += (
                    f"; small photos kept at their size: below {UPSAMPLE_MIN_TRAIN} training images "
                    "upsampling was a wash (5 sets)"
                )
        p.set("img_size", int(size), why)
    bs = int(cfg.batch_size)
    if "batch_size" in keys:
        bs = int(min(64, max(16, 2 ** round(math.log2(max(n / 40, 1))))))
        p.set("batch_size", bs, f"{n} training images: about 40 batches an epoch, within 16-64")
    steps = max(1, n // bs)
    epochs = int(cfg.epochs)
    if "epochs" in keys:
        epochs = int(min(EPOCHS[1], max(EPOCHS[0], math.ceil(TARGET_STEPS / steps))))
        p.set(
            "epochs",
            epochs,
            f"{steps} steps an epoch: about {TARGET_STEPS} steps, within {EPOCHS[0]}-{EPOCHS[1]}",
        )
    if "patience" in keys:
        p.set("patience", max(5, epochs // 3), "stop when val loss has not improved for a third of the run")
    if cfg.init_weights or cfg.pretrained:
        # Fine-tune as fastai's fine_tune: the new head alone first, then every layer with rates
        # that shrink towards the input (early layers hold the most general features).
        if "freeze_epochs" in keys:
            p.set("freeze_epochs", max(1, epochs // 10), "starting from loaded weights: the new head first")
        if "layer_lr_min" in keys:
            p.set("layer_lr_min", 0.01, "starting from loaded weights: first layer at lr/100, as fastai")
    # Fewer images per class -> stronger augmentation (more invariance must come from it).
    per_class = n / max(k, 1)
    strength = next((s for below, s in STRENGTH_TIERS if per_class < below), STRENGTH_REST)
    if "rotation" in keys:
        p.set("rotation", 20.0 * strength, f"{per_class:.0f} training images a class")
    if "shift" in keys:
        p.set("shift", round(0.2 * strength, 3), f"{per_class:.0f} training images a class")
    if "zoom" in keys:
        p.set("zoom", round(0.3 * strength, 3), f"{per_class:.0f} training images a class")
    return p


@torch.no_grad()
def flip_test(images: np.ndarray, labels: np.ndarray, seed: int, sample: int = 4000) -> tuple[bool, str]:
    """Whether a horizontal flip keeps images in their class, from a nearest-class-mean classifier.

    Class means come from half of a sample of training images (at 16 px, standardised); the
    other half is classified as it is and mirrored. The flip is turned off only when the mirrored
    images lose clearly (a paired McNemar z above ``FLIP_Z``) more than ``1 - FLIP_KEEP`` of the
    margin over chance: a mirrored 3 or a mirrored hand sign is another picture, while photos of
    objects seen from either side lose nothing but noise.
    """
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(labels))[:sample]
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(16, 16), mode="area")
    y = torch.from_numpy(labels[idx]).long()
    k = int(labels.max()) + 1
    half = len(idx) // 2
    flat = x.flatten(1)
    mu, sd = flat[:half].mean(0), flat[:half].std(0).clamp_min(1e-3)

    def feats(t: torch.Tensor) -> torch.Tensor:
        return F.normalize((t.flatten(1) - mu) / sd, dim=1)

    means = torch.zeros(k, flat.shape[1]).index_add_(0, y[:half], feats(x[:half]))
    means = F.normalize(means, dim=1)
    test, yt = x[half:], y[half:]
    right = (feats(test) @ means.T).argmax(1) == yt
    right_m = (feats(test.flip(-1)) @ means.T).argmax(1) == yt
    acc, acc_m = float(right.float().mean()), float(right_m.float().mean())
    lost, gained = int((right & ~right_m).sum()), int((~right & right_m).sum())
    z = (lost - gained) / math.sqrt(max(lost + gained, 1))
    chance = 1.0 / k
    kept = (acc_m - chance) / max(acc - chance, 1e-6)
    on = not (z > FLIP_Z and kept < FLIP_KEEP)
    why = (
        f"nearest-mean accuracy {acc:.2f} on {len(yt)} held-out training images, {acc_m:.2f} mirrored: "
        f"{kept:.0%} of the margin over chance kept, McNemar z {z:.1f} "
        f"(off below {FLIP_KEEP:.0%} with z > {FLIP_Z:g})"
    )
    return on, why


def find_lr(
    model: torch.nn.Module,
    make_opt: Any,
    batches: Any,
    loss_fn: Any,
    optimizer: str,
    steps: int = LR_STEPS,
    repeats: int | None = None,
) -> tuple[float, str, list[tuple[float, float]]]:
    """Learning-rate range test, ``repeats`` times (``LR_REPEATS``); the model is left as it was.

    ``make_opt(model, lr)`` builds the optimizer, ``batches(i)`` gives batch ``i`` as (x, y) and
    ``loss_fn(model, x, y)`` its loss. Each repeat starts from the same weights on the next
    batches; the rate is the median of the repeats' picks. Returns (chosen rate, reason,
    [(rate, smoothed loss)] of the test whose pick was the median).
    """
    repeats = LR_REPEATS if repeats is None else max(1, int(repeats))
    tests = []
    for r in range(repeats):
        shifted = lambda i, r=r: batches(r * steps + i)  # noqa: E731  (repeat r: the next batches)
        trace = _range_trace(model, make_opt, shifted, loss_fn, optimizer, steps)
        tests.append((*pick_lr(trace, optimizer), trace))
    tests.sort(key=lambda t: t[0])
    lr, why, trace = tests[(len(tests) - 1) // 2]
    if len(tests) > 1:
        picks = ", ".join(f"{t[0]:.2g}" for t in tests)
        why = f"median of {len(tests)} range tests (picks {picks}); the median one: {why}"
    return lr, why, trace


def _range_trace(
    model: torch.nn.Module, make_opt: Any, batches: Any, loss_fn: Any, optimizer: str, steps: int
) -> list[tuple[float, float]]:
    """One range test's [(rate, smoothed loss)]; the model's weights and torch's RNG are restored."""
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    lo, hi = LR_RANGE.get(optimizer, LR_RANGE_ADAPTIVE)
    opt = make_opt(model, lo)
    model.train()
    trace: list[tuple[float, float]] = []
    avg, best = 0.0, math.inf
    try:
        for i in range(steps):
            lr = lo * (hi / lo) ** (i / max(1, steps - 1))
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = batches(i)
            loss = loss_fn(model, x, y)
            v = float(loss.detach())
            if not math.isfinite(v):
                break
            avg = 0.9 * avg + 0.1 * v
            smooth = avg / (1 - 0.9 ** (i + 1))  # bias-corrected running mean
            trace.append((lr, smooth))
            if i > 5 and smooth > 4 * best:
                break  # diverged: higher rates only get worse
            best = min(best, smooth)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        model.load_state_dict(state)
        torch.set_rng_state(rng)
    return trace


def pick_lr(trace: list[tuple[float, float]], optimizer: str, rule: str | None = None) -> tuple[float, str]:
    """The rate ``rule`` (one of ``LR_RULES``; default ``LR_RULE``) reads off a range test's
    [(rate, smoothed loss)].

    ``min10``: a tenth of the rate with the lowest loss (fastai's ``minimum``); ``min5``: a fifth
    of it ("The rate rule: a fifth", docs/ACCURACY.md). ``valley``:
    halfway along the longest run of falling losses (fastai's default ``valley``). ``steep``: where
    the loss falls fastest against log(rate) (fastai's ``steep``). Clamped to ``LR_CLAMP``.
    """
    rule = LR_RULE if rule is None else rule  # read at call time: benches set auto.LR_RULE
    lo_c, hi_c = LR_CLAMP.get(optimizer, (1e-5, 1.0))
    if len(trace) < 10:
        return lo_c, f"range test stopped after {len(trace)} steps; using the floor {lo_c:g}"
    # Skip the first steps: the running mean is still dominated by the untrained loss.
    core = trace[5:]
    lrs = [t[0] for t in core]
    losses = [t[1] for t in core]
    i_min = min(range(len(core)), key=lambda i: losses[i])
    if rule in ("min10", "min5"):
        div = int(rule[3:])
        raw = lrs[i_min] / div
        how = f"lowest smoothed loss {losses[i_min]:.3f} at lr {lrs[i_min]:.2g}; a {_PART[div]} of it"
    elif rule == "valley":
        start, end = _longest_valley(losses)
        i = start + (end - start) // 2
        raw = lrs[i]
        how = f"longest falling stretch lr {lrs[start]:.2g}-{lrs[end]:.2g}; its middle"
    elif rule == "steep":
        # Central differences up to the lowest point; none when the lowest point is at the start.
        i = min(range(1, i_min), key=lambda j: losses[j + 1] - losses[j - 1]) if i_min > 1 else 0
        raw = lrs[i]
        how = f"steepest fall of the loss at lr {raw:.2g}"
    else:
        raise ValueError(f"unknown learning-rate rule {rule!r}; choose one of {', '.join(LR_RULES)}")
    lr = float(min(hi_c, max(lo_c, raw)))
    return lr, f"range test over {len(trace)} steps: {how}, within {lo_c:g}-{hi_c:g}"


_PART = {10: "tenth", 5: "fifth"}


def _longest_valley(losses: list[float]) -> tuple[int, int]:
    """(start, end) of the longest strictly falling subsequence of ``losses`` (fastai's valley)."""
    n = len(losses)
    run = [1] * n
    prev = list(range(n))
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[j] + 1 > run[i]:
                run[i], prev[i] = run[j] + 1, j
    end = max(range(n), key=lambda i: run[i])
    start = end
    while prev[start] != start:
        start = prev[start]
    return start, end
