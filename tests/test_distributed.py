"""Ray: data-parallel training, predict-batch, failure recovery (one local 2-CPU Ray for the module)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgclf.training.config import TrainConfig

ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'imgclf[ray]')")
pq = pytest.importorskip("pyarrow.parquet")

# Small real MNIST runs: 2 epochs of LeNet on 1,000 training images.
RUN = dict(data="mnist", model="lenet", epochs=2, subset=1000, tensorboard=False, batch_size=32)


@pytest.fixture(scope="module")
def ray_local(mnist_dir: Path):
    """One local Ray instance for the module: 2 CPUs, no dashboard, loopback only."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def two_worker_run(ray_local, tmp_path_factory: pytest.TempPathFactory):
    from imgclf.training.api import train

    out = tmp_path_factory.mktemp("ray") / "mnist2"
    return train(TrainConfig(**RUN, out=str(out), ray_workers=2), progress=False)


@pytest.fixture(scope="module")
def mnist_pngs(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 real MNIST test digits as PNG files in class folders, plus one corrupt file."""
    from PIL import Image

    from imgclf.data.sources import read_idx

    root = tmp_path_factory.mktemp("pngs")
    x = read_idx(gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes()))
    y = read_idx(gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    for i in range(2000):
        d = root / str(y[i])
        d.mkdir(exist_ok=True)
        Image.fromarray(x[i]).save(d / f"{i:05d}.png")
    (root / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_two_workers_match_one_and_write_one_bundle(two_worker_run, tmp_path: Path) -> None:
    from imgclf.runtime.bundle import load_bundle
    from imgclf.training.api import train

    one = train(TrainConfig(**RUN, out=str(tmp_path / "mnist1")), progress=False)
    two = two_worker_run
    # Same seeded permutation and global batch, gradients averaged by DDP: same training within noise.
    assert two.metrics["test_accuracy"] > 0.8
    assert abs(two.metrics["test_accuracy"] - one.metrics["test_accuracy"]) < 0.03
    assert abs(two.history[-1]["train_loss"] - one.history[-1]["train_loss"]) < 0.05
    assert [h["epoch"] for h in two.history] == [1.0, 2.0]
    # Exactly one bundle, written by rank 0, loadable; Ray's own checkpoint copies cleaned up.
    assert [p.parent.name for p in two.run_dir.rglob("model.json")] == ["model"]
    assert not (two.run_dir / "ray").exists()
    assert (two.run_dir / "checkpoints" / "last.safetensors").exists()
    b = load_bundle(two.bundle_dir)
    assert b.meta["train_config"]["ray_workers"] == 2
    assert "epoch 2/2" in (two.run_dir / "train.log").read_text()


def test_predict_batch_matches_predict(two_worker_run, mnist_pngs: Path, tmp_path: Path) -> None:
    from imgclf.runtime.bundle import load_bundle
    from imgclf.runtime.predict import expand_paths, predict_files
    from imgclf.serving.batch import predict_dataset, read_predictions

    bundle = load_bundle(two_worker_run.bundle_dir)
    files, _ = expand_paths([str(mnist_pngs)])
    expected = {str(Path(r.path).resolve()): r.label for r in predict_files(bundle, files)}

    out_ray = tmp_path / "ray.parquet"
    s = predict_dataset(two_worker_run.run_dir, [str(mnist_pngs)], out_ray, workers=2, chunk=1200)
    assert (s.total, s.predicted, s.failed) == (2001, 2001, 1)
    rows = read_predictions(out_ray)
    got = {r["path"]: r["label"] for r in rows}
    assert got == expected  # the same labels as `imgclf predict`, the broken file with no label
    broken = next(r for r in rows if r["path"].endswith("broken.png"))
    assert broken["label"] is None and broken["error"]
    ok = [r for r in rows if r["label"] is not None]
    assert all(len(r["top_k"]) == 5 and r["top_k"][0]["label"] == r["label"] for r in ok)
    truth = {str(p.resolve()): p.parent.name for p in mnist_pngs.rglob("*.png")}
    acc = np.mean([r["label"] == truth[r["path"]] for r in ok])
    assert acc > 0.8  # real digits, a real model
    assert not Path(str(out_ray) + ".parts").exists()

    # Local engine, resumable: first 3 classes, then everything (only the rest is predicted).
    out = tmp_path / "local.parquet"
    part = predict_dataset(bundle.path, [str(mnist_pngs / c) for c in "012"], out, chunk=300)
    full = predict_dataset(bundle.path, [str(mnist_pngs)], out, chunk=300)
    # The broken file failed in the first run, so the second tries it again (and fails again).
    assert part.failed == 1 and (full.already_done, full.retried) == (part.total - 1, 1)
    assert full.predicted == 2001 - full.already_done and full.failed == 1
    rows = read_predictions(out)
    assert len(rows) == 2001 and len({r["path"] for r in rows}) == 2001
    assert {r["path"]: r["label"] for r in rows} == expected
    again = predict_dataset(bundle.path, [str(mnist_pngs)], out)
    assert (again.predicted, again.already_done, again.retried) == (1, 2000, 1)  # only the broken file


def test_damaged_part_is_redone(two_worker_run, mnist_pngs: Path, tmp_path: Path) -> None:
    from imgclf.serving.batch import parts_dir, predict_dataset, read_predictions

    out = tmp_path / "p.parquet"
    parts_dir(out).mkdir()
    (parts_dir(out) / "local-crashed-000000.parquet").write_bytes(b"PAR1 cut short")
    s = predict_dataset(two_worker_run.bundle_dir, [str(mnist_pngs / "7")], out)
    assert s.predicted == s.total > 100
    assert len(read_predictions(out)) == s.total


def test_predict_batch_multi_label_on_ray_matches_local(
    ray_local, multilabel_bundle: Path, colour_garment_dir: Path, tmp_path: Path
) -> None:
    """Multi-label rows (a list<string> column, p_<label> columns) come through Ray Data unchanged."""
    from conftest import batch_input_folder

    from imgclf.serving.batch import predict_dataset, read_predictions

    d = batch_input_folder(tmp_path, colour_garment_dir)
    local = predict_dataset(multilabel_bundle, [str(d)], tmp_path / "local.parquet", progress=False)
    s = predict_dataset(multilabel_bundle, [str(d)], tmp_path / "ray.parquet", workers=1, progress=False)
    assert (s.predicted, s.failed) == (local.predicted, local.failed) == (13, 1)
    by_path = {r["path"]: r for r in read_predictions(tmp_path / "local.parquet")}
    rows = read_predictions(tmp_path / "ray.parquet")
    assert len(rows) == 13
    for r in rows:
        want = by_path[r["path"]]
        assert r["labels"] == want["labels"] and r["error"] == want["error"]
        if r["error"] is None:
            assert r["p_red"] == pytest.approx(want["p_red"], abs=1e-4)


def test_killed_worker_does_not_lose_the_run(ray_local, tmp_path: Path, monkeypatch) -> None:
    from imgclf.training.api import train
    from imgclf.training.distributed import FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV

    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "1")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(marker))
    cfg = TrainConfig(**{**RUN, "subset": 500}, out=str(tmp_path / "run"), ray_workers=2)
    r = train(cfg, progress=False)
    assert marker.exists()  # rank 1 really raised after epoch 1's checkpoint
    log = (r.run_dir / "train.log").read_text()
    assert "resuming" in log and "from epoch 1" in log  # Ray restarted the group from the checkpoint
    assert log.count("epoch 1/2") == 1  # epoch 1 was not trained again
    assert [h["epoch"] for h in r.history] == [1.0, 2.0]
    assert (r.bundle_dir / "model.json").exists() and r.metrics["epochs_run"] == 2


def test_no_ray_import_without_ray_options(tmp_path: Path) -> None:
    code = (
        "import sys, imgclf.cli, imgclf.training.api, imgclf.serving.batch, imgclf.serving.app\n"
        "imgclf.cli.build_parser()\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_cli_errors_are_one_line(two_worker_run, tmp_path: Path, capsys) -> None:
    from imgclf.cli import main

    rc = main(
        ["predict-batch", str(two_worker_run.bundle_dir), "--data", str(tmp_path / "nope"), "--out", "x.pq"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope" in err and "no such file" in err and "Traceback" not in err
    rc = main(["train", "--data", "mnist", "--ray-workers", "0", "--out", str(tmp_path / "r")])
    assert rc == 2 and "ray_workers=0: must be in the range >= 1" in capsys.readouterr().err


def test_ray_serve_same_api(two_worker_run, mnist_pngs: Path) -> None:
    import socket

    import httpx
    from ray import serve

    from imgclf.runtime.bundle import load_bundle
    from imgclf.serving import ray_serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    files = sorted(mnist_pngs.glob("[0-9]/*.png"))[:6]
    url = ray_serve.start(two_worker_run.bundle_dir, port=port, replicas=2, max_batch=8)
    try:
        up = [("file", (f.name, f.read_bytes(), "image/png")) for f in files]
        r = httpx.post(f"{url}/v1/predict", files=up, timeout=60)
        assert r.status_code == 200, r.text
        got = [p["label"] for p in r.json()["predictions"]]
        assert got == [p["label"] for p in load_bundle(two_worker_run.bundle_dir).predict(files)]
        bad = httpx.post(f"{url}/v1/predict", content=b"not an image", timeout=60)
        assert bad.status_code in (400, 415, 422) and "error" in bad.text.lower()
    finally:
        serve.shutdown()


def test_multi_label_trains_on_two_workers(ray_local, colour_garment_dir: Path, tmp_path: Path) -> None:
    """Multi-label targets travel to the Ray workers; the bundle keeps the task and its thresholds."""
    from imgclf.runtime.bundle import load_bundle
    from imgclf.training.api import train

    cfg = TrainConfig(
        data=str(colour_garment_dir), multi_label=True, model="lenet", img_size=28, epochs=1,
        tensorboard=False, batch_size=32, out=str(tmp_path / "ml"), ray_workers=2,
    )  # fmt: skip
    res = train(cfg, progress=False)
    b = load_bundle(res.bundle_dir)
    assert b.multi_label and len(b.thresholds) == len(b.classes) == 5
    assert 0 <= res.metrics["test_mAP"] <= 1 and np.isfinite(res.history[-1]["train_loss"])
