"""Shared fixtures: real data from ../shared/datasets and small trained bundles (built once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))
SIGN = SHARED / "sign-language-digits"

# Built-in datasets are looked up here first; tests never download.
os.environ.setdefault("IMGCLF_DATA_DIR", str(SHARED))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set IMGCLF_SHARED)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def sign_dir() -> Path:
    """Sign Language Digits: 10 class folders of real 100x100 JPEG photos."""
    return _need(SIGN)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    return _need(SHARED / "mnist")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the decode cache out of the user's home during tests."""
    os.environ["IMGCLF_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


def copy_sign_folder(dst: Path, per_class: int = 12, classes: tuple[str, ...] = ("0", "1", "2")) -> Path:
    """Copy a few real Sign Language images per class into ``dst/<class>/`` (for planted-problem tests)."""
    import shutil

    src = _need(SIGN)
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
        files = sorted((src / c).iterdir())[:per_class]
        for f in files:
            shutil.copy(f, dst / c / f.name)
    return dst


@pytest.fixture(scope="session")
def small_sign_folder():
    """The function ``(dst, per_class=12, classes=("0","1","2")) -> dst`` copying real photos."""
    _need(SIGN)
    return copy_sign_folder


@pytest.fixture(scope="session")
def mnist_bundle(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """LeNet trained briefly on a 3,000-image MNIST subset (about 97% test accuracy is NOT expected)."""
    from imgclf.training.api import train
    from imgclf.training.config import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "mnist"
    cfg = TrainConfig(data="mnist", model="lenet", epochs=2, subset=3000, out=str(out), tensorboard=False)
    return train(cfg, progress=False).bundle_dir


@pytest.fixture(scope="session")
def sign_bundle(tmp_path_factory: pytest.TempPathFactory, sign_dir: Path) -> Path:
    """SmallerVGGNet at 48x48 trained briefly on 500 real Sign Language photos."""
    from imgclf.training.api import train
    from imgclf.training.config import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "sign"
    cfg = TrainConfig(
        data=str(sign_dir),
        model="smallervggnet",
        img_size=48,
        epochs=3,
        subset=500,
        out=str(out),
        tensorboard=False,
    )
    return train(cfg, progress=False).bundle_dir


def build_colour_garments(dst: Path, **kw: object) -> Path:
    """bench/multilabel_data.py's tinted Fashion-MNIST label-set folders (red_tshirt/ ...), small."""
    import importlib.util

    _need(SHARED / "fashion-mnist")
    spec = importlib.util.spec_from_file_location("multilabel_data", ROOT / "bench" / "multilabel_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = {"per_class": 30, "test_per_class": 10, "garments": ["tshirt", "trouser", "bag"]}
    args.update(kw)
    mod.build(dst, colours=["red", "blue"], data_dir=SHARED, **args)
    return dst


@pytest.fixture(scope="session")
def colour_garment_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Multi-label folders {red,blue}_{tshirt,trouser,bag}: 30 train + 10 test images each (28 px)."""
    return build_colour_garments(tmp_path_factory.mktemp("data") / "colour_garment")


@pytest.fixture(scope="session")
def multilabel_bundle(tmp_path_factory: pytest.TempPathFactory, colour_garment_dir: Path) -> Path:
    """LeNet trained briefly with --multi-label on ``colour_garment_dir`` (5 labels)."""
    from imgclf.training.api import train
    from imgclf.training.config import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "multilabel"
    cfg = TrainConfig(
        data=str(colour_garment_dir), multi_label=True, model="lenet", img_size=28, epochs=4, lr=0.003,
        recipe="tutorial", out=str(out), tensorboard=False, threads=1,
    )  # fmt: skip
    return train(cfg, progress=False).bundle_dir


def batch_input_folder(root: Path, colour_garment_dir: Path) -> Path:
    """``root/in``: two real test images from each colour-garment label-set folder, plus a truncated PNG
    (predict-batch tests)."""
    import shutil

    d = root / "in"
    for folder in sorted((colour_garment_dir / "test").iterdir()):
        (d / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:2]:
            shutil.copy(f, d / folder.name / f.name)
    good = next((d / "red_bag").iterdir())
    (d / "red_bag" / "cut.png").write_bytes(good.read_bytes()[:60])
    return d
