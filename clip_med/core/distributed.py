"""torch.distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

Besides the main process group (NCCL on CUDA, gloo on CPU) the trainer uses a small gloo
*control* group for the per-step decisions every rank must take together (was the loss
finite, does every rank still have data, should the run stop or checkpoint now): those are
a few CPU integers, and exchanging them over gloo never waits for the GPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control: Any = None  # the gloo group for CPU-side agreement (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda was asked for but torch sees no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA "
                               "device(s): start at most that many processes per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def init_distributed(device: str = "auto", backend: str | None = None, timeout_minutes: float = 30) -> DistInfo:
    """Join the process group torchrun describes, or run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    control = None
    if world_size > 1:
        if not dist.is_initialized():
            backend = backend or ("nccl" if chosen.type == "cuda" else "gloo")
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes),
                                    device_id=chosen if chosen.type == "cuda" else None)
            log.info("process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, chosen)
        if dist.get_backend() != "gloo":
            control = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world_size, local_rank, chosen, control)


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier(group=info.control)


def broadcast_object(value, info: DistInfo, src: int = 0):
    if not info.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src, group=info.control)
    return holder[0]


def all_gather_object(value, info: DistInfo) -> list:
    """``value`` from every rank, in rank order (CPU objects, over the control group)."""
    if not info.distributed:
        return [value]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, value, group=info.control)
    return gathered


def all_reduce_sum(value: float, info: DistInfo, device: torch.device | None = None) -> float:
    """Sum of ``value`` over ranks (a CPU exchange over the control group; ``device`` is ignored)."""
    if not info.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, group=info.control)
    return float(tensor.item())


def all_true(flags: list[bool], info: DistInfo) -> list[bool]:
    """For each flag: is it true on every rank? One small CPU all-reduce."""
    if not info.distributed:
        return list(flags)
    tensor = torch.tensor([int(flag) for flag in flags], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=info.control)
    return [bool(value) for value in tensor.tolist()]


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
