"""Fixtures for samadapt.domains.medical tests: real TotalSegmentator files and synthetic geometries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from samadapt.domains.medical import Volume, affine_from_lps

DATA = Path(__file__).resolve().parents[2] / "data" / "totalsegmentator"


def _f32(affine: np.ndarray) -> np.ndarray:
    """Round to float32, the precision NIfTI stores affines in, so every format can hold it exactly."""
    return np.asarray(affine, dtype=np.float32).astype(np.float64)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [x for x in range(3) if x != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def oblique_affine() -> np.ndarray:
    """Rotated 30 degrees about z and 12 about x, anisotropic spacing, arbitrary origin."""
    aff = np.eye(4)
    aff[:3, :3] = _rotation(2, 30) @ _rotation(0, 12) @ np.diag([0.8, 1.1, 2.5])
    aff[:3, 3] = [-12.25, 45.5, 7.75]
    return _f32(aff)


def permuted_lps_affine() -> np.ndarray:
    """Non-RAS voxel order: i runs posterior (-y), j superior (+z), k left (-x); spacings 0.7, 1.3, 2.0."""
    aff = np.eye(4)
    aff[:3, :3] = [[0.0, 0.0, -2.0], [-0.7, 0.0, 0.0], [0.0, 1.3, 0.0]]
    aff[:3, 3] = [100.0, -20.5, 3.25]
    return _f32(aff)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(params=["oblique", "permuted-lps", "dicom-lps"])
def reference(request: pytest.FixtureRequest) -> Volume:
    """A (7, 9, 5) reference volume with a hard geometry: oblique, non-RAS axis order, or ITK/LPS-derived."""
    if request.param == "oblique":
        affine = oblique_affine()
    elif request.param == "permuted-lps":
        affine = permuted_lps_affine()
    else:  # as ITK gives it for an axial LPS series: RAS affine has -x, -y columns
        affine = _f32(affine_from_lps([0.9765625, 0.9765625, 2.0], [-249.5, -437.5, -804.5], np.eye(3)))
    return Volume(np.zeros((7, 9, 5), dtype=np.int16), affine, {})


@pytest.fixture
def label_array() -> np.ndarray:
    """(7, 9, 5) uint8 labels 0..3, asymmetric so any transpose or flip changes it."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 4, size=(7, 9, 5)).astype(np.uint8)
    arr[0, 0, 0], arr[6, 8, 4] = 3, 0
    return arr
