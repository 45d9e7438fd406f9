"""torch.distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

Besides the main process group (NCCL on CUDA, gloo on CPU) the trainer uses a small gloo
*control* group for exchanges of CPU objects (data positions, error counts, a checkpoint's
error): exchanging them over gloo never waits for the GPU.

Waits for rank 0's long work (:func:`barrier`) and a failing rank's message (:func:`failures_shared`)
go through the job's key-value store (:mod:`clip_med.core.store_sync`): those waits have their own
generous timeout, and a rank that fails ends the others with its message instead of leaving them in
a collective until the process group's timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from clip_med.core import store_sync
from clip_med.core.store_sync import PeerFailure as PeerFailure  # re-exported

log = logging.getLogger(__name__)

# How long the first rank to fail waits for the others to hear of it before it exits.
FAILURE_NOTICE_S = 10.0


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control: Any = None  # the gloo group for CPU-side agreement (None: the default group)
    store: Any = None  # the process group's key-value store (long waits, failure messages)
    phase_timeout_minutes: float = 24 * 60  # how long a rank waits for rank 0's long work
    # barrier numbering (every rank passes the same barriers in the same order) and "heard of a failure"
    sequence: Any = field(default_factory=itertools.count, compare=False, repr=False)
    acknowledged: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

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


def init_distributed(device: str = "auto", backend: str | None = None, timeout_minutes: float = 30,
                     phase_timeout_minutes: float = 24 * 60) -> DistInfo:
    """Join the process group torchrun describes, or run as a single process.

    ``timeout_minutes`` bounds every collective; ``phase_timeout_minutes`` the :func:`barrier` waits
    for work one rank does alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    control = store = None
    if world_size > 1:
        if not dist.is_initialized():
            backend = backend or ("nccl" if chosen.type == "cuda" else "gloo")
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes),
                                    device_id=chosen if chosen.type == "cuda" else None)
            log.info("process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, chosen)
        if dist.get_backend() != "gloo":
            control = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))
        store = dist.distributed_c10d._get_default_store()
    return DistInfo(rank, world_size, local_rank, chosen, control, store, phase_timeout_minutes)


def barrier(info: DistInfo, what: str = "rank 0's work") -> None:
    """Wait for every rank, e.g. while rank 0 alone writes shards or evaluates: through the store, under
    ``phase_timeout_minutes`` rather than the collectives' timeout, and ending with another rank's failure."""
    if not (info.distributed and dist.is_initialized()):
        return
    if info.store is None:
        dist.barrier(group=info.control)
        return
    store_sync.store_barrier(info.store, f"clip_med/barrier/{next(info.sequence)}", info.world_size,
                             info.phase_timeout_minutes * 60, what, lambda message: _peer_failed(info, message))


def _peer_failed(info: DistInfo, message: str):
    store_sync.acknowledge(info.store, info.acknowledged)
    raise PeerFailure(message)


@contextlib.contextmanager
def failures_shared(info: DistInfo, passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run a distributed job's body so that a rank's failure ends every rank with its message.

    An exception (other than ``passthrough`` ones, which every rank raises together) is announced
    through the store; a rank whose own error follows another rank's failure (its collective broke
    when that rank exited) raises :class:`PeerFailure` with that rank's message instead. A
    :class:`~clip_med.core.store_sync.FailureWatch` thread covers a rank stuck where no error comes."""
    if not info.distributed or info.store is None:
        yield
        return
    watch = store_sync.FailureWatch(info.store, info.rank, info.acknowledged)
    watch.start()
    not_announced: tuple[type[BaseException], ...] = (PeerFailure, *passthrough)
    try:
        yield
    except not_announced:
        raise
    except Exception as exc:
        first = _announce(info, exc)
        if first is not None and not first.startswith(f"rank {info.rank}:"):
            _peer_failed_from(info, first, exc)
        raise
    finally:
        watch.stop()


def _announce(info: DistInfo, exc: Exception) -> str | None:
    try:
        return store_sync.announce_failure(info.store, info.rank, info.world_size, exc, FAILURE_NOTICE_S)
    except Exception as store_error:  # the store is gone too (its host failed): nothing left to tell
        log.warning("could not tell the other ranks of this failure (%s)", store_error)
        return None


def _peer_failed_from(info: DistInfo, message: str, exc: Exception):
    try:
        _peer_failed(info, message)
    except PeerFailure as failure:
        raise failure from exc


def min_over_ranks(value: int, info: DistInfo) -> int:
    """The smallest ``value`` over the ranks (a CPU exchange over the control group)."""
    if not info.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=info.control)
    return int(tensor.item())


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
