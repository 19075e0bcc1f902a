"""Training loop, callbacks, checkpoints and resume."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imgclf.core.errors import TrainingError
from imgclf.training.api import resume, train
from imgclf.training.config import ConfigError, TrainConfig
from imgclf.training.recipes import config_from


def _digits(tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = dict(data="digits", model="lenet", epochs=2, out=str(tmp_path / name), tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def test_run_folder_contents_and_learning(tmp_path: Path) -> None:
    res = train(_digits(tmp_path, "r", epochs=3, tensorboard=True), progress=False)
    d = res.run_dir
    for f in (
        "model/model.safetensors",
        "model/model.json",
        "history.csv",
        "metrics.json",
        "plot.png",
        "splits.json",
        "config.json",
        "train.log",
    ):
        assert (d / f).exists(), f
    assert any((d / "tensorboard").iterdir())
    rows = list(csv.DictReader(open(d / "history.csv")))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    m = json.loads((d / "metrics.json").read_text())
    assert m["test_accuracy"] > 0.85  # LeNet on 8x8 digits learns fast
    splits = json.loads((d / "splits.json").read_text())
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes["train"] + sizes["val"] + sizes["test"] == 1797
    assert set(splits["train"]).isdisjoint(splits["test"])
    assert "epoch 3/3" in (d / "train.log").read_text()


def test_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    cfg = _digits(tmp_path, "r", epochs=1, subset=200)
    train(cfg, progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg, progress=False)


@pytest.mark.parametrize("mix", [{}, {"cutmix": 1.0, "mixup": 0.4}], ids=["plain", "mixed"])
def test_resume_continues_from_saved_epoch_and_matches_uninterrupted(tmp_path: Path, mix: dict) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise reproducibility needs one thread schedule
    try:
        # a constant lr makes a 2-epoch plan identical to the first 2 epochs of a 3-epoch plan
        kw = dict(subset=400, lr_decay=0.0, **mix)
        straight = train(_digits(tmp_path, "a", epochs=3, **kw), progress=False)
        part = train(_digits(tmp_path, "b", epochs=2, **kw), progress=False)
        assert part.metrics["epochs_run"] == 2
        cont = resume(part.run_dir, epochs=3, progress=False)
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader(open(cont.run_dir / "history.csv")))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2, 3]
    a = load_file(str(straight.run_dir / "checkpoints" / "last.safetensors"))
    b = load_file(str(cont.run_dir / "checkpoints" / "last.safetensors"))
    for k in a:
        if k.startswith("model/"):
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_resume_keeps_the_decayed_schedule_identical(tmp_path: Path) -> None:
    """Resume must not re-apply the decay to already decayed rates (the lr trace is identical)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # an explicit per-step decay makes the schedule independent of the planned epoch count
        kw = dict(epochs=3, subset=400, optimizer="adam", lr=1e-3, lr_decay=0.05)
        straight = train(_digits(tmp_path, "a", **kw), progress=False)
        part = train(_digits(tmp_path, "b", **{**kw, "epochs": 2}), progress=False)
        cont = resume(part.run_dir, epochs=3, progress=False)
    finally:
        torch.set_num_threads(threads)
    lr_a = [h["lr"] for h in straight.history]
    lr_b = [h["lr"] for h in cont.history]
    assert lr_b == pytest.approx(lr_a, rel=1e-9)
    assert lr_b[-1] > lr_a[0] * 0.4  # decayed twice, the last rate would be ~0.26x the first
    assert cont.metrics["test_accuracy"] == pytest.approx(straight.metrics["test_accuracy"], abs=0.02)


def test_nan_loss_stops_with_clear_message(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="diverged"):
        train(_digits(tmp_path, "nan", epochs=2, lr=1e30, optimizer="sgd", momentum=0.0), progress=False)


def test_early_stopping_and_reduce_lr(tmp_path: Path) -> None:
    # lr so small nothing improves after the first epochs -> plateau callbacks fire
    res = train(
        _digits(
            tmp_path,
            "es",
            epochs=30,
            subset=300,
            lr=1e-9,
            optimizer="sgd",
            momentum=0.0,
            patience=2,
            reduce_lr_patience=1,
            reduce_lr_factor=0.5,
            keep="last",
        ),
        progress=False,
    )
    assert res.metrics["epochs_run"] < 30 and res.metrics["stopped_early"]
    lrs = [h["lr"] for h in res.history]
    assert lrs[-1] < lrs[0]


