"""Torch devices and dtypes as users name them: checked up front, with one clear error each."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import ArgumentError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_dtype(dtype: "torch.dtype | str | None") -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if not isinstance(dtype, str) or dtype not in names:
        raise ArgumentError(f"dtype {dtype!r} is not supported; use one of {', '.join(names)}")
    return names[dtype]


def check_device(device: "torch.device | str") -> torch.device:
    """``device`` as a torch.device that exists on this machine, or an ArgumentError saying what to pass."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ArgumentError(f"device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu" or dev.type == "meta":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"device {str(device)!r} was requested but CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use device='cpu' (--device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ArgumentError(f"device {str(device)!r} was requested but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s); use cuda:0 .. "
                             f"cuda:{torch.cuda.device_count() - 1}")
        return dev
    # mps, xpu, ...: checked where torch has an is_available for it; plugin devices pass through.
    is_available = getattr(getattr(torch, dev.type, None), "is_available", None)
    if is_available is not None and not is_available():
        raise ArgumentError(f"device {str(device)!r} was requested but {dev.type} is not available on this machine; "
                         f"use device='cpu'")
    return dev
