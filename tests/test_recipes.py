"""Recipes (tutorial/best), transfer learning (--init-weights, timm adapter) and TTA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from imgclf.training.config import ConfigError, TrainConfig
from imgclf.training.recipes import config_from, dataset_key, recipe_values

# ----------------------------------------------------------------------------- recipes


def test_tutorial_recipe_mnist_lenet_is_the_tutorials_settings() -> None:
    cfg = config_from({"data": "mnist", "model": "lenet", "recipe": "tutorial"})
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.lr_decay) == ("sgd", 0.01, 0.0, 0.0)
    assert (cfg.epochs, cfg.batch_size, cfg.augment) == (20, 128, "off")
    # Fashion-MNIST: same net and optimiser, 50 epochs.
    assert config_from({"data": "fashion-mnist", "recipe": "tutorial"}).epochs == 50


def test_recipe_fills_only_keys_the_user_did_not_set() -> None:
    cfg = config_from({"data": "mnist", "recipe": "tutorial", "lr": 0.05, "epochs": 3, "augment": "on"})
    assert (cfg.lr, cfg.epochs, cfg.augment) == (0.05, 3, "on")  # the user's values
    assert (cfg.optimizer, cfg.batch_size) == ("sgd", 128)  # the recipe's
    # default recipe: exactly the TrainConfig defaults
    d = config_from({"data": "mnist", "recipe": "default"})
    assert (d.optimizer, d.lr, d.epochs, d.batch_size) == (
        TrainConfig.optimizer,
        TrainConfig.lr,
        TrainConfig.epochs,
        TrainConfig.batch_size,
    )


def test_keras_decay_follows_the_lr_and_epochs_in_use(sign_dir: Path) -> None:
    cfg = config_from({"data": str(sign_dir), "recipe": "tutorial"})
    assert cfg.model is None and dataset_key(str(sign_dir)) == "folder"
    assert (cfg.optimizer, cfg.lr, cfg.epochs, cfg.batch_size, cfg.img_size) == ("adam", 1e-3, 100, 32, 96)
    assert cfg.lr_decay == pytest.approx(1e-3 / 100)
    assert (cfg.rotation, cfg.shift, cfg.shear, cfg.zoom, cfg.flip) == (25.0, 0.1, 0.2, 0.2, "on")
    assert cfg.test_split == 0.2  # a held-out test set for folders
    short = config_from({"data": str(sign_dir), "recipe": "tutorial", "epochs": 10, "lr": 2e-3})
    assert short.lr_decay == pytest.approx(2e-3 / 10)


def test_best_recipe_never_flips_digits_but_flips_clothes() -> None:
    m = config_from({"data": "mnist", "recipe": "best"})
    f = config_from({"data": "fashion-mnist", "recipe": "best"})
    assert m.flip == "off" and m.augment == "on"
    assert f.flip == "on"
    assert m.schedule in ("onecycle", "cosine") and m.warmup_epochs > 0
    # A non-LeNet model on 28x28 data stays at the native size.
    assert config_from({"data": "fashion-mnist", "model": "resnet20", "recipe": "best"}).img_size == 28


def test_unknown_recipe_and_missing_tutorial_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'fastest'.*tutorial"):
        config_from({"data": "mnist", "recipe": "fastest"})
    with pytest.raises(ConfigError, match="no tutorial settings for model 'resnet20'.*lenet"):
        recipe_values("tutorial", {"data": "mnist", "model": "resnet20"})


def test_cli_unknown_recipe_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from imgclf.cli import main

    rc = main(["train", "--data", "mnist", "--recipe", "fastest", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "invalid choice: 'fastest'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- transfer


def test_init_weights_loads_matching_layers_and_replaces_head(mnist_bundle: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from imgclf.models.registry import create_model
    from imgclf.training.transfer import load_init_weights

    src = load_file(str(mnist_bundle / "model.safetensors"))
    torch.manual_seed(1)
    model = create_model("lenet", num_classes=3, in_channels=1, img_size=28)
    fresh_head = model.state_dict()["classifier.fc2.weight"].clone()
    rep = load_init_weights(model, mnist_bundle)  # a bundle folder works as well as the file
    sd = model.state_dict()
    for k in (
        "features.conv1.weight",
        "features.conv2.weight",
        "classifier.fc1.weight",
        "classifier.fc1.bias",
    ):
        assert torch.equal(sd[k], src[k]), k
        assert k in rep.loaded
    # 10-class head -> 3-class head: kept its fresh initialisation
    assert sd["classifier.fc2.weight"].shape == (3, 500)
    assert torch.equal(sd["classifier.fc2.weight"], fresh_head)
    assert {"classifier.fc2.weight", "classifier.fc2.bias"} <= set(rep.reinitialised)


def test_init_weights_adapts_grey_first_conv_to_rgb(mnist_bundle: Path) -> None:
    from imgclf.models.registry import create_model
    from imgclf.runtime.bundle import load_bundle
    from imgclf.training.transfer import load_init_weights

    grey = load_bundle(mnist_bundle).model.float().eval()
    rgb = create_model("lenet", num_classes=10, in_channels=3, img_size=28).eval()
    rep = load_init_weights(rgb, mnist_bundle / "model.safetensors")
    assert rep.adapted == ["features.conv1.weight"]
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        # A grey image given as three equal channels gives the same logits as the grey model.
        assert torch.allclose(rgb(x.repeat(1, 3, 1, 1)), grey(x), atol=1e-4)


def test_init_weights_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from imgclf.models.registry import create_model
    from imgclf.training.transfer import TransferError, load_init_weights

    lenet = create_model("lenet", num_classes=10, in_channels=1, img_size=28)
    with pytest.raises(ConfigError, match="no such file"):
        load_init_weights(lenet, tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(TransferError, match="not a safetensors file"):
        load_init_weights(lenet, junk)
    other = tmp_path / "resnet.safetensors"
    save_file(create_model("resnet20", num_classes=10).state_dict(), str(other))
    with pytest.raises(TransferError, match="no layer matches lenet"):
        load_init_weights(lenet, other)


def test_train_with_init_weights_starts_from_them(mnist_bundle: Path, tmp_path: Path) -> None:
    """Through the real training loop: with a negligible lr the trained conv1 is the source's."""
    from safetensors.torch import load_file

    from imgclf.training.api import train

    cfg = config_from(
        {
            "data": "digits",
            "model": "lenet",
            "init_weights": str(mnist_bundle / "model.safetensors"),
            "optimizer": "sgd",
            "momentum": 0.0,
            "lr": 1e-12,
            "epochs": 1,
            "subset": 256,
            "out": str(tmp_path / "ft"),
            "tensorboard": False,
        }
    )
    res = train(cfg, progress=False)
    src = load_file(str(mnist_bundle / "model.safetensors"))
    got = load_file(str(res.bundle_dir / "model.safetensors"))
    assert torch.allclose(got["features.conv1.weight"], src["features.conv1.weight"], atol=1e-6)
    assert "init weights" in (res.run_dir / "train.log").read_text()


