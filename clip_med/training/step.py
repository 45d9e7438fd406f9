"""One optimizer step: forward and backward over one or more micro-batches, then the update.

Gradient accumulation keeps the full contrastive batch, as open_clip_train's ``accum_freq``
does: the features of all ``accum_freq`` micro-batches are first computed without gradients;
then each micro-batch is run again with gradients and its loss is computed against the cached
features of the others, so every loss sees the whole batch of negatives, and the summed
gradients are those of one big batch. Unlike open_clip, the temperature (and SigLIP's bias)
take their gradient from one of the passes only, so that its gradient is not counted
``accum_freq`` times; with DDP the gradient all-reduce runs once, on the last pass.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from clip_med.core.precision import PRECISIONS as PRECISIONS  # re-exported
from clip_med.core.precision import autocast_context
from clip_med.core.precision import resolve_precision as resolve_precision  # re-exported
from clip_med.modeling.factory import clip_model
from clip_med.modeling.losses import fp32_loss

log = logging.getLogger(__name__)

_SCALARS = ("logit_scale", "logit_bias")


def create_grad_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """fp16 needs loss scaling; bf16 has fp32's range and does not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


@dataclass
class StepParts:
    """What a training step touches."""

    model: Any  # what is called: the model, its DDP wrapper, or a compiled version of either
    raw: torch.nn.Module  # the bare open_clip model (state_dict, logit_scale)
    ddp: Optional[DistributedDataParallel]
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    precision: str
    device: torch.device
    grad_clip_norm: Optional[float] = None
    # Finishes uint8 images on the device (clip_med.data.transforms.Normalizer); float images pass as they are.
    normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def _inputs(parts: StepParts, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    images = batch["images"].to(parts.device, non_blocking=True)
    if images.dtype == torch.uint8:
        if parts.normalize is None:
            raise ValueError("uint8 images need StepParts.normalize (the Normalizer split off the transform)")
        images = parts.normalize(images)
    return images, batch["texts"].to(parts.device, non_blocking=True)


def _backward(loss: torch.Tensor, scaler: Optional[torch.amp.GradScaler]) -> None:
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


def forward_backward(parts: StepParts, micro_batches: list[dict]) -> torch.Tensor:
    """Gradients of the loss over all ``micro_batches`` as one contrastive batch; returns the loss (detached)."""
    parts.optimizer.zero_grad(set_to_none=True)
    if len(micro_batches) == 1:
        images, texts = _inputs(parts, micro_batches[0])
        with autocast_context(parts.device, parts.precision):
            features = parts.model(images, texts)
        loss = fp32_loss(parts.loss_fn, features)
        _backward(loss, parts.scaler)
        return loss.detach()
    return _accumulated(parts, [_inputs(parts, batch) for batch in micro_batches])


def _cached_features(parts: StepParts, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, list]:
    cached: dict[str, list] = {}
    with torch.no_grad(), autocast_context(parts.device, parts.precision):
        for images, texts in inputs:
            for key, value in parts.model(images, texts).items():
                if key not in _SCALARS:
                    cached.setdefault(key, []).append(value)
    return cached


def _accumulated(parts: StepParts, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    cached = _cached_features(parts, inputs)
    last = len(inputs) - 1
    loss = None
    for j, (images, texts) in enumerate(inputs):
        # Only the last pass syncs gradients across ranks; it also carries the temperature's gradient
        # (DDP expects every parameter in the graph of the pass that syncs).
        sync = contextlib.nullcontext() if parts.ddp is None or j == last else parts.ddp.no_sync()
        with sync:
            with autocast_context(parts.device, parts.precision):
                out = parts.model(images, texts)
                scalars = {key: out.pop(key) for key in _SCALARS if key in out}
                if j != last:
                    scalars = {key: value.detach() for key, value in scalars.items()}
                features = {key: torch.cat(chunks[:j] + [out[key]] + chunks[j + 1:]) for key, chunks in cached.items()}
            loss = fp32_loss(parts.loss_fn, {**features, **scalars})
        _backward(loss, parts.scaler)
    assert loss is not None  # forward_backward passes two or more micro-batches here
    return loss.detach()


def finite_flag(parts: StepParts, loss: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: may this step be applied? (Unscales fp16 gradients and clips as a side effect.)

    The loss must be finite; without a grad scaler the clipped gradient norm must be too (with
    fp16, overflowing gradients are the scaler's business: it skips the step and lowers the scale).
    """
    flag = torch.isfinite(loss)
    if parts.grad_clip_norm:
        if parts.scaler is not None:
            parts.scaler.unscale_(parts.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(parts.raw.parameters(), parts.grad_clip_norm)
        if parts.scaler is None:
            flag = flag & torch.isfinite(norm)
    return flag


def apply_update(parts: StepParts) -> None:
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        parts.optimizer.step()
    with torch.no_grad():
        clip_model(parts.raw).logit_scale.clamp_(0, math.log(100))


def skip_update(parts: StepParts) -> None:
    """Drop this step's gradients (a non-finite loss); with fp16, lower the loss scale as an overflow would."""
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.scaler is not None:
        parts.scaler.update(parts.scaler.get_scale() * parts.scaler.get_backoff_factor())
