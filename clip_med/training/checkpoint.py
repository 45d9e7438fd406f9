"""Atomic, prunable, safely-loaded training checkpoints.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python containers, so it
loads with ``weights_only=True``. It is written through :func:`clip_med.core.io.atomic_write`
(a temporary file beside it, flushed to disk and renamed),
so the newest *complete* checkpoint is always loadable; a failed write (disk full) removes the
temporary file and raises, leaving earlier checkpoints untouched. The model weights sit under
``state_dict`` as open_clip's own trainer stores them, so ``open_clip.create_model(name,
pretrained=<checkpoint>)`` loads a clip_med checkpoint directly.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import IO, Any, cast

import torch

from clip_med.core.io import atomic_write, temporaries
from clip_med.modeling.checkpoint import (  # noqa: F401  (re-exported: the trainer's API)
    checkpoint_dir,
    find_resume_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)

log = logging.getLogger(__name__)

def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(payload: dict[str, Any], run_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write ``payload`` atomically as ``checkpoints/step-<step>.pt``, then prune to the last ``keep_last``."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    final = folder / f"step-{step:08d}.pt"
    sink = None
    try:
        # on any failure atomic_write removes its temporary: earlier checkpoints stay as they were
        with atomic_write(final, "wb") as handle:
            sink = _Sink(handle)
            torch.save(payload, cast(IO[bytes], sink))  # _Sink has the write/flush torch.save uses
    except (OSError, RuntimeError) as exc:
        previous = latest_checkpoint(run_dir)
        cause = sink.error if sink is not None and sink.error is not None else exc
        raise RuntimeError(
            f"could not write checkpoint {final} ({cause}). Free disk space or move the run directory; "
            f"the previous checkpoint {previous or '(none)'} is intact."
        ) from cause
    prune_checkpoints(run_dir, keep_last)
    return final


class _Sink:
    """The file torch.save writes to, keeping the OS error (disk full, file too large) that torch's
    writer would otherwise report only as an "unexpected pos" failure."""

    def __init__(self, handle):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as exc:
            self.error = exc
            raise


def _remove_stale_temporaries(folder: Path) -> None:
    """Half-written files left by a process killed while writing (never a complete checkpoint)."""
    for stale in temporaries(folder, "step-*.pt"):
        log.warning("removing %s, left by an interrupted checkpoint write", stale)
        stale.unlink(missing_ok=True)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for path in list_checkpoints(run_dir)[:-keep_last]:
        path.unlink(missing_ok=True)
