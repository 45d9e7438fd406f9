"""The train state a step-exact resume needs, and how it is gathered into and restored from a checkpoint.

A checkpoint holds the model (for a LoRA run only its trained parameters and buffers), optimizer
and grad-scaler state, the step counters, every rank's RNG state, and every rank's data position:
for each loader worker the raw samples it had read and batches it had delivered in the current
epoch, and which worker's batch was due next. The learning-rate schedule is a pure function of the
step, so it needs no state of its own.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from clip_med.core import distributed
from clip_med.core.counting import merge_counts
from clip_med.data.loader import WorkerPosition, batch_position
from clip_med.modeling.hub import portable_name, portable_pretrained
from clip_med.modeling.lora import checkpoint_extras, trained_state_dict
from clip_med.training.checkpoint import restore_rng_state, rng_state

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    # Per rank, per loader worker: its WorkerPosition (as a dict) in the current epoch.
    positions: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)
    # Per rank: the loader worker whose batch is due next.
    next_worker: dict[int, int] = field(default_factory=dict)
    # Per rank, per worker: data errors met in the current epoch; and those of finished epochs (all ranks).
    epoch_errors: dict[int, dict[int, dict[str, int]]] = field(default_factory=dict)
    errors_before_epoch: dict[str, int] = field(default_factory=dict)
    data_errors: dict[str, int] = field(default_factory=dict)  # all ranks, so far (what logs and reports show)
    nonfinite_skipped: int = 0
    samples_seen: int = 0


class EpochProgress:
    """This rank's data position within an epoch, advanced batch by batch."""

    def __init__(self, workers: int, state: TrainState, rank: int):
        self.streams = max(workers, 1)
        self.positions = {int(w): WorkerPosition(**pos) for w, pos in state.positions.get(rank, {}).items()}
        self.errors = {int(w): dict(counts) for w, counts in state.epoch_errors.get(rank, {}).items()}
        self.next_worker = state.next_worker.get(rank, 0)

    def consumed(self, batch: dict) -> None:
        worker = batch["worker"]
        self.positions[worker] = batch_position(batch)
        self.errors[worker] = dict(batch["errors"])
        self.next_worker = (worker + 1) % self.streams

    def local_errors(self) -> dict[str, int]:
        return merge_counts(*self.errors.values())

    def snapshot(self) -> dict[str, Any]:
        return {"positions": {w: dataclasses.asdict(p) for w, p in self.positions.items()},
                "errors": {w: dict(c) for w, c in self.errors.items()}, "next_worker": self.next_worker}


def epoch_errors_total(state: TrainState, progress: EpochProgress, info: distributed.DistInfo) -> dict[str, int]:
    """Data errors of all ranks so far (one small CPU exchange)."""
    per_rank = distributed.all_gather_object(progress.local_errors(), info)
    return merge_counts(state.errors_before_epoch, *per_rank)


def gather_into_state(state: TrainState, progress: Optional[EpochProgress], info: distributed.DistInfo) -> list:
    """Every rank's data position (and RNG state, returned) into ``state``, ready for rank 0 to save."""
    snapshot = progress.snapshot() if progress is not None else {"positions": {}, "errors": {}, "next_worker": 0}
    gathered = distributed.all_gather_object({**snapshot, "rng": rng_state()}, info)
    state.positions = {rank: part["positions"] for rank, part in enumerate(gathered)}
    state.epoch_errors = {rank: part["errors"] for rank, part in enumerate(gathered)}
    state.next_worker = {rank: part["next_worker"] for rank, part in enumerate(gathered)}
    return [part["rng"] for part in gathered]


def checkpoint_payload(model: torch.nn.Module, optimizer, scaler, state: TrainState, rngs: list, meta: dict) -> dict:
    """The checkpoint's content; a LoRA model's holds only what trains (its base weights come from model.pretrained)."""
    return {
        "state_dict": trained_state_dict(model),
        **checkpoint_extras(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "train_state": dataclasses.asdict(state),
        "rng": rngs[0],
        "rng_per_rank": rngs,
        **meta,
        **_portable_config(meta),
    }


def _portable_config(meta: dict) -> dict:
    """The model's name and ``config`` with a local folder (``local-dir:``) or model.pretrained's local file by
    its absolute path: the model (a LoRA checkpoint's base weights too) is read from it again when the checkpoint
    is loaded, from whatever working directory."""
    portable: dict = {}
    if meta.get("model_name"):
        portable["model_name"] = portable_name(meta["model_name"])
    model = (meta.get("config") or {}).get("model")
    if not model:
        return portable
    pretrained = portable_pretrained(model["name"], model["pretrained"]) if model.get("pretrained") else None
    portable["config"] = {**meta["config"], "model": {**model, "name": portable_name(model["name"]),
                                                      "pretrained": pretrained or model.get("pretrained")}}
    return portable


def _int_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {(int(key) if isinstance(key, str) and key.isdigit() else key): _int_keys(item)
                for key, item in value.items()}
    return value


def restore_train_state(checkpoint: dict[str, Any], layout: dict[str, Any], info: distributed.DistInfo) -> TrainState:
    """The saved TrainState, restarted at its epoch's beginning when the data layout changed."""
    saved = dict(checkpoint["train_state"])
    if "batches_done" in saved:  # checkpoints written before positions were recorded per sample
        saved["positions"] = {rank: {w: {"samples": n * layout["batch_size"], "batches": n} for w, n in done.items()}
                              for rank, done in saved.pop("batches_done").items()}
    state = TrainState(**{key: _int_keys(value) for key, value in saved.items()})
    rngs = checkpoint.get("rng_per_rank") or [checkpoint["rng"]]
    restore_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
    before = {key: checkpoint.get(key) for key in layout}
    if before != layout and state.epoch_step:
        log.warning("checkpoint was written with data layout %s, this run has %s: epoch %d restarts from its "
                    "beginning (its first %d steps are trained again)", before, layout, state.epoch + 1,
                    state.epoch_step)
        consumed = sum(position.get("batches", 0) for workers in state.positions.values()
                       for position in workers.values())
        state.samples_seen -= consumed * (before.get("batch_size") or 0)
        state.step -= state.epoch_step
        state.epoch_step = 0
        state.positions, state.next_worker, state.epoch_errors = {}, {}, {}
    return state
