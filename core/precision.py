"""Precision selection: ``auto`` uses bf16 on CPUs that support it and fp16/bf16 on CUDA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch

from samadapt.errors import InputError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@cache
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
            return not flags or any(f in flags for f in ("avx512_bf16", "amx_bf16", "avx512bf16"))
    except (AttributeError, RuntimeError, OSError):
        return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``auto|bf16|fp16|fp32`` to the concrete precision used on ``device``."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise InputError("fp16 is not supported on the CPU; use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_supports_bf16():
        return "bf16"
    return "fp32"


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast context for a resolved precision (no-op for fp32)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield
