"""Devices, dtypes and timing shared by the commands that run models (benchmarks,
generation, evaluation)."""

from __future__ import annotations

import time
from typing import Callable

import torch

from mixtrain.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """'auto' (the GPU when there is one), 'cuda', 'cuda:1' or 'cpu'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"device {name!r} is not a device name; use auto, cuda or cpu") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: no GPU is visible here; use cpu (or auto)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' (bf16 on GPU, fp32 elsewhere), 'bf16', 'fp16' or 'fp32'."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not known; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn: Callable[[], object], device: torch.device, steps: int = 1, warmup: int = 0) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls (GPU work included)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / max(1, steps)
