"""The training fast paths (background batch prefetch, fused optimizers) change speed, not results."""

from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from imgclf.core.preprocess import Preprocess
from imgclf.data import sources as D
from imgclf.data.augment import Augment
from imgclf.training.config import TrainConfig

# the module, not the `imgclf.training.trainer` function the package re-exports
T = importlib.import_module("imgclf.training.trainer")
from imgclf.training.api import train  # noqa: E402


@pytest.fixture(scope="module")
def sign_arrays(sign_dir: Path) -> tuple[torch.Tensor, torch.Tensor, Preprocess]:
    """60 real Sign Language photos decoded at 48x48 RGB."""
    index = D.index_source(str(sign_dir))
    pre = Preprocess((48, 48), 3)
    idx = np.linspace(0, len(index) - 1, 60).astype(np.int64)
    dec = D.decode_items(index, idx, pre, progress=False)
    assert len(dec.labels) == 60
    return torch.from_numpy(dec.images), torch.from_numpy(dec.labels), pre


def _epoch(arrays, prefetch: bool, steps: int = 5, bs: int = 12):
    x_all, y_all, pre = arrays
    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(len(y_all), generator=gen)
    it = T.epoch_batches(
        x_all,
        y_all,
        perm,
        bs,
        steps,
        pre,
        Augment(rotation=25.0, shift=0.1, shear=0.2, zoom=0.2, flip=True),
        gen,
        prefetch=prefetch,
    )
    out = list(it)
    return out, gen.get_state()


def test_prefetch_gives_identical_batches_and_rng_state(sign_arrays) -> None:
    plain, s_plain = _epoch(sign_arrays, prefetch=False)
    fast, s_fast = _epoch(sign_arrays, prefetch=True)
    assert len(plain) == len(fast) == 5
    for (xa, ya), (xb, yb) in zip(plain, fast):
        assert xa.shape == (12, 3, 48, 48)
        assert xb.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)  # bit-identical, although the thread uses 1 intra-op thread
    # the generator advanced exactly as much: a resumed run replays the same stream
    assert torch.equal(s_plain, s_fast)
    # augmentation really ran (the batches differ from the plain normalised images)
    x_all, y_all, pre = sign_arrays
    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(len(y_all), generator=gen)
    no_aug, _ = T.make_batch(x_all, y_all, perm[:12], pre, None, None)
    assert not torch.allclose(no_aug, plain[0][0])


def test_prefetch_thread_is_joined_and_leaves_main_threads(sign_arrays) -> None:
    x_all, y_all, pre = sign_arrays
    threads_before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y_all), generator=gen)
    it = T.epoch_batches(
        x_all,
        y_all,
        perm,
        10,
        5,
        pre,
        Augment(rotation=25.0, shift=0.1, shear=0.2, zoom=0.2, flip=True),
        gen,
        prefetch=True,
    )
    next(it)
    next(it)
    assert any(t.name.startswith("imgclf-prefetch") for t in threading.enumerate())
    it.close()  # what the loop does on a NaN stop
    assert not any(t.name.startswith("imgclf-prefetch") for t in threading.enumerate())
    assert torch.get_num_threads() == threads_before  # compute keeps every core


def test_fused_optimizer_matches_reference_update(mnist_dir: Path) -> None:
    from imgclf.models.registry import create_model

    idx = D.index_source("mnist")
    x = torch.from_numpy(idx.arrays[:64]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(idx.labels[:64])
    for name in ("adam", "sgd"):
        cfg = TrainConfig(optimizer=name, lr=0.01)
        torch.manual_seed(0)
        m1 = create_model("lenet", num_classes=10, in_channels=1, img_size=28)
        m2 = create_model("lenet", num_classes=10, in_channels=1, img_size=28)
        m2.load_state_dict(m1.state_dict())
        o1 = T.make_optimizer(m1, cfg)
        assert o1.defaults.get("fused") is True
        groups = T._param_groups(m2, cfg.weight_decay)
        o2 = (
            torch.optim.Adam(groups, lr=0.01, foreach=False)
            if name == "adam"
            else torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True, foreach=False)
        )
        for _ in range(3):
            for m, o in ((m1, o1), (m2, o2)):
                o.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()
                o.step()
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            # Adam divides by sqrt(v): float rounding shows up as ~1e-5; a wrong rule would differ by ~lr.
            torch.testing.assert_close(p1, p2, rtol=1e-3, atol=1e-4)


def test_training_with_and_without_prefetch_is_identical(
    tmp_path: Path, mnist_dir: Path, monkeypatch
) -> None:
    hist = {}
    for flag in (False, True):
        monkeypatch.setattr(T, "PREFETCH", flag)
        cfg = TrainConfig(
            data="mnist",
            model="lenet",
            epochs=1,
            subset=1200,
            augment="on",  # exercise augmentation in the background thread too
            out=str(tmp_path / f"p{int(flag)}"),
            tensorboard=False,
        )
        res = train(cfg, progress=False)
        hist[flag] = res.history[0]
        metrics = json.loads((res.run_dir / "metrics.json").read_text())
        assert metrics["val_accuracy"] > 0.5  # it learned, on real digits
    for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert hist[True][k] == pytest.approx(hist[False][k], rel=1e-5, abs=1e-6), k


def test_fused_optimizer_resumes_exactly_with_channels_last(tmp_path: Path, mnist_dir: Path) -> None:
    # torch's fused kernel assumes state has the parameter's strides; a checkpoint loads it
    # contiguous, so without the layout fix in load_checkpoint the next step pairs wrong elements.
    from imgclf.models.registry import create_model

    idx = D.index_source("mnist")
    x = (
        torch.from_numpy(idx.arrays[:32])
        .float()
        .div(255)
        .unsqueeze(1)
        .contiguous(memory_format=torch.channels_last)
    )
    y = torch.from_numpy(idx.labels[:32])
    cfg = TrainConfig(optimizer="adam")

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = create_model("lenet", num_classes=10, in_channels=1, img_size=28).to(
            memory_format=torch.channels_last
        )
        return m, T.make_optimizer(m, cfg)

    def step(m: torch.nn.Module, o: torch.optim.Optimizer) -> None:
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    m1, o1 = build()
    for _ in range(3):
        step(m1, o1)
    T.save_checkpoint(tmp_path / "c.safetensors", m1, o1, {"epoch": 1})
    m2, o2 = build()
    T.load_checkpoint(tmp_path / "c.safetensors", m2, o2)
    step(m1, o1)
    step(m2, o2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
