"""Train on a Ray cluster: Ray Train starts the workers and their torch process group, and each
worker runs :func:`imgclf.api.train` as a process under torchrun would (rank 0 alone writes the
run folder, which every node must see: shared storage on several machines).

    from imgclf.ray_train import train_on_ray
    train_on_ray("photos/", "runs/ray", {"epochs": 10}, num_workers=8, use_gpu=True)

Needs ``pip install imgclf[ray]``. A rerun with the same ``out`` continues the run there, and so
does Ray's own restart of failed workers (``restarts``), as ``--resume auto`` does under torchrun.
"""

from __future__ import annotations

import os
from pathlib import Path

from imgclf import api
from imgclf.core.errors import ImgclfError
from imgclf.core.rundir import RunDir

# Ray's default (30 min) is shorter than rank 0's scan, audit and plan of a large data set, which
# the other ranks wait for on the default group when Ray, not imgclf, created it
_GROUP_TIMEOUT_S = 24 * 3600


class RayMissingError(ImgclfError, RuntimeError):
    """Ray Train is not installed."""

    code = "ray_missing"


def _ray():
    try:
        import ray.train
        import ray.train.torch
    except ImportError:
        raise RayMissingError("training on Ray needs Ray Train: pip install imgclf[ray]") from None
    return ray


def _worker_loop(config: dict) -> None:
    """Run in each Ray worker: the torchrun variables imgclf reads, then one call of api.train."""
    import torch
    import torch.distributed as dist

    context = _ray().train.get_context()
    fallback = {
        "RANK": context.get_world_rank(),
        "WORLD_SIZE": context.get_world_size(),
        "LOCAL_RANK": context.get_local_rank(),
        "LOCAL_WORLD_SIZE": context.get_local_world_size(),
        "NODE_RANK": context.get_node_rank(),
    }
    for name, value in fallback.items():  # Ray Train V2 sets them all; older Ray may not
        os.environ.setdefault(name, str(value))
    if config["use_gpu"] and torch.cuda.is_available():
        torch.cuda.set_device(_ray().train.torch.get_device())
    # a rerun of a finished run (or Ray's restart after its last step) has nothing to do; rank 0
    # reads the folder before anyone writes to it, and "auto" starts or continues the rest
    finished = [RunDir(config["out"]).status == "finished"]
    if dist.is_initialized():
        dist.broadcast_object_list(finished, src=0)
    if not finished[0]:
        api.train(config["source"], config["out"], config["settings"], resume="auto")


def train_on_ray(
    source,
    out,
    settings: dict | None = None,
    num_workers: int = 2,
    use_gpu: bool = False,
    *,
    restarts: int = 0,
    storage_path: str | None = None,
) -> dict:
    """Train ``source`` into the run folder ``out`` with ``num_workers`` Ray workers (one GPU each
    when ``use_gpu``); ``settings`` as :func:`imgclf.api.train` takes them (``batch_size`` is per
    worker). Returns the run's record (run.json) with its test metrics under ``metrics``.
    ``storage_path``: where Ray keeps its own records (default: beside ``out``)."""
    _ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(out).resolve()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"source": None if source is None else str(source), "out": str(out),
                           "settings": dict(settings or {}), "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if use_gpu else "gloo", timeout_s=_GROUP_TIMEOUT_S),
        run_config=RunConfig(name=out.name, storage_path=storage_path or str(out.parent / ".ray"),
                             failure_config=FailureConfig(max_failures=restarts)),
    )  # fmt: skip
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    run = RunDir(out)
    return {**run.read_run(), "metrics": run.read_json(RunDir.METRICS, {})}
