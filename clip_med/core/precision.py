"""Mixed precision: one autocast context for training, evaluation and inference."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (CUDA compute capability 8.0 or newer: A100, H100, ...);
    older GPUs (V100, T4) emulate it without tensor cores, several times slower than fp16."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision a run uses: ``auto`` is bf16 where the GPU has it natively, else fp16 (with a grad
    scaler in training) on CUDA, and fp32 on the CPU. Training, evaluation and inference all resolve here."""
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if native_bf16(device) else "fp16"
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: use auto, fp32, bf16 or fp16")
    if requested in ("bf16", "fp16") and device.type != "cuda":
        log.warning("precision=%s asked for on %s: using fp32", requested, device)
        return "fp32"
    if requested == "bf16" and not native_bf16(device):
        log.warning("precision=bf16 on a GPU without native bf16 (compute capability %s) is emulated and slow; "
                    "precision=auto picks fp16 there", ".".join(map(str, torch.cuda.get_device_capability(device))))
    return requested


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; a no-op on CPU and for fp32."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()