def test_corrupt_file_is_skipped_with_report(tmp_path: Path, small_sign_folder) -> None:
    root = small_sign_folder(tmp_path / "ds", per_class=8)
    (root / "2" / "truncated.jpg").write_bytes((root / "2").iterdir().__next__().read_bytes()[:300])
    (root / "0" / "notes.txt").write_text("not an image")
    res = train(
        TrainConfig(
            data=str(root),
            model="lenet",
            img_size=28,
            epochs=1,
            out=str(tmp_path / "r"),
            tensorboard=False,
            dedup="off",
        ),
        progress=False,
    )
    text = (res.run_dir / "skipped_files.txt").read_text()
    assert "truncated.jpg" in text and "notes.txt" in text
    assert (res.bundle_dir / "model.json").exists()


def test_augmentation_changes_images_but_keeps_shape() -> None:
    from imgclf.data.augment import Augment

    x = torch.rand(8, 3, 24, 24) * 255
    aug = Augment(rotation=25.0, shift=0.1, shear=0.2, zoom=0.2, flip=True)
    g = torch.Generator().manual_seed(0)
    y = aug(x, g)
    assert y.shape == x.shape
    assert (y - x).abs().mean() > 1
    ident = Augment(rotation=0, shift=0, shear=0, zoom=0, flip=False)
    assert torch.allclose(ident(x, g), x, atol=1e-3)
    flip = Augment(rotation=0, shift=0, shear=0, zoom=0, flip=True)
    p = flip.draw(8, torch.Generator().manual_seed(1))
    out = flip.apply(x, p)
    for i in range(8):
        ref = x[i].flip(-1) if p.flip[i] else x[i]
        assert torch.allclose(out[i], ref, atol=1e-3)


def test_bicubic_augmentation_keeps_small_photos_sharper(shared_dir: Path) -> None:
    """aug_interp: a bicubic warp of real 30 px photos keeps more of their detail than a bilinear
    one with the same parameters, stays within 0-255, and reaches the run's augmentation."""
    import torch.nn.functional as F
    from PIL import Image

    from imgclf.data.augment import Augment
    from imgclf.training.trainer import make_augment

    files = sorted((shared_dir / "natural-images").rglob("*.jpg"))[::100][:48]
    rgb = [np.asarray(Image.open(f).convert("RGB").resize((30, 30), Image.Resampling.BOX)) for f in files]
    x = torch.from_numpy(np.stack(rgb))
    x = x.permute(0, 3, 1, 2).float()
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)

    def detail(t: torch.Tensor) -> float:
        return float(F.conv2d(t, lap, groups=3)[..., 2:-2, 2:-2].abs().mean())

    kw = {"rotation": 10.0, "shift": 0.1, "shear": 0.0, "zoom": 0.15, "flip": True}
    p = Augment(**kw).draw(len(x), torch.Generator().manual_seed(0))
    soft, sharp = Augment(**kw).apply(x, p), Augment(**kw, mode="bicubic").apply(x, p)
    assert detail(soft) < 0.7 * detail(x) < detail(sharp)
    assert float(sharp.min()) >= 0 and float(sharp.max()) <= 255
    assert (sharp - soft).abs().mean() < 0.1 * (soft - x).abs().mean()  # same warp, other kernel
    cfg = TrainConfig(augment="on", aug_interp="bicubic")
    assert make_augment(cfg).mode == "bicubic" and make_augment(TrainConfig(augment="on")).mode == "bilinear"
    with pytest.raises(ConfigError, match="aug_interp"):
        TrainConfig(aug_interp="lanczos").validate()


