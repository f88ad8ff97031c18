"""Medical volumes: IO with exact geometry, MedSAM intensity presets and segmentation metrics.

The optional packages (nibabel, SimpleITK, pynrrd, pydicom, scipy; ``pip install 'samadapt[medical]'``)
are imported only when a function needs them.
"""

from samadapt.domains.medical.intensity import DEFAULT_PRESET, PRESETS, Preset, apply_intensity, guess_preset
from samadapt.domains.medical.io import READ_SUFFIXES, WRITE_SUFFIXES, read_volume, write_volume
from samadapt.domains.medical.metrics import dice, evaluate_labels, hd95, nsd
from samadapt.domains.medical.volume import (
    LPS_TO_RAS,
    Volume,
    affine_from_lps,
    lps_from_affine,
    reorient_like,
    require_3d,
)

__all__ = [
    "DEFAULT_PRESET",
    "LPS_TO_RAS",
    "PRESETS",
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "Preset",
    "Volume",
    "affine_from_lps",
    "apply_intensity",
    "dice",
    "evaluate_labels",
    "guess_preset",
    "hd95",
    "lps_from_affine",
    "nsd",
    "read_volume",
    "reorient_like",
    "require_3d",
    "write_volume",
]
