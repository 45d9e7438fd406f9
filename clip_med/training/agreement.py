"""What every rank decides together at each step, agreed on the device and read one step late.

Every step builds one small int32 tensor on the training device: was this step finite, up to
which step this rank holds data, may the run go on (no stop signal), is no time-based checkpoint
due yet, and did the last background checkpoint write succeed. One all-reduce (MIN, on the main
process group: NCCL on GPUs) makes every rank see the same values. The finite flag is used at
once, on the device (:func:`clip_med.training.nonfinite.apply_update_if`); the host reads the
whole row only ``lag`` steps later (1 by default), from a copy started right after the reduce,
by which time the GPU is busy with the next step. So no step waits for the GPU to drain.

To stop together when one rank's data runs short, each rank keeps ``lag + 1`` batches of look-ahead
(:class:`GroupFeed`) and reports how far its data reaches; a step runs only when every rank is
known to hold its batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from clip_med.core import distributed

FIELDS = ("ok", "data_until", "go_on", "not_due", "writer_ok")


@dataclass(frozen=True)
class Agreed:
    """One step's decisions, as every rank sees them."""

    step: int  # the global step (1-based) these flags were raised at
    ok: bool  # the step's loss (and gradients) were finite everywhere: it was applied
    data_until: int  # every rank holds data for the epoch's steps before this index
    go_on: bool  # no rank was asked to stop
    not_due: bool  # no time-based checkpoint is due
    writer_ok: bool  # rank 0's background checkpoint writes have all succeeded so far


class StepAgreement:
    """Builds, reduces and (``lag`` steps later) reads each step's flags."""

    def __init__(self, info: distributed.DistInfo, lag: int):
        self.info, self.lag = info, lag
        self._pending: deque[tuple[int, torch.Tensor, Optional[torch.cuda.Event]]] = deque()

    def agree(self, step: int, ok: torch.Tensor, data_until: int, go_on: bool, not_due: bool,
              writer_ok: bool) -> torch.Tensor:
        """The step's flags reduced over the ranks (on the device); queued to be read later."""
        host = torch.tensor([data_until, go_on, not_due, writer_ok], dtype=torch.int32)
        cuda = ok.device.type == "cuda"
        rest = host.pin_memory().to(ok.device, non_blocking=True) if cuda else host
        flags = torch.cat([ok.reshape(1).to(torch.int32), rest])
        if self.info.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        self._pending.append((step, *_copy_to_host(flags)))
        return flags

    def ready(self) -> list[Agreed]:
        """The flags at least ``lag`` steps old, oldest first."""
        return self._take(len(self._pending) - self.lag)

    def flush(self) -> list[Agreed]:
        """Every queued step's flags (waits for the device)."""
        return self._take(len(self._pending))

    def _take(self, count: int) -> list[Agreed]:
        taken = []
        for _ in range(max(count, 0)):
            step, host, event = self._pending.popleft()
            if event is not None:
                event.synchronize()
            ok, data_until, go_on, not_due, writer_ok = host.tolist()
            taken.append(Agreed(step, bool(ok), data_until, bool(go_on), bool(not_due), bool(writer_ok)))
        return taken


def _copy_to_host(flags: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """A host copy of ``flags`` that completes with the reduce (not after whatever the stream runs next)."""
    if flags.device.type != "cuda":
        return flags, None
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    host.copy_(flags, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class GroupFeed:
    """An epoch's step groups with ``ahead`` of them fetched in advance, so that a rank can report how far
    its data reaches before it is needed."""

    def __init__(self, groups: Iterator[list[dict]], first_step: int, steps: int, ahead: int):
        self.groups, self.next_step, self.steps, self.ahead = groups, first_step, steps, ahead
        self.held: deque[list[dict]] = deque()
        self._exhausted = False
        self._fill()

    @property
    def data_until(self) -> int:
        """The epoch step index this rank holds data up to (exclusive)."""
        return self.next_step + len(self.held)

    def pop(self) -> list[dict]:
        group = self.held.popleft()
        self.next_step += 1
        self._fill()
        return group

    def _fill(self) -> None:
        while (not self._exhausted and len(self.held) < self.ahead
               and self.next_step + len(self.held) < self.steps):
            group = next(self.groups, None)
            if group is None:
                self._exhausted = True
            else:
                self.held.append(group)

    def agree_start(self, info: distributed.DistInfo) -> int:
        """How far every rank's data reaches at the start (one CPU exchange per epoch)."""
        return distributed.min_over_ranks(self.data_until, info)
