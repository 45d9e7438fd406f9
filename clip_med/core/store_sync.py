"""What the processes of a torchrun job tell each other through its key-value store.

Two things a collective of the process group cannot do well:

* **Long waits.** While rank 0 alone works (writes the shards, evaluates), the others wait in
  :func:`store_barrier`: it polls the store with its own, generous timeout instead of sitting in
  a collective under the process group's timeout (which would end the run after 30 minutes).
* **A failing rank takes the others down with its message.** The first rank that fails writes
  ``rank N: <error>`` to the store (:func:`announce_failure`) and waits a little for the others to
  acknowledge it; every other rank learns of it in a barrier's poll, when its own collective breaks
  (the failed rank's connections close) or from :class:`FailureWatch`, a thread that polls the
  store and, should the rank stay stuck (e.g. in an NCCL collective), ends the process.

The store is the process group's own (under torchrun, the elastic agent's, which outlives a
failed worker).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

log = logging.getLogger(__name__)

FAILED = "clip_med/failed"
ACKNOWLEDGED = "clip_med/failed/acknowledged"
_POLL_START_S, _POLL_MAX_S = 0.01, 1.0


class PeerFailure(RuntimeError):
    """Another rank failed (the message is its own: ``rank N: <error>``)."""


def first_failure(store: Any) -> Optional[str]:
    """The message of the first rank that failed, or None."""
    return store.get(FAILED).decode() if store.check([FAILED]) else None


def acknowledge(store: Any, acknowledged: threading.Event) -> None:
    """Count this rank, once, as having heard of the failure (the failed rank waits for that)."""
    if not acknowledged.is_set():
        acknowledged.set()
        store.add(ACKNOWLEDGED, 1)


def announce_failure(store: Any, rank: int, world_size: int, exc: BaseException, wait_s: float) -> str:
    """Publish this rank's failure unless another rank's came first; returns the first one's message.

    When this rank's is the first, wait up to ``wait_s`` seconds for the others to acknowledge it,
    so that each can report it before the launcher stops them."""
    mine = f"rank {rank}: {type(exc).__name__}: {exc}"
    first = store.compare_set(FAILED, "", mine).decode()
    if first == mine:
        deadline = time.monotonic() + wait_s
        while int(store.add(ACKNOWLEDGED, 0)) < world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    return first


def store_barrier(store: Any, key: str, world_size: int, timeout_s: float, what: str,
                  on_failure: Callable[[str], None]) -> None:
    """Wait until ``world_size`` ranks reached ``key``; ``on_failure(message)`` (which raises) if a rank failed."""
    store.add(key, 1)
    deadline, delay = time.monotonic() + timeout_s, _POLL_START_S
    while int(store.add(key, 0)) < world_size:
        message = first_failure(store)
        if message is not None:
            on_failure(message)
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s / 60:.0f} minutes for the other processes ({what}); raise "
                               "trainer.dist_phase_timeout_minutes if that work takes longer")
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_S)


class FailureWatch(threading.Thread):
    """Polls the store for another rank's failure; logs it and, if this rank has not stopped ``grace_s``
    seconds later (stuck in a collective the failed rank will never join), ends the process."""

    def __init__(self, store: Any, rank: int, acknowledged: threading.Event, poll_s: float = 1.0,
                 grace_s: float = 20.0, exit_process: Callable[[int], Any] = os._exit):
        super().__init__(name="rank-failure-watch", daemon=True)
        self.store, self.rank, self.acknowledged = store, rank, acknowledged
        self.poll_s, self.grace_s, self.exit_process = poll_s, grace_s, exit_process
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.poll_s):
            try:
                message = first_failure(self.store)
            except Exception as exc:  # the store itself is gone: the main thread's collectives fail too
                log.debug("rank failure watch: store unreachable (%s)", exc)
                continue
            if message is not None and not message.startswith(f"rank {self.rank}:"):
                self._stop_for(message)
                return

    def _stop_for(self, message: str) -> None:
        log.error("stopping: %s", message)
        acknowledge(self.store, self.acknowledged)
        if not self.stopped.wait(self.grace_s):
            log.error("rank %d still busy %.0f s after another rank failed: ending the process", self.rank,
                      self.grace_s)
            logging.shutdown()
            self.exit_process(1)

    def stop(self) -> None:
        self.stopped.set()