def test_init_weights_missing_file_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from imgclf.cli import main

    rc = main(["train", "--data", "digits", "--init-weights", str(tmp_path / "nope.safetensors"),
               "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "nope.safetensors: no such file" in err and "Traceback" not in err


def test_pretrained_needs_a_timm_model() -> None:
    from imgclf.training.transfer import check_config

    with pytest.raises(ConfigError, match="--pretrained works with --model timm"):
        check_config(TrainConfig(model="lenet", pretrained=True))


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_model_without_timm_says_how_to_install(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from imgclf.cli import main

    rc = main(["train", "--data", "digits", "--model", "timm:resnet18", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'imgclf[timm]'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- TTA


@pytest.fixture(scope="module")
def mnist_test_batch(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from imgclf.data import sources as D

    index = D.index_source("mnist")
    idx = np.flatnonzero(index.split == "test")[:200]
    return index.arrays[idx][..., None], index.labels[idx]


def test_tta_probabilities_and_identity_set(mnist_bundle: Path, mnist_test_batch) -> None:
    from imgclf.runtime.bundle import load_bundle
    from imgclf.runtime.tta import auto_views, predict_tta

    b = load_bundle(mnist_bundle)
    x, y = mnist_test_batch
    plain = b.predict_batch(x)
    ident = predict_tta(b, x, "identity")
    np.testing.assert_allclose(ident, plain, rtol=1e-5, atol=1e-6)
    # trained without augmentation: no views it never learned to ignore
    assert auto_views(b) == "identity"
    np.testing.assert_allclose(predict_tta(b, x), plain, rtol=1e-5, atol=1e-6)
    probs = predict_tta(b, x, "shift")
    assert probs.shape == (len(x), 10)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert not np.allclose(probs, plain)  # the shifted views do change the average
    # Averaging near-identical views must not wreck a working classifier.
    assert (probs.argmax(1) == y).mean() >= (plain.argmax(1) == y).mean() - 0.05


def test_tta_auto_views_follow_training_augmentation() -> None:
    from types import SimpleNamespace

    from imgclf.runtime.tta import auto_views

    def views(**tc: object) -> str:
        return auto_views(SimpleNamespace(meta={"train_config": tc}))

    assert views(augment="on", flip="off", shift=0.1) == "shift"  # digits: never flipped
    assert views(augment="on", flip="on", shift=0.1) == "flip-shift"
    assert views(augment="on", flip="on", shift=0.0) == "flip"
    assert views(augment="off", flip="on", shift=0.1) == "identity"


def test_training_reports_what_tta_scores_as_evaluate_does(sign_bundle: Path) -> None:
    """The end-of-training TTA check (torch, in the trainer) and ``evaluate --tta`` (the bundle's
    ONNX graph) are two paths to one number: they must agree on the real Sign photos' test split."""
    import json

    from imgclf.analysis.evaluate import evaluate
    from imgclf.runtime.bundle import load_bundle

    m = json.loads((sign_bundle.parent / "metrics.json").read_text())
    split = "test" if "test_size" in m else "val"  # the fixture's split may hold no test part
    assert m["tta_views"] in ("shift", "flip-shift")  # trained with shifts (and flips per its config)
    assert m[f"{split}_tta_size"] == m[f"{split}_size"]
    assert m[f"{split}_accuracy_tta_base"] == pytest.approx(m[f"{split}_accuracy"])
    res = evaluate(load_bundle(sign_bundle), split=split, tta="auto")
    assert res.metrics["tta"] == m["tta_views"]
    assert abs(res.metrics["accuracy"] - m[f"{split}_accuracy_tta"]) <= 1.0 / m[f"{split}_size"] + 1e-9
    log = (sign_bundle.parent / "train.log").read_text()
    n = 6 if m["tta_views"] == "flip-shift" else 5
    assert f"TTA check: --tta ({m['tta_views']}, {n} views" in log


def test_no_tta_check_skips_it(small_sign_folder, tmp_path: Path) -> None:
    from imgclf.training.api import train
    from imgclf.training.config import TrainConfig

    data = small_sign_folder(tmp_path / "sign", per_class=8)
    common = {"data": str(data), "model": "lenet", "img_size": 16, "epochs": 1, "tensorboard": False}
    common.update(augment="on", shift=0.1, threads=1)
    on = train(TrainConfig(**common, out=str(tmp_path / "on")), progress=False)
    off = train(TrainConfig(**common, tta_check=False, out=str(tmp_path / "off")), progress=False)
    assert "val_accuracy_tta" in on.metrics and "TTA check" in (Path(on.run_dir) / "train.log").read_text()
    assert not any("tta" in k for k in off.metrics)
    assert "TTA check" not in (Path(off.run_dir) / "train.log").read_text()


def test_tta_shift_and_flip_views_move_pixels() -> None:
    from imgclf.runtime.tta import _hflip, _shift, views_for

    x = np.zeros((1, 5, 5, 1), np.uint8)
    x[0, 2, 1, 0] = 255
    assert _shift(1, 0)(x)[0, 3, 1, 0] == 255  # down by one
    assert _shift(0, -1)(x)[0, 2, 0, 0] == 255  # left by one
    assert _hflip(x)[0, 2, 3, 0] == 255
    assert len(views_for("flip-shift", 28)) == 6 and len(views_for("flip-shift", 28, flip_ok=False)) == 5
    with pytest.raises(ValueError, match="unknown TTA set"):
        views_for("rotate", 28)


def test_evaluate_and_predict_tta_average_the_named_views(
    sign_bundle: Path, sign_dir: Path, tmp_path: Path
) -> None:
    import json
    import subprocess
    import sys

    from imgclf.analysis.evaluate import evaluate
    from imgclf.runtime.bundle import load_bundle
    from imgclf.runtime.tta import _hflip

    b = load_bundle(sign_bundle)
    plain = evaluate(b, str(sign_dir), limit=40, progress=False)
    flip = evaluate(b, str(sign_dir), limit=40, progress=False, tta="flip")
    assert flip.metrics["tta"] == "flip" and "tta" not in plain.metrics
    assert flip.items == plain.items
    # evaluate's TTA probabilities are the mean over the image and its mirror image
    x = np.stack([b.prepare(str(it)) for it in plain.items])
    np.testing.assert_allclose(plain.probs, b.predict_batch(x), atol=1e-5)
    np.testing.assert_allclose(flip.probs, (b.predict_batch(x) + b.predict_batch(_hflip(x))) / 2, atol=1e-5)
    assert not np.allclose(flip.probs, plain.probs)
    files = sorted((sign_dir / "3").iterdir())[:4]
    imgs = np.stack([b.prepare(str(f)) for f in files])
    want = (b.predict_batch(imgs) + b.predict_batch(_hflip(imgs))) / 2
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgclf",
            "predict",
            str(sign_bundle),
            *map(str, files),
            "--json",
            "--tta",
            "flip",
        ]
        + ["--top-k", str(len(b.classes))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for row, w in zip(map(json.loads, out), want):
        got = {t["label"]: t["probability"] for t in row["top_k"]}
        np.testing.assert_allclose([got[c] for c in b.classes], w, atol=1e-5)


def test_tutorial_recipe_fashion_minivgg_is_the_tutorials_net_and_optimizer() -> None:
    from imgclf.training.trainer import make_optimizer

    cfg = config_from({"data": "fashion-mnist", "model": "minivgg", "recipe": "tutorial"})
    assert cfg.model_args == {"blocks": 2}
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov) == ("sgd", 0.01, 0.9, False)
    assert cfg.lr_decay == pytest.approx(0.01 / 25) and (cfg.epochs, cfg.batch_size) == (25, 32)
    # All 60,000 training images, as the tutorial (its validation data is the test set).
    assert cfg.val_split == 0.0 and cfg.augment == "off" and cfg.img_size == 28
    # --model-args adjusts the recipe's architecture instead of replacing it.
    wide = config_from(
        {"data": "fashion-mnist", "model": "minivgg", "recipe": "tutorial", "model_args": {"width": 8}}
    )
    assert wide.model_args == {"blocks": 2, "width": 8}
    opt = make_optimizer(torch.nn.Linear(2, 2), cfg)
    assert opt.param_groups[0]["nesterov"] is False
    assert (
        make_optimizer(torch.nn.Linear(2, 2), cfg.replace(nesterov=True)).param_groups[0]["nesterov"] is True
    )


def test_tutorial_recipe_cats_vs_dogs_trains_a_one_logit_simplecnn(sign_dir: Path, tmp_path: Path) -> None:
    from imgclf.runtime.bundle import load_bundle
    from imgclf.training.api import train

    # Two real photo classes stand in for cats and dogs.
    data = tmp_path / "pets"
    for cls, src in (("cats", "0"), ("dogs", "1")):
        (data / cls).mkdir(parents=True)
        for f in sorted((sign_dir / src).iterdir())[:24]:
            (data / cls / f.name).symlink_to(f)
    given = {"data": str(data), "model": "simplecnn", "recipe": "tutorial"}
    cfg = config_from(given)
    assert (cfg.optimizer, cfg.lr, cfg.lr_decay, cfg.epochs, cfg.batch_size) == ("adam", 1e-3, 0.0, 25, 32)
    assert (cfg.img_size, cfg.augment, cfg.rotation, cfg.shift, cfg.shear, cfg.zoom, cfg.flip) == (
        64,
        "on",
        0.0,
        0.0,
        0.2,
        0.2,
        "on",
    )
    res = train(
        config_from({**given, "epochs": 1, "out": str(tmp_path / "run"), "tensorboard": False}),
        progress=False,
    )
    b = load_bundle(res.bundle_dir)
    assert b.classes == ["cats", "dogs"] and b.meta["train_config"]["optimizer"] == "adam"
    assert b.model is not None and b.model(torch.zeros(1, 3, 64, 64)).shape == (1, 1)  # one sigmoid logit
    # The end-of-run TTA check reads the one logit as two classes, as evaluate --tta does.
    from imgclf.analysis.evaluate import evaluate

    assert res.metrics["tta_views"] == "flip"
    ev = evaluate(b, split="val", tta="auto")
    one_image = 1.0 / res.metrics["val_size"]
    assert abs(ev.metrics["accuracy"] - res.metrics["val_accuracy_tta"]) <= one_image + 1e-9


def test_cli_model_args_reach_the_bundle(tmp_path: Path) -> None:
    from imgclf.cli import main
    from imgclf.runtime.bundle import load_bundle

    out = tmp_path / "r"
    rc = main(["train", "--data", "digits", "--model", "minivgg", "--model-args", "blocks=2", "width=8",
               "--img-size", "16", "--epochs", "1", "--no-progress", "--no-tensorboard",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    bundle = load_bundle(out, backend="torch")
    assert {"blocks": 2, "width": 8}.items() <= bundle.meta["architecture"]["args"].items()
    convs = [m for m in bundle.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16]


def test_cli_bad_model_args_fail_before_decoding(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from imgclf.cli import main

    rc = main(["train", "--data", "digits", "--model", "minivgg", "--model-args", "depth=2",
               "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "unexpected keyword argument 'depth'" in err and "width, blocks" in err
    assert "Traceback" not in err and not (tmp_path / "r" / "splits.json").exists()
    assert main(["train", "--data", "digits", "--model-args", "blocks"]) == 2
    err = capsys.readouterr().err
    assert "is not KEY=VALUE" in err and err.count("\n") == 1  # one line, no usage dump
