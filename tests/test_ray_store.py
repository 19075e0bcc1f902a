"""Ray on two local nodes: workers read their own rows of the shared decoded store (issue 20).

One ``ray.cluster_utils.Cluster`` for the module: a head and a second node of 1 CPU each, so the
two training workers run on different nodes. One 2-epoch LeNet run on 480 MNIST images covers
the coverage check (every training row read exactly once per epoch, each rank exactly its share
of the shared permutation) and a worker SIGKILLed mid-epoch 2, restarted from epoch 1's checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from imgclf.training.config import TrainConfig

ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'imgclf[ray]')")

N_TRAIN, BATCH = 480, 48  # 10 full global batches: no partial batch is dropped
RUN = dict(data="mnist", model="lenet", epochs=2, subset=N_TRAIN, batch_size=BATCH, tensorboard=False)


@pytest.fixture(scope="module")
def two_nodes(mnist_dir: Path):
    from ray.cluster_utils import Cluster

    # Ray Train collects workers' reports every 2 s by default; polling faster shortens the wait
    # of the kill hook (it lets the last checkpoint be registered first). The nodes inherit it.
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def killed_run(two_nodes, tmp_path_factory: pytest.TempPathFactory):
    from imgclf.training.api import train
    from imgclf.training.distributed import FAIL_MARKER_ENV, KILL_AT_ENV, ROWS_ENV

    tmp = tmp_path_factory.mktemp("raystore")
    marker = tmp / "killed-once"
    mp = pytest.MonkeyPatch()
    mp.setenv(ROWS_ENV, "1")
    mp.setenv(KILL_AT_ENV, "2:3")  # rank 1 kills itself before batch 3 of epoch 2
    mp.setenv(FAIL_MARKER_ENV, str(marker))
    try:
        res = train(TrainConfig(**RUN, out=str(tmp / "run"), ray_workers=2), progress=False)
    finally:
        mp.undo()
    return res, marker


def test_workers_ran_on_two_nodes(two_nodes) -> None:
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2 and all(n["Resources"].get("CPU") == 1 for n in alive)


def test_each_epoch_reads_every_row_once(killed_run) -> None:
    res, _ = killed_run
    run = res.run_dir
    assert len(json.loads((run / "splits.json").read_text())["train"]) == N_TRAIN
    log = (run / "train.log").read_text()
    assert "streaming from the decoded store (2 workers share the store" in log
    gen = torch.Generator().manual_seed(TrainConfig().seed)  # the trainer's permutation stream
    for epoch in (1, 2):
        perm = torch.randperm(N_TRAIN, generator=gen).view(-1, BATCH)
        got = [np.fromfile(run / "rows" / f"epoch-{epoch}-rank-{r}.i64", dtype=np.int64) for r in (0, 1)]
        # Each rank read exactly rows rank::2 of every global batch of the shared permutation ...
        for r in (0, 1):
            assert np.array_equal(got[r], perm[:, r::2].reshape(-1).numpy()), (epoch, r)
        # ... so the two ranks together read the whole training set exactly once.
        assert np.array_equal(np.sort(np.concatenate(got)), np.arange(N_TRAIN)), epoch


def test_killed_worker_resumes_from_checkpoint(killed_run) -> None:
    res, marker = killed_run
    assert "killed itself before batch 3" in marker.read_text()  # SIGKILL mid-epoch 2
    log = (res.run_dir / "train.log").read_text()
    assert "resuming" in log and "from epoch 1" in log
    assert log.count("epoch 1/2") == 1  # epoch 1 was not trained again
    assert [h["epoch"] for h in res.history] == [1.0, 2.0]
    assert (res.bundle_dir / "model.json").exists() and res.metrics["epochs_run"] == 2
    assert res.metrics["test_accuracy"] > 0.5  # a real model, trained across the restart
