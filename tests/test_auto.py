"""The auto recipe: its decisions follow the data, keep the user's values, and repeat for a seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, _need

import imgclf
from imgclf.core.preprocess import Preprocess
from imgclf.data import sources as D
from imgclf.training import auto
from imgclf.training.recipes import COUPLED_WEIGHT_DECAY, config_from
from imgclf.training.trainer import prepare_data, resolve_defaults


def _resolved(data: str, **given: object):
    cfg = config_from({"data": data, **given})
    index = D.index_source(cfg.data, None)
    return resolve_defaults(cfg, index), index


def test_listing_decisions_follow_each_dataset(sign_dir: Path) -> None:
    hymeno = _need(SHARED / "hymenoptera")
    natural = _need(SHARED / "natural-images")
    sign, _ = _resolved(str(sign_dir))
    hym, _ = _resolved(str(hymeno))
    nat, _ = _resolved(str(natural))
    # Image size: 100 px hands and ~370 px insects at 128 px (photos of 96+ px, for resnet10s);
    # 4,829 training photos of 30 px upsampled to 64 px for resnet10s, and 3,000 of them (above
    # the 2,800 threshold); 2,000 of them kept at 30 px.
    assert (sign.img_size, hym.img_size, nat.img_size) == (128, 128, 64)
    mid, _ = _resolved(str(natural), subset=3000)
    assert mid.img_size == 64 and "upsampled" in mid.extra["auto_reasons"]["img_size"]
    few, _ = _resolved(str(natural), subset=2000)
    assert few.img_size == 30 and "kept at their size" in few.extra["auto_reasons"]["img_size"]
    vgg, _ = _resolved(str(natural), model="smallervggnet")
    assert vgg.img_size == 30  # the rule was measured on resnet10s only
    # Fewer images: smaller batches, more epochs (about TARGET_STEPS steps), stronger augmentation.
    assert hym.batch_size < sign.batch_size <= nat.batch_size
    assert hym.epochs >= sign.epochs >= nat.epochs
    mnist_full, _ = _resolved("mnist")
    for cfg in (sign, hym, nat, mnist_full):
        steps = int(cfg.extra["auto_reasons"]["epochs"].split()[0])  # "N steps an epoch: ..."
        assert cfg.epochs == min(auto.EPOCHS[1], max(auto.EPOCHS[0], math.ceil(auto.TARGET_STEPS / steps)))
    assert mnist_full.epochs < nat.epochs  # 54,000 training images need fewer passes
    assert hym.rotation > nat.rotation
    assert {sign.model, hym.model, nat.model} == {"resnet10s"}
    mnist, _ = _resolved("mnist", subset=2000)
    assert mnist.model == "lenet" and mnist.img_size == 28
    for cfg in (sign, hym, nat, mnist):
        assert cfg.extra["auto"] == ["flip", "lr"]  # left for the decoded images and the model
        assert set(cfg.extra["auto_reasons"]) >= {"img_size", "batch_size", "epochs"}


def test_large_photos_train_resnet10s_at_128_px_whatever_the_set_size(sign_dir: Path, tmp_path: Path) -> None:
    # Sign's 100 px photos listed twice: 2,886 training images, where the pixel budget alone
    # allows 48 px; resnet10s gets LARGE_PHOTO_SIZE, which costs it what 64 px does.
    files = sorted(f for f in sign_dir.glob("*/*") if f.is_file())
    rows = [f"{f},{f.parent.name}" for f in files] * 2
    manifest = tmp_path / "twice.csv"
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    big, _ = _resolved(str(manifest))
    why = big.extra["auto_reasons"]["img_size"]
    assert why.split("fit ")[1].startswith("52 px")  # the budget's own answer, below 64
    assert big.img_size == auto.LARGE_PHOTO_SIZE == 128 and "photos of 96+ px" in why
    vgg, _ = _resolved(str(manifest), model="smallervggnet")
    assert vgg.img_size == 48  # the rule was measured on resnet10s only: the budget decides
    # Half of Sign (~720 training images): the budget alone gives 100 px (its 96 px step capped
    # by the photos' size), a size that costs resnet10s twice what 128 px does.
    half, _ = _resolved(str(sign_dir), subset=720)
    assert "fit 105 px" in half.extra["auto_reasons"]["img_size"] and half.img_size == 128
    # The same photos shrunk to 80 px (64-95 px photos): not upsampled to 128, not shrunk below 64.
    from PIL import Image

    small = []
    for f in files:
        out = tmp_path / "80px" / f.parent.name / f"{f.stem}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im:
            im.convert("RGB").resize((80, 80)).save(out)
        small.append(f"{out},{f.parent.name}")
    (tmp_path / "80px.csv").write_text("path,label\n" + "\n".join(small * 2) + "\n")
    mid, _ = _resolved(str(tmp_path / "80px.csv"))
    assert mid.img_size == 64 and "not shrunk below 64 px" in mid.extra["auto_reasons"]["img_size"]


def test_user_values_are_never_decided(sign_dir: Path) -> None:
    cfg, _ = _resolved(str(sign_dir), model="simplecnn", lr=0.004, epochs=3, flip="on", img_size=48)
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.flip, cfg.img_size) == ("simplecnn", 0.004, 3, "on", 48)
    assert "lr" not in cfg.extra["auto"] and "flip" not in cfg.extra["auto"]
    assert "epochs" not in cfg.extra["auto_reasons"]
    tut = config_from({"data": str(sign_dir), "recipe": "tutorial", "model": "simplecnn"})
    assert tut.lr == 1e-3 and tut.epochs == 25 and "auto" not in tut.extra


def test_another_optimizer_gets_a_weight_decay_it_can_train_with(tmp_path: Path) -> None:
    """AdamW's decoupled 0.05, added to Adam's gradient, kept LeNet on digits at chance."""
    assert config_from({"data": "digits"}).weight_decay == auto.STATIC["weight_decay"]
    assert config_from({"data": "digits", "optimizer": "sgd"}).weight_decay == COUPLED_WEIGHT_DECAY
    # The best recipes' AdamW decays follow the same rule.
    best = config_from({"data": "digits", "model": "lenet", "recipe": "best", "optimizer": "adam"})
    assert best.weight_decay == COUPLED_WEIGHT_DECAY
    assert config_from({"data": "digits", "optimizer": "adam", "weight_decay": 0.01}).weight_decay == 0.01
    res = imgclf.train(
        data="digits", model="lenet", optimizer="adam", epochs=3, out=str(tmp_path / "r"), tensorboard=False
    )
    assert res.metrics["test_accuracy"] > 0.6  # 0.10 with weight decay 0.05


def _decoded(data: str, n: int | None = None):
    cfg = config_from({"data": data, "subset": n} if n else {"data": data})
    index = D.index_source(cfg.data, None)
    cfg = resolve_defaults(cfg, index)
    return prepare_data(cfg, index, Preprocess((32, 32), int(cfg.channels)), False).train


def test_flip_test_turns_flip_off_for_digits_and_hands_on_for_photos(sign_dir: Path) -> None:
    sign = _decoded(str(sign_dir))
    mnist = _decoded("mnist", 3000)
    hym = _decoded(str(_need(SHARED / "hymenoptera")))
    assert not auto.flip_test(sign.images, sign.labels, 42)[0]
    assert not auto.flip_test(mnist.images, mnist.labels, 42)[0]
    assert auto.flip_test(hym.images, hym.labels, 42)[0]
    # A dataset made of mirror images of itself is flip-invariant by construction.
    both = np.concatenate([sign.images, sign.images[:, :, ::-1]])
    on, why = auto.flip_test(both, np.concatenate([sign.labels, sign.labels]), 42)
    assert on, why


def test_find_lr_restores_the_model_and_picks_a_working_rate() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    with torch.random.fork_rng():  # a fixed init: the test's outcome must not hang on earlier tests
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    def batch(i: int):
        idx = torch.arange(i * 32, i * 32 + 32) % 512
        return x[idx], y[idx]

    def make_opt(m: torch.nn.Module, lr: float):
        return torch.optim.AdamW(m.parameters(), lr=lr)

    lr, why, trace = auto.find_lr(model, make_opt, batch, lambda m, a, b: F.cross_entropy(m(a), b), "adamw")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert 1e-4 <= lr <= 1e-2 and "range test" in why
    assert len(trace) < auto.LR_STEPS  # the loss blew up at the top of the range and the test stopped
    # The chosen rate trains the model: 60 steps from scratch reach a low loss.
    opt = make_opt(model, lr)
    for i in range(60):
        a, b = batch(i)
        loss = F.cross_entropy(model(a), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(F.cross_entropy(model(x), y).detach()) < 0.3


def test_pick_lr_rules_read_the_curve(monkeypatch: pytest.MonkeyPatch) -> None:
    # A loss falling from 2.0 to its lowest point at rate 0.1, then rising: 41 rates, 1e-5 .. 1.
    lrs = [1e-5 * 10 ** (i / 8) for i in range(41)]
    trace = [(lr, 1.0 + (math.log10(lr) + 1) ** 2 / 8) for lr in lrs]
    lr, why = auto.pick_lr(trace, "adamw", "min10")
    assert lr == pytest.approx(0.01) and "a tenth" in why
    # min5: a fifth (SGD's clamp, 1e-3..0.5, leaves 0.02 as it is; Adam's would cap it at 0.01)
    lr, why = auto.pick_lr(trace, "sgd", "min5")
    assert lr == pytest.approx(0.02) and "a fifth" in why
    assert auto.pick_lr(trace, "adamw", "min5")[0] == pytest.approx(0.01)
    monkeypatch.setattr(auto, "LR_RULE", "min5")  # the default rule is read at call time
    assert auto.pick_lr(trace, "sgd")[0] == pytest.approx(0.02)
    # valley: the middle of the falling stretch (from the 6th point, after the skipped ones, to 0.1)
    lr, _ = auto.pick_lr(trace, "adamw", "valley")
    assert lrs[5] < lr < 0.01
    # steep: the loss falls fastest at the start of this parabola in log(rate)
    lr, _ = auto.pick_lr(trace, "adamw", "steep")
    assert lr == pytest.approx(1e-4)  # the floor of Adam's clamp
    assert auto.pick_lr(trace[:8], "adamw", "min10")[0] == 1e-4  # too short: the floor
    with pytest.raises(ValueError, match="valley"):
        auto.pick_lr(trace, "adamw", "lowest")


def test_find_lr_takes_the_median_of_repeated_tests() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 20, generator=g)
    y = (x[:, 0] - x[:, 2] > 0).long()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def batch(i: int):
        idx = torch.arange(i * 8, i * 8 + 8) % 4096  # small batches: each repeat's curve differs
        return x[idx] + 0.5 * torch.randn(8, 20, generator=torch.Generator().manual_seed(i)), y[idx]

    def make_opt(m: torch.nn.Module, lr: float):
        return torch.optim.SGD(m.parameters(), lr=lr)

    def loss(m, a, b):
        return F.cross_entropy(m(a), b)

    singles = []
    for r in range(5):  # each repeat r sees batches r*steps .. r*steps+steps-1
        shifted = lambda i, r=r: batch(r * 40 + i)  # noqa: E731
        singles.append(auto.find_lr(model, make_opt, shifted, loss, "sgd", steps=40, repeats=1)[0])
    lr, why, trace = auto.find_lr(model, make_opt, batch, loss, "sgd", steps=40, repeats=5)
    assert len(set(singles)) > 1  # the repeats disagree, so the median is a choice
    assert lr == sorted(singles)[2] and "median of 5 range tests" in why
    assert auto.pick_lr(trace, "sgd")[0] == lr  # the trace returned is the median test's
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auto_run_is_deterministic_for_a_seed_and_its_config_replays(sign_dir: Path, tmp_path: Path) -> None:
    keys = {"data": str(sign_dir), "subset": 100, "img_size": 32, "epochs": 1, "tensorboard": False}
    cfgs = []
    for name in ("a", "b"):
        imgclf.train(**keys, out=str(tmp_path / name), progress=False)
        cfgs.append(json.loads((tmp_path / name / "config.json").read_text()))
    a, b = cfgs
    for k in ("lr", "flip", "batch_size", "rotation", "model", "patience"):
        assert a[k] == b[k], k
    assert a["extra"]["auto_reasons"]["lr"].startswith("range test")
    assert "auto" not in a["extra"]  # nothing is left to decide: the file replays the run as it was
    assert a["lr"] != config_from({"data": str(sign_dir)}).lr  # the rate came from the measurement
    c = config_from({k: v for k, v in a.items() if k != "out"})
    assert c.extra["auto"] == [] and c.lr == a["lr"]


def test_log_says_what_auto_chose_and_why(sign_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    imgclf.train(data=str(sign_dir), subset=60, img_size=32, epochs=1, out=str(run), progress=False)
    log = (run / "train.log").read_text()
    for key in ("model", "batch_size", "patience", "flip", "lr"):
        line = next((ln for ln in log.splitlines() if f"auto: {key}=" in ln), "")
        assert "(" in line, f"no reasoned auto line for {key}"
    assert "auto: img_size" not in log and "auto: epochs" not in log  # given, so not decided


@pytest.mark.parametrize("recipe", ["best", "tutorial", "default"])
def test_other_recipes_decide_nothing(sign_dir: Path, recipe: str) -> None:
    cfg = config_from({"data": str(sign_dir), "recipe": recipe, "model": "simplecnn"})
    assert auto.auto_keys(cfg) == set()


def test_fine_tuning_trains_the_head_first_then_every_layer(
    sign_dir: Path, small_sign_folder: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    base = dict(data=str(sign_dir), subset=60, img_size=32, model="simplecnn", tensorboard=False, lr=1e-3)
    # The source knows 3 classes, the target 10: the head is new, everything else is loaded.
    src_keys = {**base, "data": str(small_sign_folder(tmp_path / "three")), "subset": None}
    src = imgclf.train(**src_keys, epochs=1, out=str(tmp_path / "src"), progress=False)
    cfg, _ = _resolved(str(sign_dir), model="simplecnn", init_weights=str(src.bundle_dir), epochs=10)
    assert cfg.freeze_epochs == 1 and cfg.layer_lr_min == 0.01  # auto chose fastai-style fine-tuning

    loaded = load_file(str(src.bundle_dir / "model.safetensors"))
    seen: list[dict[str, torch.Tensor]] = []

    class Snapshot(imgclf.Callback):
        def on_train_begin(self, trainer):  # noqa: ANN001
            self.on_epoch_end(trainer, 0, {})

        def on_epoch_end(self, trainer, epoch, logs):  # noqa: ANN001
            seen.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    imgclf.train(
        **{**base, "data": str(sign_dir), "seed": 7},
        init_weights=str(src.bundle_dir),
        freeze_epochs=1,
        layer_lr_min=0.01,
        epochs=2,
        out=str(tmp_path / "ft"),
        progress=False,
        callbacks=[Snapshot()],
    )
    first_conv = next(k for k in loaded if k.endswith("weight") and loaded[k].ndim == 4)
    start = seen[0]
    head = [k for k in seen[0] if k.endswith("weight") and seen[0][k].ndim == 2][-1]
    assert head in loaded and loaded[head].shape != seen[0][head].shape
    seen.pop(0)  # the state at the start
    assert torch.equal(seen[0][first_conv], loaded[first_conv])  # frozen during epoch 1
    assert not torch.equal(start[head], seen[0][head])  # while the new head trained
    assert not torch.equal(seen[1][first_conv], loaded[first_conv])  # then every layer trains
