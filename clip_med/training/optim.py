"""AdamW with open_clip's weight-decay grouping, and open_clip's learning-rate schedules.

``optim.lr_image`` / ``optim.lr_text`` give a tower its own learning rate (its LoRA adapters
included); the temperature and anything else outside the towers keep ``optim.lr``. Each rate gets
its own pair of parameter groups (with and without weight decay), and the schedule scales each
group from its own base rate, so the ratio between the towers holds at every step. Without them
there are exactly open_clip's two groups and one schedule, as before. A resume whose per-tower
settings would give other groups than the checkpoint's is refused in one line (:func:`check_same_groups`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional, cast

import torch
from open_clip_train.scheduler import const_lr, cosine_lr

from clip_med.core.bounds import bounded
from clip_med.modeling.lora import parameter_tower


@dataclass
class OptimConfig:
    lr: float = bounded(2e-3, above=0)
    # The image and text towers' own learning rates (None: lr), e.g. a smaller one for a pretrained tower.
    lr_image: Optional[float] = bounded(None, above=0)
    lr_text: Optional[float] = bounded(None, above=0)
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


# The OptimConfig field that sets each tower's base learning rate.
_TOWER_LR = {"image": "lr_image", "text": "lr_text"}


def _lr_field(cfg: OptimConfig, tower: str) -> str:
    field_name = _TOWER_LR.get(tower, "lr")
    return field_name if getattr(cfg, field_name, None) is not None else "lr"


def base_lr(cfg: OptimConfig, group: dict) -> float:
    """The base learning rate of a parameter group (groups of older checkpoints have no ``lr_field``: lr)."""
    return float(getattr(cfg, group.get("lr_field", "lr")) or cfg.lr)


def create_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    groups = []
    for field_name in ("lr", *_TOWER_LR.values()):
        own = [(n, p) for n, p in named if _lr_field(cfg, parameter_tower(n)) == field_name]
        if field_name != "lr" and not own:
            continue
        lr = getattr(cfg, field_name)
        groups += [
            {"params": [p for n, p in own if _no_decay(n, p)], "weight_decay": 0.0, "lr": lr, "lr_field": field_name},
            {"params": [p for n, p in own if not _no_decay(n, p)], "weight_decay": cfg.weight_decay, "lr": lr,
             "lr_field": field_name},
        ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cast("tuple[float, float]", tuple(cfg.betas)),
                                  eps=cfg.eps)
    # A resume restores the optimizer with load_state_dict: its groups must be the checkpoint's.
    optimizer.register_load_state_dict_pre_hook(check_same_groups)
    return optimizer


def _rate_fields(groups: list[dict]) -> list[str]:
    return [group.get("lr_field", "lr") for group in groups]


def check_same_groups(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Refuse, in one line, a saved optimizer state whose per-tower learning-rate groups are not this optimizer's
    (torch's own error names neither the settings nor the fix)."""
    before, now = _rate_fields(saved["param_groups"]), _rate_fields(optimizer.param_groups)
    if before == now:
        _check_same_sizes(optimizer, saved)
        return
    differing = sorted(set(before) ^ set(now))  # each rate's groups come in one order, always two

    def own_rate(fields: list[str], name: str) -> str:
        return "its own learning rate" if name in fields else "none"

    settings = "; ".join(f"optim.{name}: checkpoint {own_rate(before, name)}, this run {own_rate(now, name)}"
                         for name in differing)
    raise ValueError(
        "cannot resume: the checkpoint's optimizer has other per-tower learning-rate groups than this run's "
        f"({settings}). Resume with the optim.lr_image / optim.lr_text values the checkpoint was trained with, "
        "or start a new run from its weights without resume=: model.pretrained=<the checkpoint> (a LoRA or hf-hub: "
        "model: export it with python -m clip_med.export, then model=local-dir:<the export folder>)")


def _check_same_sizes(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Refuse, in one line, a saved optimizer state that trained other tensors than this run trains (another
    lock_* setting, say), where torch only says that a group "doesn't match the size of optimizer's group"."""
    before = [len(group["params"]) for group in saved["param_groups"]]
    now = [len(group["params"]) for group in optimizer.param_groups]
    if before == now:
        return
    raise ValueError(
        f"cannot resume: the checkpoint's optimizer trained {sum(before)} tensors, this run trains {sum(now)} "
        f"(per parameter group: checkpoint {before}, this run {now}). Resume with the model settings the checkpoint "
        "was trained with (model.lock_image, model.lock_image_unlocked_groups, model.lock_text, "
        "model.lock_text_unlocked_layers, model.lora.*: the checkpoint's \"config\" holds them, and so does a "
        "command-line run's <run>/.hydra/config.yaml), "
        "or start a new run from its weights without resume=: model.pretrained=<the checkpoint>")


SCHEDULES = {"cosine": cosine_lr, "const": const_lr}


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    steps = int(cfg.warmup) if cfg.warmup >= 1 else int(round(cfg.warmup * total_steps))
    return max(1, min(steps, max(total_steps - 1, 1)))


class _GroupsOf:
    """The optimizer's groups with one base rate, as open_clip's schedules see an optimizer (they set
    ``param_groups[i]["lr"]``); looked up at each step, so a later ``load_state_dict`` is followed."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, lr: float):
        self.optimizer, self.cfg, self.lr = optimizer, cfg, lr

    @property
    def param_groups(self) -> list[dict]:
        return [group for group in self.optimizer.param_groups if base_lr(self.cfg, group) == self.lr]


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """A function of the global step that sets every group's learning rate and returns optim.lr's (stateless:
    resume needs only the step)."""
    try:
        schedule = SCHEDULES[cfg.schedule]
    except KeyError:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}") from None
    rates = list(dict.fromkeys([cfg.lr] + [base_lr(cfg, group) for group in optimizer.param_groups]))
    adjusters = [schedule(_GroupsOf(optimizer, cfg, lr), lr, warmup_steps(cfg, total_steps), max(total_steps, 2))
                 for lr in rates]

    def adjust(step: int) -> float:
        return [adjuster(step) for adjuster in adjusters][0]

    return adjust
