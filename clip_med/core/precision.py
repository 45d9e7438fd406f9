"""Mixed precision: one autocast context for training, evaluation and inference."""

from __future__ import annotations

import contextlib

import torch


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; a no-op on CPU and for fp32."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()
