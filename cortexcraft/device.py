"""Device and precision selection: cuda > mps > cpu, and the autocast dtype each supports."""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Optional

import torch

from cortexcraft.errors import CortexCraftError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise CortexCraftError("device cuda requested but torch sees no CUDA GPU; use --set device=auto or cpu")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise CortexCraftError("device mps requested but MPS is not available; use --set device=auto or cpu")
    return torch.device(name)


def select_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The autocast dtype: bf16 on GPUs that have it, fp16 on older GPUs, else fp32.

    CPUs stay fp32 unless asked: even with AVX-512 BF16 here, bf16 autocast was no faster for our
    small models and converged worse per step (measured for the cpu preset)."""
    if name != "auto":
        dtype = _DTYPES[name]
        if device.type == "cpu" and dtype == torch.float16:
            raise CortexCraftError("dtype float16 is not supported on CPU; use --set dtype=bfloat16 or float32")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> ContextManager:
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def grad_scaler(device: torch.device, dtype: torch.dtype) -> Optional[torch.amp.GradScaler]:
    """fp16 needs loss scaling to keep small gradients from underflowing; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
