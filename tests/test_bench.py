"""The benches' image-by-image pairing: a run's test-split bits and the paired table's SE."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import small_images  # noqa: E402
import suite  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, small_sign_folder) -> Path:
    """LeNet trained for two epochs on 150 real Sign Language photos, 30 % held out for testing."""
    from imgclf.training.api import train
    from imgclf.training.config import TrainConfig

    root = small_sign_folder(tmp_path_factory.mktemp("sign5"), 30, ("0", "1", "2", "3", "4"))
    cfg = TrainConfig(
        data=str(root), model="lenet", img_size=28, epochs=2, test_split=0.3, seed=42,
        out=str(tmp_path_factory.mktemp("runs") / "r"), tensorboard=False,
    )  # fmt: skip
    return Path(train(cfg, progress=False).run_dir)


def test_split_test_bits_match_the_runs_test_accuracy(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    bits = suite.split_test_bits(run_dir)
    n = bits["test_split_size"]
    assert n == metrics["test_size"] > 0
    right = suite.unpack_bits(bits["test_split_right"], n)
    assert right.mean() == pytest.approx(bits["test_split"], abs=1e-6)
    # The bundle predicts through its exported graph: at most the odd image differs.
    assert abs(bits["test_split"] - metrics["test_accuracy"]) <= 1.5 / n


def test_paired_table_uses_split_bits_and_refuses_other_images(run_dir: Path) -> None:
    base = {"test_accuracy": 0.5, "cpu": "x", **suite.split_test_bits(run_dir)}
    n = base["test_split_size"]
    right = suite.unpack_bits(base["test_split_right"], n)
    flipped = right.copy()
    flipped[:4] = ~flipped[:4]  # four images change: the SE comes from those disagreements
    cand = {**base, "test_split_right": np.packbits(flipped).tobytes().hex()}
    line = small_images.paired_table({"sign": {"auto": base, "c": cand}}, ["auto"]).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    diff = flipped.mean() - right.mean()
    se = np.sqrt((4 / n - diff**2) / n)
    assert cells[5] == f"{100 * diff:+.2f}" and cells[6] == f"{100 * se:.2f}"
    other = {**cand, "test_split_items": "another-set"}
    with pytest.raises(SystemExit, match="other images"):
        small_images.paired_table({"sign": {"auto": base, "c": other}}, ["auto"])
    # Rows kept before the bits were: the difference only, no SE.
    plain = {k: v for k, v in cand.items() if not k.startswith("test_split")}
    line = small_images.paired_table({"sign": {"auto": base, "c": plain}}, ["auto"]).splitlines()[-1]
    assert line.rstrip().endswith("| - |")
