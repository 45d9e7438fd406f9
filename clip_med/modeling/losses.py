"""Contrastive losses: open_clip's own, chosen by name.

Every loss takes the model's features dict (``loss(**model(images, texts), output_dict=True)``)
and returns a dict of named terms whose sum is the training loss, so the training loop never
needs to know which loss it runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, cast

import open_clip
import torch

log = logging.getLogger(__name__)


@dataclass
class LossConfig:
    name: str = "clip"  # clip | siglip
    # Distributed options (open_clip's; no effect in one process). local_loss: each process
    # computes the loss of its own rows against the global batch (less memory and compute than
    # the full global logit matrix). gather_with_grad: features gathered from the other processes
    # carry gradients, so that, after DDP averages, the gradients are exactly those of one
    # process training on the global batch; without it they are 1/world_size of that.
    local_loss: bool = True
    gather_with_grad: bool = True
    # SigLIP's feature exchange: bidir | shift | reduce | gather (open_clip's default: bidir).
    siglip_dist_impl: Optional[str] = None


def _clip(cfg: LossConfig, rank: int, world_size: int) -> torch.nn.Module:
    if world_size > 1 and not cfg.gather_with_grad:
        log.warning("loss.gather_with_grad=false: gradients do not flow through the features gathered from "
                    "other processes, so they are not those of the global batch (%s)",
                    "and local_loss=true drops the other processes' terms" if cfg.local_loss else
                    f"they are 1/{world_size} of it")
    return open_clip.ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                              cache_labels=True, rank=rank, world_size=world_size)


def _siglip(cfg: LossConfig, rank: int, world_size: int) -> torch.nn.Module:
    return open_clip.loss.SigLipLoss(rank=rank, world_size=world_size, dist_impl=cfg.siglip_dist_impl)


LOSSES = {"clip": _clip, "siglip": _siglip}

# What each loss needs from the model at creation (SigLIP: a learnable bias, scale 10, bias -10,
# as in the SigLIP paper and open_clip's SigLIP configs).
MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "clip": {},
    "siglip": {"init_logit_scale": math.log(10), "init_logit_bias": -10.0},
}


def create_loss(cfg: LossConfig, rank: int = 0, world_size: int = 1) -> torch.nn.Module:
    try:
        factory = LOSSES[cfg.name]
    except KeyError:
        raise ValueError(f"unknown loss {cfg.name!r}; choose one of {', '.join(LOSSES)}") from None
    return factory(cfg, rank, world_size)


def model_kwargs_for(cfg: LossConfig) -> dict[str, Any]:
    return dict(MODEL_KWARGS[cfg.name])


def fp32_loss(loss_fn: torch.nn.Module, features: dict[str, Any]) -> torch.Tensor:
    """The total loss of the model's ``features`` computed in fp32, outside autocast: the logits (a
    scale of up to 100 times cosine similarities) and their softmax or sigmoid keep fp32's precision
    when the towers ran in bf16/fp16. With fp32 features and no autocast, the same operations as
    calling ``loss_fn`` directly."""
    as_fp32 = {key: value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
               for key, value in features.items()}
    device = next((value.device for value in as_fp32.values() if isinstance(value, torch.Tensor)), None)
    off = torch.autocast(device.type, enabled=False) if device is not None and device.type == "cuda" \
        else contextlib.nullcontext()
    with off:
        return total_loss(loss_fn(**as_fp32, output_dict=True))


def total_loss(terms: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    # sum() of tensors is a tensor (its int start 0 only shows for an empty dict).
    return cast(torch.Tensor, sum(terms.values())) if isinstance(terms, dict) else terms
