"""AdamW with open_clip's weight-decay grouping, and open_clip's learning-rate schedules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional, cast

import torch
from open_clip_train.scheduler import const_lr, cosine_lr

from clip_med.core.bounds import bounded


@dataclass
class OptimConfig:
    lr: float = bounded(2e-3, above=0)
    weight_decay: float = bounded(0.1, minimum=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = bounded(1e-6, above=0)
    # Warm-up length: steps if >= 1, else a fraction of all training steps.
    warmup: float = bounded(0.1, minimum=0)
    schedule: str = "cosine"  # cosine | const
    grad_clip_norm: Optional[float] = bounded(1.0, above=0)


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # open_clip_train's rule: gains, biases, norms and the temperature get no weight decay.
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def create_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    groups = [
        {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cast("tuple[float, float]", tuple(cfg.betas)), eps=cfg.eps)


SCHEDULES = {"cosine": cosine_lr, "const": const_lr}


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    steps = int(cfg.warmup) if cfg.warmup >= 1 else int(round(cfg.warmup * total_steps))
    return max(1, min(steps, max(total_steps - 1, 1)))


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """A function of the global step that sets and returns the learning rate (stateless: resume needs only the step)."""
    try:
        schedule = SCHEDULES[cfg.schedule]
    except KeyError:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}") from None
    return schedule(optimizer, cfg.lr, warmup_steps(cfg, total_steps), max(total_steps, 2))
