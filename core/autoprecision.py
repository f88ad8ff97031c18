"""What ``--precision auto`` runs: the fastest plan that keeps fp32 quality on the machine at hand.

bf16 is not free. Rounding the encoder's residual stream (or its input: bf16 keeps 8 significant bits,
so pixel values of [0, 1] images move by up to half a grey level) moves LiteMedSAM's masks by up to
0.1-0.2 Dice on single organs, and on some CPUs bf16 is no faster than fp32 at all. So ``auto``:

1. takes the quality-checked plan of the model's variant (:data:`PLANS`): the parts of the encoder
   that may run in bf16 without moving the masks (for LiteMedSAM the attention and MLP branches of
   TinyViT stages 1-3; the residual stream, the patch embedding, stage 0, the local convolutions,
   the patch merging and the neck stay fp32). A variant without one runs fp32;
2. on a device with fast bf16 (a CPU with AVX-512 BF16 or AMX, a CUDA GPU with bf16), measures once
   how much faster the encoder is with the plan than at fp32 (:func:`measure_speedup`, about a second)
   and caches the number per machine, torch version, thread count, variant and plan in
   ``$SAMADAPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/samadapt``, else ``~/.cache/samadapt``
   (``precision.json``; a measurement taken while other processes kept this one off the CPU is used
   but not cached);
3. uses the plan when it is at least :data:`MIN_SPEEDUP` times faster, fp32 otherwise;
4. volume propagation (each slice prompted by the previous slice's mask) amplifies small changes, so
   a plan runs there only when it was also checked on propagated masks
   (:attr:`QualityPlan.propagation_evidence`); otherwise propagation embeds its slices at fp32.

``$SAMADAPT_BF16_SPEEDUP`` overrides step 2: a number is taken as the measured speed-up (nothing is
timed or cached), ``off`` makes ``auto`` fp32.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from samadapt.errors import InputError
from samadapt.precision import PrecisionPlan, autocast_modules, cpu_features, cpu_model, cpu_supports_bf16

MIN_SPEEDUP = 1.2
# A CPU measurement during which this process got less than this share of its threads' time (other
# processes were running) is used once but not cached: it is measured again next time.
MIN_CPU_SHARE = 0.6
ENV_SPEEDUP = "SAMADAPT_BF16_SPEEDUP"
ENV_CACHE_DIR = "SAMADAPT_CACHE_DIR"
CACHE_NAME = "precision.json"
_OFF = ("off", "0", "no", "false", "none")
PROPAGATION_FP32_REASON = (
    "volume propagation runs fp32 at auto: the bf16 plan keeps single-slice masks, but on the organ "
    "table it moved where propagation stopped (one organ -0.25 Dice; benchmarks/precision_quality.py)"
)


@dataclass(frozen=True)
class QualityPlan:
    """Encoder parts of one variant that run in bf16 without moving its masks.

    Attributes:
        name: short id (part of the cache key).
        patterns: regular expressions, each matched in full against module names of the model.
        parts: the parts in words.
        evidence: how quality was checked.
    """

    name: str
    patterns: tuple[str, ...]
    parts: str
    evidence: str
    propagation_evidence: str | None = None
    """How the plan was checked on volume propagation; None: it moved propagated masks (or was not
    checked), so propagation runs fp32 at ``auto``."""

    def modules(self, model: nn.Module) -> tuple[str, ...]:
        """Names of the model's modules this plan puts under bf16 (outermost matches only)."""
        found: list[str] = []
        for name, _ in model.named_modules():
            if any(re.fullmatch(p, name) for p in self.patterns) and not any(
                name.startswith(f + ".") for f in found
            ):
                found.append(name)
        return tuple(found)


