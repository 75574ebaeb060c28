"""Devices and processes: device selection, torchrun / DDP set-up, rank helpers.

Under `torchrun` every process reads RANK, WORLD_SIZE and LOCAL_RANK from the environment and
joins one process group: NCCL on CUDA, gloo on CPU. Without torchrun everything here is a no-op
for a single process, so library code calls these helpers unconditionally.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from imagetx.errors import ConfigError

# Rank 0 alone draws the periodic sample grids while the others wait at the next collective;
# a large model's grid can take far longer than the default 10 minutes.
TIMEOUT = timedelta(minutes=120)


@dataclass(frozen=True)
class Dist:
    """Where this process sits: its rank among world_size processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Only the main process logs, writes files and shows progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) without torchrun."""
    get = os.environ.get
    return int(get("RANK", 0)), int(get("WORLD_SIZE", 1)), int(get("LOCAL_RANK", 0))


def device_problems(spec, flag: str = "--device") -> list[str]:
    """The one syntax check of a device name: auto, cpu, cuda or cuda:N."""
    if isinstance(spec, str) and (spec in ("auto", "cpu", "cuda") or (spec.startswith("cuda:") and spec[5:].isdigit())):
        return []
    return [f"{flag} must be auto, cpu, cuda or cuda:N; got {spec!r}"]


def select_device(spec: str = "auto", local_rank: int | None = None, world_size: int | None = None) -> torch.device:
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N" -> the device this process
    computes on, made the current CUDA device (torch.cuda.set_device), so that NCCL, the
    allocator and compiled kernels all use it.

    "cuda" and "auto" take GPU local_rank % (visible GPUs): one process per GPU on a node that
    shows each process all of its GPUs, and GPU 0 where each process sees only its own (SLURM
    `--gpus-per-task=1`, CUDA_VISIBLE_DEVICES set per rank). Raises ConfigError for a device this
    machine does not have, and for "cuda:N" under torchrun (world_size > 1), which would put
    every process on the same GPU. local_rank and world_size default to torchrun's (env_ranks)."""
    problems = device_problems(spec, "device")
    if problems:
        raise ConfigError(problems)
    _, env_world_size, env_local_rank = env_ranks()
    local_rank = env_local_rank if local_rank is None else local_rank
    world_size = env_world_size if world_size is None else world_size
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        spec = "cuda" if count else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if world_size > 1 and spec != "cuda":
        raise ConfigError([
            f"device {spec} would put all {world_size} processes of this torchrun job on one GPU: use device cuda, "
            "so that each process takes GPU LOCAL_RANK % visible GPUs, and pick the GPUs with CUDA_VISIBLE_DEVICES"
        ])
    if not count:
        raise ConfigError([f"device {spec!r} requested but CUDA is not available here; use cpu or auto"])
    index = int(spec[5:]) if ":" in spec else local_rank % count
    if index >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ConfigError([f"device cuda:{index} requested but this machine has {count} GPU(s): {have}"])
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def setup(device: str = "auto") -> Dist:
    """Pick this process's device and, under torchrun, join the process group (NCCL for CUDA,
    gloo for CPU). Reuses a process group that already exists."""
    rank, world_size, local_rank = env_ranks()
    dev = select_device(device, local_rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


@contextmanager
def distributed(device: str = "auto") -> Iterator[Dist]:
    """setup() for the duration of a block; leaves the process group only if it joined it, after
    a barrier when the block ends normally."""
    joined = not dist.is_initialized()
    ctx = setup(device)
    try:
        yield ctx
        if joined and is_distributed():
            # every process finishes before any leaves: a gloo process whose peer tears the group
            # down while it is still in it can abort ("terminate called without an active
            # exception"; 2 of 8 two-process `imagetx sample` runs did without this barrier)
            dist.barrier()
    finally:
        if joined and dist.is_initialized():
            # objects still holding the group (a DDP reducer left in a reference cycle) go first:
            # freed after it, at interpreter exit, a gloo process could abort ("terminate called
            # without an active exception", 1 of 6 runs of test_two_gloo_processes_match_one)
            gc.collect()
            dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def ranks() -> tuple[int, int]:
    """(rank, world_size) in the process group; (0, 1) without one."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj) -> list:
    """Every process's `obj`, in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """The main process's `obj` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_first(ctx: Dist, fn):
    """Run fn on the main process only and share its result with every process. If it fails, the
    main process raises its error and the others a RunError, instead of waiting forever."""
    from imagetx.errors import RunError

    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    if ctx.is_distributed:
        result, failed = broadcast_object((result, None if error is None else str(error)))
        if failed is not None and error is None:
            raise RunError(f"the main process failed: {failed}")
    if error is not None:
        raise error
    return result


def node_main_first(ctx: Dist, fn) -> None:
    """Run fn on each node's first process (local rank 0: it writes node-local files such as the
    data cache) while every other process waits; then all continue. If it fails anywhere, that
    process raises its error and the others a RunError, instead of waiting forever."""
    from imagetx.errors import RunError

    error = None
    if ctx.local_rank == 0:
        try:
            fn()
        except Exception as exc:
            error = exc
    failed = [e for e in all_gather_object(None if error is None else str(error)) if e is not None]
    if error is not None:
        raise error
    if failed:
        raise RunError(f"another process failed: {failed[0]}")


def shard(n: int, rank: int, world_size: int) -> range:
    """This process's contiguous share of range(n): every index exactly once over all
    processes, no padding (unlike DistributedSampler); shares differ in size by at most one."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def gather_shards(mine: torch.Tensor, n: int) -> torch.Tensor:
    """Every process's rows of a tensor split by shard(n, rank, world_size) -> all n rows in index
    order, on every process, on `mine`'s device (a CUDA tensor under NCCL, CPU under gloo). The
    shares differ in size by at most one: each is padded to the largest for one all_gather."""
    if not is_distributed():
        return mine
    world = dist.get_world_size()
    most = -(-n // world)
    padded = mine.new_zeros((most, *mine.shape[1:]))
    padded[: mine.shape[0]] = mine
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: len(shard(n, r, world))] for r, part in enumerate(parts)])
