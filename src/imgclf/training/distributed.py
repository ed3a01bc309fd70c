"""One code path for 1 or N processes, keyed on RANK / LOCAL_RANK / WORLD_SIZE as torchrun sets
them (torchvision's ``init_distributed_mode``, nanoGPT). One process is the special case of N:
every helper here is a no-op when ``world_size`` is 1.

The process group is ``cpu:gloo,cuda:nccl``: CUDA tensors (DDP's gradients, batch-norm buffers)
go through NCCL, CPU tensors (the per-step stop flag, gathered metrics) through gloo, so the
control traffic never waits on the GPU. Rank 0 alone writes files and reports.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from imgclf.core.errors import Stopped, TrainError

# rank 0 may scan, audit and plan for hours on a million photos before the others can start
_PREPARE_TIMEOUT = datetime.timedelta(hours=24)
_long_group = None  # a gloo group with that timeout, for the one wait on rank 0's preparation
_own_group = False  # made here (torchrun), not by Ray Train: this process tears it down at the end


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this node: they share its memory and cores

    @property
    def is_main(self) -> bool:
        """Only the main process logs, writes files and saves models."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Distributed:
    """Join the process group when launched by torchrun (or Ray, which sets the same variables);
    a single process otherwise."""
    global _long_group, _own_group
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if not dist.is_initialized():  # Ray Train has made the group already
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        store = _store_of_this_attempt(world_size)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        _own_group = True
    if _long_group is None:
        _long_group = dist.new_group(backend="gloo", timeout=_PREPARE_TIMEOUT)
    return Distributed(rank, local_rank, world_size, local_world)


def _store_of_this_attempt(world_size: int):
    """torchrun's agent keeps one key-value store for all its attempts (pytorch#135712), so when it
    restarts the processes after a crash the dead attempt's keys are still there and a process can
    read a dead peer's address ("Connection refused" in gloo's connectFullMesh). On one node every
    process has the agent's restart count, so keys prefixed with it belong to this attempt alone;
    across nodes the counts may differ (docs/scale.md: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        return None
    shared = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=datetime.timedelta(minutes=30),
    )
    return dist.PrefixStore(f"imgclf/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", shared)


def leave_distributed(info: Distributed) -> None:
    """The end of a run that every process reached: wait for all (rank 0 may still be evaluating
    and writing), then close the group, so no process exits while a peer still talks to it."""
    global _long_group, _own_group
    if not (info.enabled and _own_group and dist.is_initialized()):
        return
    dist.barrier(group=_long_group)
    dist.destroy_process_group()
    _long_group, _own_group = None, False


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and reports."""
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_main(info: Distributed) -> None:
    """Every process waits here until rank 0 has prepared the run (data, split, plan) on disk."""
    if info.enabled:
        dist.barrier(group=_long_group)


def run_on_main(ranks: Distributed, work):
    """Run ``work`` in rank 0 alone while the other processes wait; its result there (None
    elsewhere). A failure in rank 0 is raised in every process, so none waits forever."""
    result, failure = None, None
    if ranks.is_main:
        try:
            result = work()
        except Exception as exc:  # raised again below, after the others have heard of it
            failure = exc
    said = share_from_main(None if failure is None else (type(failure).__name__, str(failure)), ranks)
    if failure is not None:
        raise failure
    if said is not None:
        kind, message = said
        raise Stopped(message) if kind == "Stopped" else TrainError(f"rank 0 failed: {message}")
    return result


def agree(flags: list[bool], info: Distributed) -> list[bool]:
    """The same yes/no answers in every process, a yes anywhere making it yes: one small
    all-reduce on the CPU (gloo), so a stop seen by one rank stops all at the same step."""
    if not info.enabled:
        return list(flags)
    tensor = torch.tensor([1.0 if f else 0.0 for f in flags])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def broadcast_flag(flag: bool, info: Distributed) -> bool:
    """Agree on one yes/no across processes (any process saying yes makes it yes)."""
    return agree([flag], info)[0]


def sum_over_ranks(values: list[float], info: Distributed) -> list[float]:
    """Totals over every process (float64 on the CPU), e.g. images seen and loss sums of an epoch."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather_to_main(value, info: Distributed) -> list | None:
    """Every process's ``value`` (any picklable object: our own, never a file's) as a list in
    rank order on rank 0; None elsewhere."""
    if not info.enabled:
        return [value]
    gathered = [None] * info.world_size if info.is_main else None
    dist.gather_object(value, gathered, dst=0, group=_long_group)
    return gathered


def share_from_main(value, info: Distributed):
    """Rank 0's ``value`` in every process."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_long_group)
    return box[0]


def average_batch_norm(model: nn.Module, info: Distributed) -> None:
    """Average batch-norm running statistics over the processes (timm's ``distribute_bn``), so
    that validation and the saved model see the statistics of all the data, not rank 0's share."""
    if not info.enabled:
        return
    for module in unwrap(model).modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                if buffer is not None:
                    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                    buffer.div_(info.world_size)


def wrap_model(model: nn.Module, info: Distributed, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """DDP when there are several processes; it broadcasts rank 0's weights at construction, so
    every process starts from the same model whatever it loaded."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


def per_node(amount: float, info: Distributed) -> float:
    """This process's share of something the node's processes share (memory, cores)."""
    return amount / max(1, info.local_world_size)
