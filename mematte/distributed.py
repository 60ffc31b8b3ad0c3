"""A process's place in a ``torchrun`` launch, for ``mematte train``, ``predict`` and ``eval``.

torchrun starts one process per device, on one machine or several, and tells each its
place in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``);
a process started otherwise is rank 0 of 1 and nothing here changes what it does.

Under torchrun a GPU process takes the GPU of its local rank and makes it the current
device before anything touches CUDA (otherwise every process also opens a context on
GPU 0). A CPU process takes an equal share of the cores it may run on: torchrun sets
``OMP_NUM_THREADS=1`` when the launch does not set it, which would leave all but one core
per process idle; an ``OMP_NUM_THREADS`` above 1 is kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# predict and eval meet only at the end, after every process has done its share of the
# folder; a share can take hours (torchrun itself stops every process when one fails).
FOLDER_RUN_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed_from_env(env: Mapping[str, str] = os.environ) -> Distributed:
    """The process's place in a ``torchrun`` launch (one process when not launched so)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    try:
        rank, world, local_rank, local_world = (int(env.get(n, defaults[n])) for n in names)
    except ValueError:
        raise ValueError(
            "the torchrun environment is malformed: " + ", ".join(f"{n}={env.get(n)!r}" for n in names)
        ) from None
    if not (0 <= rank < world and 0 <= local_rank < local_world):
        raise ValueError(
            f"the torchrun environment is inconsistent: RANK={rank}, WORLD_SIZE={world}, "
            f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world}"
        )
    return Distributed(rank, world, local_rank, local_world)


def take_device(ddp: Distributed, device: torch.device) -> torch.device:
    """The device this process runs on, made current. Under torchrun, ``cuda`` without an
    index is the GPU of the local rank; ValueError where the machine has no such GPU."""
    if device.type != "cuda":
        return device
    if ddp.enabled and device.index is None:
        count = torch.cuda.device_count()
        if ddp.local_rank >= count:
            raise ValueError(
                f"local rank {ddp.local_rank} has no GPU of its own: this machine has {count}; "
                f"start at most {count} processes per machine (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", ddp.local_rank)
    if device.index is not None:
        torch.cuda.set_device(device)
    return device


def share_cpu_threads(ddp: Distributed, device: torch.device) -> None:
    """Under torchrun on the CPU: this process's equal share of the cores it may use."""
    if not ddp.enabled or device.type != "cpu":
        return
    chosen = os.environ.get("OMP_NUM_THREADS", "")
    if chosen.isdigit() and int(chosen) > 1:
        return
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ddp.local_world_size))


def init_process_group(ddp: Distributed, backend: str, timeout: timedelta | None = None) -> None:
    """Join the launch's process group (once; nothing for a single process)."""
    if ddp.enabled and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)


def shard(items: Sequence[T], ddp: Distributed) -> list[T]:
    """This process's share of ``items``: those at ``rank``, ``rank + world_size``, …"""
    return list(items[ddp.rank :: ddp.world_size])


def gather_to_all(ddp: Distributed, value: T) -> list[T]:
    """Every process's ``value``, in rank order (picklable objects; gloo or NCCL)."""
    if not ddp.enabled:
        return [value]
    gathered: list = [None] * ddp.world_size
    dist.all_gather_object(gathered, value)
    return gathered


@contextmanager
def process_group(ddp: Distributed, backend: str, timeout: timedelta | None = None) -> Iterator[None]:
    """The launch's process group for the duration of the block (nothing for one process)."""
    init_process_group(ddp, backend, timeout)
    try:
        yield
    finally:
        if ddp.enabled and dist.is_initialized():
            dist.destroy_process_group()


def barrier(ddp: Distributed) -> None:
    if ddp.enabled:
        dist.barrier()