PLANS: dict[str, QualityPlan] = {
    "lite_medsam": QualityPlan(
        name="tinyvit-s123-attn-mlp",
        patterns=(r"image_encoder\.layers\.[123]\.blocks\.\d+\.(attn|mlp)",),
        parts="the attention and MLP branches of TinyViT stages 1-3",
        evidence="sam_med2d (30 masks): mean Dice -0.0013, no mask more than 0.024 lower",
        # benchmarks/precision_quality.py, organ table (87 organs, --stop auto): mean Dice -0.0019 but
        # mr/duodenum -0.25 and ct/duodenum -0.057: a slightly different slice embedding moved where
        # propagation stopped. Not propagation-safe.
        propagation_evidence=None,
    ),
}


def cache_dir() -> Path:
    """``$SAMADAPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/samadapt``, else ``~/.cache/samadapt``."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "samadapt"
    return Path.home() / ".cache" / "samadapt"


def cache_file() -> Path:
    return cache_dir() / CACHE_NAME


def device_name(device: torch.device) -> str:
    """The processor that runs the encoder: the CPU model (with its bf16-relevant flags) or the GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    features = "+".join(cpu_features()) or "no-avx"
    return f"{cpu_model()} [{features}]"


def cache_key(device: torch.device, variant: str, plan: QualityPlan) -> str:
    """Machine, torch version, threads, variant and plan: what the measured speed-up depends on."""
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{device_name(device)} | torch {torch.__version__} | {threads} threads | {variant} | {plan.name}"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> bool:
    """Add ``entry`` under ``key`` (atomic replace); False when the cache is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = entry
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
        os.replace(handle.name, path)
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_speedup(
    model: nn.Module, modules: tuple[str, ...], device: torch.device, repeats: int = 2
) -> float:
    """How many times faster the model's encoder runs with ``modules`` under bf16 than at fp32.

    Cheap (about 2.5 fp32 encoder passes): one untimed fp32 pass records each planned module's inputs,
    a second times the whole encoder and each planned module in it. Then one module per distinct kind
    (class and input shapes) runs alone at fp32 and under bf16 (best of ``repeats``), and its ratio
    scales the fp32 time of all modules of that kind. The encoder runs as the predictor runs it:
    inference mode, eval mode, channels-last input.
    """
    side = int(cast(Any, model).profile.input_size)
    x = torch.rand(1, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
    named = [(name, model.get_submodule(name)) for name in modules]
    inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    spent: dict[str, float] = dict.fromkeys(modules, 0.0)
    started: dict[str, float] = {}
    was_training = model.training
    model.eval()
    handles = []
    try:
        with torch.inference_mode():
            for name, module in named:
                handles.append(
                    module.register_forward_pre_hook(
                        lambda _m, args, kwargs, name=name: inputs.setdefault(name, (args, kwargs)) and None,
                        with_kwargs=True,
                    )
                )
            encode = cast(Any, model).encode
            encode(x)
            for handle in handles:
                handle.remove()
            handles = []

            def start(_m: nn.Module, _args: Any, name: str) -> None:
                _sync(device)
                started[name] = time.perf_counter()

            def stop(_m: nn.Module, _args: Any, _out: Any, name: str) -> None:
                _sync(device)
                spent[name] += time.perf_counter() - started[name]

            for name, module in named:
                handles.append(module.register_forward_pre_hook(lambda m, a, name=name: start(m, a, name)))
                handles.append(module.register_forward_hook(lambda m, a, o, name=name: stop(m, a, o, name)))
            total = _best_time(lambda: encode(x), device, 1)
            for handle in handles:
                handle.remove()
            handles = []

            kinds: dict[tuple[Any, ...], list[str]] = {}
            for name, module in named:
                args, kwargs = inputs[name]
                shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
                kinds.setdefault((type(module), shapes), []).append(name)
            planned = 0.0
            for names in kinds.values():
                module = model.get_submodule(names[0])
                args, kwargs = inputs[names[0]]

                def call(module: nn.Module = module, args: Any = args, kwargs: Any = kwargs) -> object:
                    return module(*args, **kwargs)

                with autocast_modules(model, names[:1], device, torch.bfloat16):
                    call()  # warm-up: oneDNN creates its bf16 kernels on first use
                fp32_time = bf16_time = float("inf")
                for _ in range(repeats):
                    fp32_time = min(fp32_time, _best_time(call, device, 1))
                    with autocast_modules(model, names[:1], device, torch.bfloat16):
                        bf16_time = min(bf16_time, _best_time(call, device, 1))
                planned += sum(spent[n] for n in names) * bf16_time / fp32_time
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total / max(total - sum(spent.values()) + planned, 1e-9)


def measured_speedup(
    model: nn.Module, variant: str, plan: QualityPlan, device: torch.device
) -> tuple[float | None, str]:
    """(speed-up of ``plan`` over fp32, where the number comes from); None when bf16 is switched off.

    Order: ``$SAMADAPT_BF16_SPEEDUP``, the cache, a fresh measurement (then cached).
    """
    override = os.environ.get(ENV_SPEEDUP, "").strip()
    if override:
        if override.lower() in _OFF:
            return None, f"${ENV_SPEEDUP}={override}"
        try:
            return float(override), f"${ENV_SPEEDUP}"
        except ValueError:
            raise InputError(f"${ENV_SPEEDUP} must be a number or 'off', got {override!r}") from None
    path = cache_file()
    key = cache_key(device, variant, plan)
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("speedup"), int | float):
        return float(entry["speedup"]), f"measured once, cached in {path}"
    start, cpu_start = time.perf_counter(), time.process_time()
    speedup = measure_speedup(model, plan.modules(model), device)
    seconds = time.perf_counter() - start
    share = (time.process_time() - cpu_start) / max(seconds * torch.get_num_threads(), 1e-9)
    if device.type == "cpu" and share < MIN_CPU_SHARE:
        return speedup, (
            f"measured now on a busy machine ({share:.0%} of {torch.get_num_threads()} threads' time), "
            "not cached"
        )
    entry = {
        "speedup": round(speedup, 4),
        "seconds": round(seconds, 3),
        "cpu_share": round(share, 3),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    cached = _write_cache(path, key, entry)
    return speedup, f"measured now, {'cached in ' + str(path) if cached else 'not cached (unwritable)'}"


def auto_plan(device: torch.device, model: nn.Module | None = None) -> PrecisionPlan:
    """The plan ``auto`` runs for ``model`` (default variant: LiteMedSAM) on ``device``."""
    variant = str(getattr(model, "variant", None) or "lite_medsam")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return PrecisionPlan("fp32", reason=f"{device_name(device)} has no bf16")
    if device.type == "cpu" and not cpu_supports_bf16():
        return PrecisionPlan(
            "fp32", reason=f"this CPU ({cpu_model()}) has no bf16 instructions (AVX-512 BF16 or AMX)"
        )
    if device.type not in ("cpu", "cuda"):
        return PrecisionPlan("fp32", reason=f"no bf16 plan for {device.type} devices")
    plan = PLANS.get(variant)
    if plan is None:
        return PrecisionPlan(
            "fp32",
            reason=f"no bf16 plan has been checked to keep {variant}'s fp32 masks "
            "(--precision bf16 trades quality for speed)",
        )
    if model is None:
        from samadapt.builders import build

        # random weights time the same as real ones
        model = build(variant).to(device).to(memory_format=torch.channels_last)
    modules = plan.modules(model)
    if not modules:
        return PrecisionPlan("fp32", reason=f"the bf16 plan {plan.name} matches no module of this model")
    speedup, source = measured_speedup(model, variant, plan, device)
    if speedup is None:
        return PrecisionPlan("fp32", reason=f"bf16 switched off by {source}")
    if speedup < MIN_SPEEDUP:
        return PrecisionPlan(
            "fp32",
            reason=f"bf16 plan {plan.name} ({plan.parts}) measured {speedup:.2f}x faster, "
            f"below the {MIN_SPEEDUP:.1f}x threshold ({source})",
        )
    return PrecisionPlan(
        "bf16-partial",
        modules=modules,
        parts=plan.parts,
        reason=f"{speedup:.2f}x faster than fp32 ({source}); masks checked against fp32 on {plan.evidence}",
        propagation_safe=plan.propagation_evidence is not None,
        propagation_reason=PROPAGATION_FP32_REASON,
    )
