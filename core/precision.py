"""Precision: fp32, bf16/fp16 autocast of the image encoder, and ``auto``.

A :class:`PrecisionPlan` names the parts of the image encoder that run under autocast: none (``fp32``),
all of it (``bf16``, ``fp16``) or some submodules (``bf16-partial``: forward hooks put just those
modules under bf16 autocast while the predictor encodes; their outputs come back as float32, so the
rest of the network runs in fp32). The decoder always runs in fp32; no plan touches the state dict.

``auto`` picks the fastest plan that keeps fp32 quality on the machine at hand; see
:mod:`samadapt.autoprecision` for the rule, the micro-benchmark and its cache.
"""

from __future__ import annotations

import contextlib
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samadapt.errors import InputError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16-partial": torch.bfloat16}
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx512bf16")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else what ``platform`` knows)."""
    match = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    if match:
        return match.group(1).strip()
    return platform.processor() or platform.machine() or "unknown CPU"


@cache
def cpu_features() -> tuple[str, ...]:
    """The CPU flags that decide bf16 speed (AVX-512, AVX-512 BF16, AMX), as /proc/cpuinfo spells them."""
    match = re.search(r"^flags\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
    return tuple(f for f in wanted if f in flags)


@cache
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            flags = _cpuinfo()
            return not flags or any(f in flags for f in _BF16_FLAGS)
    except (AttributeError, RuntimeError, OSError):
        return False
    return False


@dataclass(frozen=True)
class PrecisionPlan:
    """Which parts of the image encoder run in a lower precision.

    Attributes:
        precision: ``fp32``, ``bf16`` or ``fp16`` (the whole encoder under autocast), or
            ``bf16-partial`` (only ``modules`` under bf16 autocast).
        modules: for ``bf16-partial``, names of submodules of the model (``model.get_submodule``).
        parts: the planned parts in words (``the MLPs of stages 1-3``).
        reason: why this plan was chosen (``auto``) or ``requested``.
        propagation_safe: whether the plan also holds for volume propagation, where each slice's prompt
            comes from the previous slice's mask, so a small change in one embedding can move where the
            object is found to end. False: propagation runs fp32 (see :meth:`for_propagation`).
        propagation_reason: why propagation runs fp32 when ``propagation_safe`` is False.
    """

    precision: str
    modules: tuple[str, ...] = ()
    parts: str = ""
    reason: str = "requested"
    propagation_safe: bool = True
    propagation_reason: str = ""

    def for_propagation(self) -> PrecisionPlan:
        """The plan volume propagation runs: this one, or fp32 when it is not checked for propagation."""
        if self.propagation_safe:
            return self
        return PrecisionPlan("fp32", reason=self.propagation_reason or "not checked for propagation")

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return _DTYPES.get(self.precision)

    @property
    def partial(self) -> bool:
        return self.precision == "bf16-partial"

    def describe(self) -> str:
        """One line: what runs at which precision."""
        if self.precision == "fp32":
            return "fp32"
        if self.partial:
            return f"bf16 in {self.parts or ', '.join(self.modules)}; fp32 elsewhere"
        return f"{self.precision} autocast over the whole image encoder"

    @contextlib.contextmanager
    def applied(self, model: nn.Module, device: torch.device) -> Iterator[None]:
        """Run ``model``'s encoder under this plan inside the block (no-op for fp32)."""
        dtype = self.dtype
        if dtype is None:
            yield
        elif self.partial:
            with autocast_modules(model, self.modules, device, dtype):
                yield
        else:
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield


def _to_float32(value: Any) -> Any:
    """Low-precision floating tensors (also inside tuples/lists) -> float32; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if type(value) in (tuple, list):
        return type(value)(_to_float32(v) for v in value)
    return value


@contextlib.contextmanager
def autocast_modules(
    model: nn.Module, names: tuple[str, ...] | list[str], device: torch.device, dtype: torch.dtype
) -> Iterator[None]:
    """Inside the block, each named submodule of ``model`` runs under ``dtype`` autocast.

    A forward pre-hook enters autocast and a forward hook leaves it and casts the module's floating
    outputs back to float32; the hooks are removed on leaving the block. Nothing else changes: the
    parameters stay float32 and the state dict is untouched.
    """
    handles = []
    try:
        for name in names:
            module = model.get_submodule(name)
            contexts: list[torch.autocast] = []

            def enter(_module: nn.Module, _args: Any, contexts: list[torch.autocast] = contexts) -> None:
                context = torch.autocast(device_type=device.type, dtype=dtype)
                context.__enter__()
                contexts.append(context)

            def leave(
                _module: nn.Module, _args: Any, output: Any, contexts: list[torch.autocast] = contexts
            ) -> Any:
                if contexts:
                    contexts.pop().__exit__(None, None, None)
                return _to_float32(output)

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def plan_precision(precision: str, device: torch.device, model: nn.Module | None = None) -> PrecisionPlan:
    """The plan for ``auto|bf16|fp16|fp32`` on ``device``.

    ``auto`` needs the model (its variant names the quality-checked plan, and the micro-benchmark
    times it); without one it decides for the default variant, LiteMedSAM.
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise InputError("fp16 is not supported on the CPU; use bf16 or fp32")
    if precision != "auto":
        return PrecisionPlan(precision)
    from samadapt.autoprecision import auto_plan

    return auto_plan(device, model)


def resolve_precision(precision: str, device: torch.device, model: nn.Module | None = None) -> str:
    """Map ``auto|bf16|fp16|fp32`` to the precision used on ``device`` (``bf16-partial`` for a plan)."""
    return plan_precision(precision, device, model).precision


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast context over everything inside for a whole-network precision (no-op for fp32)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield
