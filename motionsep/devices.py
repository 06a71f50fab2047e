"""Choosing the device and dtype from settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from motionsep.config import Precision
from motionsep.errors import UsageError

if TYPE_CHECKING:
    import torch


def resolve_device(setting: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; others are checked.

    In a process started with several others (``--num-processes``,
    torchrun), ``auto`` and ``cuda`` mean this process's own GPU,
    ``cuda:LOCAL_RANK``.

    Raises:
        UsageError: if the named device is not available here.
    """
    import os

    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    own_gpu = f"cuda:{local_rank}" if local_rank is not None else "cuda"
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device(own_gpu)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(own_gpu if setting == "cuda" else setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"model.device is {setting!r} but this torch has no CUDA device",
            "use --set model.device=cpu, or install a CUDA build of torch",
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"model.device is {setting!r} but MPS is not available", "use cpu")
    return device


def resolve_dtype(setting: Precision | str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on CUDA and MPS, fp32 on the CPU."""
    import torch

    precision = Precision(setting)
    if precision is Precision.AUTO:
        return torch.float16 if device.type in {"cuda", "mps"} else torch.float32
    return {
        Precision.FP32: torch.float32,
        Precision.FP16: torch.float16,
        Precision.BF16: torch.bfloat16,
    }[precision]
