"""Where computations run: the device, bfloat16 mixed precision, and the autocast around a step."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)



def use_amp(amp: bool | None, device: torch.device) -> bool:
    """Whether to train under bfloat16 autocast: ``amp``, or by default (``None``) on CUDA GPUs that have bfloat16."""
    bfloat16_gpu = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if amp is None:
        return bfloat16_gpu
    if amp and device.type == "cuda" and not bfloat16_gpu:
        log.warning("this GPU has no bfloat16 (before Ampere): training in float32")
        return False
    if amp and device.type not in ("cuda", "cpu"):
        log.warning("mixed precision is not supported on %s; training in float32", device)
        return False
    if amp and device.type == "cpu":
        log.warning("mixed precision on CPU: bfloat16 autocast as on CUDA, but usually slower than float32 here")
    return bool(amp)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast (no loss scaling needed: bfloat16 has float32's exponent range)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
