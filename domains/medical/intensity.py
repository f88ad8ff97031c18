"""Intensity presets that map CT (Hounsfield units) or MR volumes to float32 in [0, 1], as MedSAM expects.

MedSAM's preprocessing (``pre_CT_MR.py``) clips CT to a window (level L, width W: [L - W/2, L + W/2]) and MR
to the 0.5-99.5 percentiles of its nonzero voxels, then rescales to [0, 1]. Here a CT window is rescaled by
its fixed bounds ((x - lo) / W), so a given HU always maps to the same value; MedSAM rescales by the clipped
image's own min/max, which equals this whenever the volume spans the window (almost every CT). MR follows
MedSAM exactly, including keeping zero (background) voxels at 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from samadapt.domains.medical.volume import Volume
from samadapt.errors import InputError

__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "apply_intensity", "guess_preset"]


@dataclass(frozen=True)
class Preset:
    """An intensity preset.

    Attributes:
        name: preset name, e.g. ``"ct-soft"``.
        kind: ``"window"`` (CT level/width) or ``"percentile"`` (MR).
        level: window centre in HU (``kind == "window"``).
        width: window width in HU (``kind == "window"``).
        low_pct: lower percentile of nonzero voxels (``kind == "percentile"``).
        high_pct: upper percentile of nonzero voxels (``kind == "percentile"``).
        description: one line for help texts.
    """

    name: str
    kind: str
    level: float = 0.0
    width: float = 0.0
    low_pct: float = 0.5
    high_pct: float = 99.5
    description: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("ct-soft", "window", level=40, width=400, description="CT soft tissue / abdomen, L40 W400"),
        Preset("ct-lung", "window", level=-600, width=1500, description="CT lung, L-600 W1500"),
        Preset("ct-bone", "window", level=400, width=1800, description="CT bone, L400 W1800"),
        Preset("ct-brain", "window", level=40, width=80, description="CT brain, L40 W80"),
        Preset(
            "mr",
            "percentile",
            low_pct=0.5,
            high_pct=99.5,
            description="MR: clip to 0.5-99.5 percentiles of nonzero voxels, then min-max",
        ),
    )
}
#: Preset used when neither a preset nor a window is given.
DEFAULT_PRESET = "ct-soft"


def _window(array: np.ndarray, level: float, width: float) -> np.ndarray:
    if not (np.isfinite(level) and np.isfinite(width)) or width <= 0:
        raise InputError(
            f"intensity window needs a finite level and a positive width, got ({level}, {width})"
        )
    lo = level - width / 2.0
    out = (np.clip(array.astype(np.float64), lo, lo + width) - lo) / width
    return out.astype(np.float32)


def _percentile(array: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    data = array.astype(np.float64)
    nonzero = data[data != 0]
    if nonzero.size == 0:
        return np.zeros(array.shape, dtype=np.float32)
    lo, hi = np.percentile(nonzero, [low_pct, high_pct])
    if hi <= lo:  # constant foreground: foreground -> 1, background -> 0
        out = (data != 0).astype(np.float32)
        return out
    out = (np.clip(data, lo, hi) - lo) / (hi - lo)
    out[data == 0] = 0.0
    return out.astype(np.float32)


def apply_intensity(
    array: np.ndarray,
    preset: str | None = None,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Map raw intensities to float32 in [0, 1].

    Args:
        array: raw voxels (HU for CT), any shape.
        preset: a name from :data:`PRESETS`; ``None`` means :data:`DEFAULT_PRESET` unless ``window`` is given.
        window: explicit CT window ``(level, width)`` in HU; overrides the default preset.

    Returns:
        float32 array of ``array``'s shape with values in [0, 1].

    Raises:
        InputError: unknown preset, both ``preset`` and ``window`` given, or a non-positive window width.
    """
    if window is not None:
        if preset is not None:
            raise InputError("give either an intensity preset or a window (level, width), not both")
        level, width = window
        return _window(np.asarray(array), float(level), float(width))
    name = DEFAULT_PRESET if preset is None else preset
    spec = PRESETS.get(name)
    if spec is None:
        raise InputError(f"unknown intensity preset '{name}'; valid: {', '.join(PRESETS)}")
    if spec.kind == "window":
        return _window(np.asarray(array), spec.level, spec.width)
    return _percentile(np.asarray(array), spec.low_pct, spec.high_pct)


def guess_preset(volume: Volume | np.ndarray) -> str:
    """Guess ``"ct-soft"`` or ``"mr"`` for a volume.

    A DICOM modality in ``volume.meta`` decides when present. Otherwise the volume counts as CT when its
    minimum is below -500 (air in HU), its maximum at most 32767 and most voxels at or above -1100 (so
    scanner padding such as -3024 does not count); anything else is MR.

    Args:
        volume: a Volume or raw array.

    Returns:
        A key of :data:`PRESETS`.
    """
    meta: dict[str, Any] = volume.meta if isinstance(volume, Volume) else {}
    modality = str(meta.get("modality", "")).upper()
    if modality == "CT":
        return "ct-soft"
    if modality == "MR":
        return "mr"
    arr = volume.array if isinstance(volume, Volume) else np.asarray(volume)
    if arr.size == 0:
        return "mr"
    lo, hi = float(np.min(arr)), float(np.max(arr))
    # Padding outside the scan field (-2048, -3024) may set the minimum; most voxels must still be >= -1100.
    looks_hu = lo < -500 and hi <= 32767 and float(np.mean(arr >= -1100)) > 0.5
    return "ct-soft" if looks_hu else "mr"
