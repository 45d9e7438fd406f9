"""Skipping a non-finite step without reading anything back from the GPU.

Each step computes a 0-d flag on the device (is the loss finite, and without a grad scaler the
clipped gradient norm too); the trainer reduces it over the ranks with the other per-step
decisions (:mod:`clip_med.training.agreement`) and :func:`apply_update_if` applies the update
only where the agreed flag holds, on the device:

* a fused AdamW takes the flag as ``found_inf`` (the mechanism ``GradScaler`` uses): its kernel
  leaves the parameters, moments and step count as they were;
* with fp16's grad scaler, one gradient is multiplied by NaN when the flag is off, so that the
  scaler sees an overflow: it skips the step and lowers the scale, as for any overflow;
* any other optimizer (the CPU's for-loop AdamW) reads the flag on the host: free on the CPU,
  one GPU synchronisation per step on CUDA (hence fused AdamW there).

On the CPU the arithmetic is that of ``finite_flag`` + ``apply_update`` / ``skip_update``:
the same operations in the same order.
"""

from __future__ import annotations

import logging
import math

import torch

from clip_med.modeling.factory import clip_model
from clip_med.training.step import StepParts, finite_flag

log = logging.getLogger(__name__)


def use_fused_optimizer(optimizer: torch.optim.Optimizer, fused: bool) -> bool:
    """Switch an Adam/AdamW to its fused kernel (``fused=True`` as if given at creation), or else to its
    multi-tensor (``foreach``) kernel; call before its first step and again after ``load_state_dict``,
    which brings back the saved groups' setting. Returns whether the optimizer is fused now; any other
    optimizer is left as it is.

    On the CPU torch defaults to a Python loop over the parameters; the foreach kernel gives the same
    result bit for bit (``tests/test_optim.py``) with less per-parameter overhead
    (``benchmarks/optimizer_bench.py``), so a run's numbers do not depend on which one ran. The fused
    kernel is faster still but rounds differently, hence opt-in on the CPU (``trainer.fused_optimizer``)."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        if fused:
            log.warning("%s has no fused kernel: the non-finite check reads a flag from the device every step",
                        type(optimizer).__name__)
        return False
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = (True, False) if fused else (None, True)
    optimizer.defaults["fused"] = bool(fused) or None
    # what GradScaler checks to hand the optimizer its found_inf
    optimizer._step_supports_amp_scaling = bool(fused)
    if fused:
        for param, state in optimizer.state.items():
            if "step" in state:  # the fused kernel keeps its step count beside the parameter, in fp32
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(param.device)
    return bool(fused)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups)


def local_ok(parts: StepParts, loss: torch.Tensor) -> torch.Tensor:
    """This rank's 0-d bool flag: may the step be applied? Without a grad scaler the gradients are
    clipped here (the flag covers the clipped norm); with one, after the ranks agree (fp16 overflows
    are the scaler's business, see :func:`apply_update_if`)."""
    if parts.scaler is not None:
        return torch.isfinite(loss)
    return finite_flag(parts, loss)


def apply_update_if(parts: StepParts, ok: torch.Tensor) -> None:
    """The optimizer step where ``ok`` (a 0-d tensor agreed by every rank, nonzero: apply) holds."""
    if parts.scaler is not None:
        _poison_unless(parts, ok)
        if parts.grad_clip_norm:
            parts.scaler.unscale_(parts.optimizer)
            torch.nn.utils.clip_grad_norm_(parts.raw.parameters(), parts.grad_clip_norm)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    elif is_fused(parts.optimizer):
        optimizer = parts.optimizer
        optimizer.grad_scale, optimizer.found_inf = None, (ok == 0).to(torch.float32)  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
    elif bool(ok):
        parts.optimizer.step()
    else:
        parts.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        clip_model(parts.raw).logit_scale.clamp_(0, math.log(100))


def _poison_unless(parts: StepParts, ok: torch.Tensor) -> None:
    """Make one gradient NaN where ``ok`` is off, so that the grad scaler skips the step (times 1.0 otherwise)."""
    grad = next((param.grad for param in parts.raw.parameters() if param.grad is not None), None)
    if grad is not None:
        grad.mul_(torch.where(ok.to(torch.bool), 1.0, math.nan).to(grad.dtype))
