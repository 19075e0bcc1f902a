"""Data-parallel training on Ray (``pip install 'imgclf[ray]'``).

Ray Train's ``TorchTrainer`` starts ``ray_workers`` processes; each runs the same loop as
single-process training (:class:`imgclf.training.trainer.Trainer`) with a :class:`RayDist`
context: the model is wrapped in DistributedDataParallel (gloo on CPU), every rank trains on
rows ``rank::world`` of each global batch of the shared seeded permutation, metrics are summed
across ranks, and only rank 0 writes the run folder. The data come from the decoded store
(``stream: auto`` streams with more than one worker): rank 0 builds it in ``cache_dir`` (shared
storage on a multi-node cluster) while the others wait, then every rank opens the splits as
memory-mapped :class:`imgclf.data.store.StoreArray` and reads only its own rows of each batch.
After each epoch rank 0 reports ``checkpoints/last.safetensors`` (+ best, history) to Ray, so
Ray's ``FailureConfig`` can restart a failed worker group from it.

Only :func:`imgclf.training.api.train` imports this module, and only when ``ray_workers`` is set.

Environment knobs (documented in docs/SCALING.md):
``IMGCLF_RAY_STORAGE`` where Ray keeps checkpoints (must be shared storage on a multi-node
cluster; default ``RUN_DIR/ray``, removed after success), ``IMGCLF_RAY_MAX_FAILURES`` (default 2).
Debug/test hooks: ``IMGCLF_DEBUG_ROWS=1`` makes each rank append the training row indices it reads
to ``RUN_DIR/rows/epoch-E-rank-R.i64`` (raw int64, rewritten when an epoch starts again), so the
coverage of an epoch can be checked; ``IMGCLF_TEST_KILL_AT=E:B`` SIGKILLs the last rank before
batch B of epoch E, once (needs ``IMGCLF_TEST_FAIL_MARKER``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf.core.errors import TrainingError
from imgclf.training.config import TrainConfig
from imgclf.training.trainer import DistContext, Trainer, TrainResult

log = logging.getLogger("imgclf")

# Test hook: the last rank raises once, after the checkpoint of this epoch was reported.
FAIL_AT_EPOCH_ENV = "IMGCLF_TEST_FAIL_AT_EPOCH"
FAIL_MARKER_ENV = "IMGCLF_TEST_FAIL_MARKER"
# Debug hook: each rank records the training rows it reads (RUN_DIR/rows/epoch-E-rank-R.i64).
ROWS_ENV = "IMGCLF_DEBUG_ROWS"
# Test hook "EPOCH:BATCH": the last rank kills itself (SIGKILL) before that batch, once.
KILL_AT_ENV = "IMGCLF_TEST_KILL_AT"
# Files of the run folder a restarted (possibly relocated) rank 0 needs to carry on.
_CKPT_FILES = ("checkpoints/last.safetensors", "checkpoints/best.safetensors", "history.csv")
# Run outputs shipped back to the driver when rank 0 ran on another node.
_OUTPUTS = ("model", "metrics.json", "history.csv", "plot.png", "splits.json", "config.json", "train.log")


def require_ray() -> Any:
    """Import ray, or raise a TrainingError saying how to install it."""
    try:
        import ray
        import ray.train.torch  # noqa: F401
    except ImportError as e:
        raise TrainingError(
            f"Ray is not installed ({e}). Install the extra: pip install 'imgclf[ray]', "
            "or train in one process by leaving out --ray-workers."
        ) from e
    return ray


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (``auto``, ``ray://host:10001``) or start a local Ray; True if started here.

    IMGCLF_* environment variables (data and cache folders) travel to the workers.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    env = {k: v for k, v in os.environ.items() if k.startswith("IMGCLF_")}
    kw: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a local Ray instance"
        raise TrainingError(
            f"could not connect to {where}: {e}. Start a cluster with `ray start --head` "
            "(then --ray-address auto), or leave out --ray-address to start a local one."
        ) from e
    return True


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """Workers run in another folder: paths must be absolute."""
    changes: dict[str, Any] = {"out": str(Path(cfg.out).resolve())}
    if Path(cfg.data).exists():
        changes["data"] = str(Path(cfg.data).resolve())
    if cfg.cache_dir:
        changes["cache_dir"] = str(Path(cfg.cache_dir).resolve())
    return cfg.replace(**changes)


class RayDist(DistContext):
    """The hooks of :class:`imgclf.training.trainer.DistContext` on a Ray Train worker group."""

    def __init__(self, rank: int, world_size: int, ship_outputs: bool) -> None:
        self.rank = rank
        self.world_size = world_size
        self.resume_from = None
        self.ship_outputs = ship_outputs

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)  # broadcasts rank 0's weights, averages gradients

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        import torch.distributed as tdist

        t = torch.tensor(values, dtype=torch.float64)
        if tdist.is_initialized():
            tdist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Any) -> Any:
        """Rank 0 decodes into the shared store while the others wait; then they open it."""
        import torch.distributed as tdist

        if self.world_size == 1 or not tdist.is_initialized():
            return fn()
        out = fn() if self.is_main else None
        tdist.barrier()
        return out if self.is_main else fn()

    def epoch_rows(self, x_all: Any, epoch: int, run_dir: Path) -> Any:
        record = os.environ.get(ROWS_ENV) == "1"
        kill = _kill_batch(epoch, self.rank, self.world_size)
        if not record and kill is None:
            return x_all
        path = run_dir / "rows" / f"epoch-{epoch}-rank-{self.rank}.i64" if record else None
        return _RowLog(x_all, path, kill)

    def end_epoch(self, epoch: int, row: dict[str, float], run_dir: Path) -> None:
        import ray.train

        metrics = {k: float(v) for k, v in row.items()}
        if self.is_main:
            with tempfile.TemporaryDirectory(prefix="imgclf-ckpt-") as tmp:
                for rel in _CKPT_FILES:
                    if (run_dir / rel).exists():
                        shutil.copy2(run_dir / rel, Path(tmp) / Path(rel).name)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)  # a barrier: every rank reports once per epoch
        if os.environ.get(FAIL_AT_EPOCH_ENV):
            import torch.distributed as tdist

            # Test hook only: report() returns on each rank on its own, so without this the
            # failing rank could raise before rank 0 has stored the checkpoint (a flaky restart
            # from scratch). report() with a checkpoint returns once it is stored.
            if tdist.is_initialized():
                tdist.barrier()
        _maybe_fail(epoch, self.rank, self.world_size)


def _maybe_fail(epoch: int, rank: int, world_size: int) -> None:
    """Simulate a worker crash once (tests): the last rank raises at the configured epoch."""
    at = os.environ.get(FAIL_AT_EPOCH_ENV)
    marker = os.environ.get(FAIL_MARKER_ENV)
    if not at or not marker or int(at) != epoch or rank != world_size - 1 or Path(marker).exists():
        return
    Path(marker).write_text(f"worker rank {rank} failed after epoch {epoch}\n")
    raise RuntimeError(f"injected failure of worker rank {rank} after epoch {epoch} ({FAIL_AT_EPOCH_ENV})")


def _kill_batch(epoch: int, rank: int, world_size: int) -> int | None:
    """The batch before which this rank kills itself in this epoch (KILL_AT_ENV), or None."""
    at, marker = os.environ.get(KILL_AT_ENV), os.environ.get(FAIL_MARKER_ENV)
    if not at or not marker or rank != world_size - 1 or Path(marker).exists():
        return None
    e, b = (int(v) for v in at.split(":"))
    return b if e == epoch else None


class _RowLog:
    """Training rows as read by one rank in one epoch: appends each batch's row ids to ``path``."""

    def __init__(self, x_all: Any, path: Path | None, kill_at: int | None) -> None:
        self.x_all, self.path, self.kill_at, self.batches = x_all, path, kill_at, 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")  # an epoch trained again after a restart starts its record afresh

    def __len__(self) -> int:
        return len(self.x_all)

    def __getitem__(self, idx: Any) -> Any:
        if self.batches == self.kill_at:
            # A SIGKILLed worker loses the reports Ray Train has not collected yet (it polls every
            # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, default 2 s); wait some polls so that the last
            # epoch's checkpoint is registered and the restart resumes from it, not from the one before.
            time.sleep(max(2.0, 4 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0))))
            marker = Path(os.environ[FAIL_MARKER_ENV])
            marker.write_text(f"worker pid {os.getpid()} killed itself before batch {self.batches}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        rows = self.x_all[idx]
        if self.path is not None:
            ids = np.asarray(idx.cpu().numpy() if hasattr(idx, "cpu") else idx, dtype=np.int64)
            with open(self.path, "ab") as f:
                f.write(ids.tobytes())
        self.batches += 1
        return rows


def _worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: the ordinary loop with a RayDist context."""
    import ray.train
    import ray.util

    os.environ.update(config["env"])  # data/cache folders and test hooks, also on a remote cluster
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig.from_dict(config["cfg"])
    run_dir = Path(cfg.out)
    ship = rank == 0 and ray.util.get_node_ip_address() != config["driver_ip"]
    dist = RayDist(rank, world, ship)
    log.propagate = False  # Ray's root handler would print every line twice
    if rank != 0:
        log.setLevel(logging.WARNING)  # rank 0 speaks for the group
    resuming = bool(config["resuming"])
    local_ckpt = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restart after a failure: continue from the last reported epoch
        local_ckpt = Path(tempfile.mkdtemp(prefix="imgclf-resume-"))
        with ckpt.as_directory() as d:
            for f in Path(d).iterdir():
                shutil.copy2(f, local_ckpt / f.name)
        dist.resume_from = local_ckpt / "last.safetensors"
        resuming = True
        if rank == 0:  # a relocated rank 0 still needs best weights for --keep best
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            if (local_ckpt / "best.safetensors").exists():
                shutil.copy2(local_ckpt / "best.safetensors", run_dir / "checkpoints" / "best.safetensors")
    try:
        result = Trainer(cfg, run_dir, progress=False, resuming=resuming, dist=dist).fit()
    finally:
        if local_ckpt is not None:
            shutil.rmtree(local_ckpt, ignore_errors=True)
    final = {"done": 1.0, **{k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}}
    if dist.ship_outputs:
        with tempfile.TemporaryDirectory(prefix="imgclf-out-") as tmp:
            for rel in _OUTPUTS:
                src = run_dir / rel
                if src.is_dir():
                    shutil.copytree(src, Path(tmp) / rel)
                elif src.exists():
                    shutil.copy2(src, Path(tmp) / rel)
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(final)


def train_distributed(
    cfg: TrainConfig, *, progress: bool | None = None, resuming: bool = False
) -> TrainResult:
    """Train ``cfg`` with ``cfg.ray_workers`` data-parallel Ray workers; returns as :func:`train` does."""
    ray = require_ray()
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = _absolute(cfg)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = init_ray(cfg.ray_address)
    storage_env = os.environ.get("IMGCLF_RAY_STORAGE")
    storage = storage_env or str(run_dir / "ray")
    try:
        import ray.util

        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "resuming": resuming,
                "driver_ip": ray.util.get_node_ip_address(),
                "env": {k: v for k, v in os.environ.items() if k.startswith("IMGCLF_")},
            },
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=int(cfg.ray_workers or 1), use_gpu=False),
            run_config=RunConfig(
                name=f"imgclf-{run_dir.name}",
                storage_path=storage,
                failure_config=FailureConfig(max_failures=int(os.environ.get("IMGCLF_RAY_MAX_FAILURES", 2))),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
            ),
        )
        log.info("training on Ray with %d worker(s); checkpoints in %s", cfg.ray_workers, storage)
        try:
            result = trainer.fit()
        except Exception as e:  # Ray wraps the worker's exception; show its message, not Ray's stack
            raise TrainingError(
                f"Ray training failed: {e}".splitlines()[0] + f" (see {run_dir}/train.log)"
            ) from e
        if not (run_dir / "model" / "model.json").exists() and result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:  # rank 0 ran on another node
                shutil.copytree(d, run_dir, dirs_exist_ok=True)
    finally:
        if started:
            ray.shutdown()
    if not (run_dir / "model" / "model.json").exists():
        raise TrainingError(f"Ray training finished without a bundle in {run_dir / 'model'}")
    if not storage_env:
        shutil.rmtree(run_dir / "ray", ignore_errors=True)  # run_dir/checkpoints keeps the resume point
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "history.csv") as f:
        history = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return TrainResult(run_dir, run_dir / "model", metrics, history)
