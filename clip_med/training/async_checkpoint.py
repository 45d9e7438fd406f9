"""Checkpoints written in the background: a CPU snapshot now, the file while training goes on.

The trainer takes a snapshot of the checkpoint's tensors in CPU memory (a copy: training goes on
changing the originals) and hands it to :class:`BackgroundWriter`, whose thread writes it with
:func:`clip_med.training.checkpoint.save_checkpoint` (atomic: the newest *complete* checkpoint is
always loadable, also after SIGKILL mid-write; older ones are pruned only after the new one is
on disk). One write is in flight at a time: asking for the next waits for the previous one.
A failed write is kept as :attr:`BackgroundWriter.error` for the trainer to share with every
rank at its next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

Save = Callable[[dict, Path, int, int], Path]


def snapshot_to_cpu(payload: Any, memo: Optional[dict[int, torch.Tensor]] = None) -> Any:
    """``payload`` with every tensor copied to CPU memory (containers rebuilt, other values shared);
    a tensor met twice is copied once, so that tensors shared in the payload stay shared in the file."""
    memo = {} if memo is None else memo
    if isinstance(payload, torch.Tensor):
        if id(payload) not in memo:
            memo[id(payload)] = payload.detach().to("cpu", copy=True)
        return memo[id(payload)]
    if isinstance(payload, dict):
        return {key: snapshot_to_cpu(value, memo) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return type(payload)(snapshot_to_cpu(value, memo) for value in payload)
    return payload


class BackgroundWriter:
    """Writes one checkpoint at a time in a thread of its own."""

    def __init__(self, save: Save):
        self.save = save
        self.error: Optional[str] = None
        self.last_seconds: Optional[float] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, payload: dict, run_dir: Path, step: int, keep_last: int) -> None:
        """Start writing ``payload`` (already a CPU snapshot) once the previous write is done.

        After a failed write nothing more is written: the error stands until the trainer stops."""
        self.wait()
        if self.error is not None:
            log.warning("checkpoint of step %d not written: an earlier write failed", step)
            return
        self._thread = threading.Thread(target=self._write, args=(payload, run_dir, step, keep_last),
                                        name=f"checkpoint-step-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> Optional[str]:
        """Wait for the write in flight (if any); returns the error of a failed write, or None."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.error

    def _write(self, payload: dict, run_dir: Path, step: int, keep_last: int) -> None:
        started = time.perf_counter()
        try:
            path = self.save(payload, run_dir, step, keep_last)
        except Exception as exc:  # reported to every rank by the trainer, which then stops
            log.error("checkpoint of step %d failed: %s", step, exc)
            self.error = str(exc)
            return
        self.last_seconds = time.perf_counter() - started
        log.debug("checkpoint %s written in %.1f s", path, self.last_seconds)