def test_random_erasing_fills_one_box_per_image_and_replays() -> None:
    from imgclf.data.augment import Augment

    x = torch.full((16, 3, 32, 40), 100.0)
    aug = Augment(rotation=0, shift=0, shear=0, zoom=0, flip=False, erase=0.5)
    p = aug.draw(16, torch.Generator().manual_seed(3))
    out = aug.apply(x, p)
    changed = (out != 100).any(1)  # (B, H, W)
    for i in range(16):
        x0, y0, x1, y1 = p.erase[i].tolist()
        area = (x1 - x0) * (y1 - y0)
        if area == 0:
            assert not changed[i].any()
            continue
        assert 0.02 * 0.8 < changed[i].float().mean() < 0.25 * 1.2
        rows, cols = changed[i].nonzero(as_tuple=True)  # the changed pixels form one rectangle
        assert changed[i][rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    assert 3 <= int((p.erase[:, 2] > p.erase[:, 0]).sum()) <= 13  # about half the images
    assert torch.equal(out, aug.apply(x, p))  # same parameters, same output
    assert float(out.min()) >= 0 and float(out.max()) <= 255


def test_mixup_and_cutmix_blend_each_image_with_its_partner_and_replay() -> None:
    from imgclf.data.augment import Mix

    x = torch.rand(8, 3, 16, 20) * 255
    mixup = Mix(mixup=0.4)
    p = mixup.draw(8, 16, 20, torch.Generator().manual_seed(5))
    q = mixup.draw(8, 16, 20, torch.Generator().manual_seed(5))
    assert sorted(p.perm.tolist()) == list(range(8)) and 0 <= p.lam <= 1 and p.box is None
    assert torch.equal(p.perm, q.perm) and p.lam == q.lam  # same generator state, same draw
    assert torch.allclose(mixup.apply(x, p), p.lam * x + (1 - p.lam) * x[p.perm])
    cutmix = Mix(cutmix=1.0)
    g = torch.Generator().manual_seed(6)
    for _ in range(20):
        p = cutmix.draw(8, 16, 20, g)
        y0, y1, x0, x1 = p.box
        out = cutmix.apply(x, p)
        inside = torch.zeros(16, 20, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(out[:, :, inside], x[p.perm][:, :, inside])
        assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
        assert p.lam == pytest.approx(1 - int(inside.sum()) / (16 * 20))  # the label weight is the area kept
    both = Mix(mixup=0.2, cutmix=1.0)
    kinds = {both.draw(4, 16, 20, g).box is None for _ in range(40)}
    assert kinds == {True, False}  # each batch takes one of the two


def test_mixup_trains_on_blended_labels(tmp_path: Path) -> None:
    plain = train(_digits(tmp_path, "plain", epochs=3, lr=2e-3, optimizer="adam"), progress=False)
    mixed = train(_digits(tmp_path, "mixed", epochs=3, lr=2e-3, optimizer="adam", mixup=1.0), progress=False)
    assert json.loads((mixed.run_dir / "config.json").read_text())["mixup"] == 1.0
    # Blended targets cannot be fitted as well as clean ones; the model still learns the digits.
    assert mixed.history[-1]["train_loss"] > plain.history[-1]["train_loss"] + 0.1
    assert mixed.metrics["test_accuracy"] > 0.8
    # Training accuracy counts the dominant label (own or partner's): about 0.5 if it counted the own.
    assert mixed.history[-1]["train_acc"] > 0.7
    with pytest.raises(ConfigError, match="mixup"):
        TrainConfig(mixup=-1).validate()


def test_device_option_is_checked_before_training() -> None:
    from imgclf.training.trainer import resolve_device

    with pytest.raises(ConfigError, match="device"):
        TrainConfig(device="gpu0").validate()
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_config_rejects_unknown_keys_with_suggestion() -> None:
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="optimizer"):
        config_from({"optimizer": "adamx"})


def test_config_file_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data: digits\nepochs: 4\nlr: 0.01\n")
    cfg = TrainConfig.load(p)
    assert (cfg.epochs, cfg.lr, cfg.data) == (4, 0.01, "digits")
    p.write_text("data: digits\nbatchsize: 4\n")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig.load(p)


def test_seeded_training_is_reproducible(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    a = train(_digits(tmp_path, "s1", epochs=1, subset=300), progress=False)
    b = train(_digits(tmp_path, "s2", epochs=1, subset=300), progress=False)
    wa = load_file(str(a.bundle_dir / "model.safetensors"))
    wb = load_file(str(b.bundle_dir / "model.safetensors"))
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)


def test_bf16_precision_trains_and_saves_float32_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp16").validate()
    res = train(
        TrainConfig(
            data="digits",
            model="lenet",
            epochs=3,
            precision="bf16",
            out=str(tmp_path / "r"),
            tensorboard=False,
        ),
        progress=False,
    )
    assert res.metrics["test_accuracy"] > 0.8  # bf16 math still learns digits
    weights = load_file(str(res.bundle_dir / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert json.loads((res.run_dir / "config.json").read_text())["precision"] == "bf16"


def test_precision_auto_is_bf16_only_on_cpus_with_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    from imgclf.data import sources as D
    from imgclf.training import trainer as T
    from imgclf.training.recipes import config_from

    index = D.index_source("digits")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(T, "cpu_has_native_bf16", lambda native=native: native)
        assert T.resolve_defaults(TrainConfig(precision="auto"), index).precision == expected
    # An explicit choice is kept either way; the best recipe asks for auto, the tutorial for fp32.
    assert T.resolve_defaults(TrainConfig(precision="bf16"), index).precision == "bf16"
    assert config_from({"data": "digits"}).precision == "auto"
    assert config_from({"data": "mnist", "recipe": "tutorial"}).precision == "fp32"
    assert config_from({"data": "digits", "precision": "fp32"}).precision == "fp32"


def test_logging_follows_a_replaced_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Jupyter and pytest swap sys.stderr; a later run must not write to the closed old one.
    import io

    from imgclf.cli import main

    argv = ["train", "--data", "digits", "--model", "minivgg", "--model-args", "depth=2"]
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    assert main([*argv, "--out", str(tmp_path / "b")]) == 2
    err = second.getvalue()
    assert "Logging error" not in err and "data digits: 1797 items" in err
