"""A voxel array with its world geometry (RAS affine), and conversions to and from ITK's LPS geometry.

Conventions (the NIfTI / ITK / 3D Slicer ones):

- ``Volume.array`` is indexed ``[i, j, k]``: ``i`` is the first (fastest-varying on disk) voxel axis and ``k``
  the slice axis of an axial acquisition. Voxel order is kept exactly as stored in the file; nothing is
  reoriented to a canonical orientation.
- ``Volume.affine`` maps voxel indices ``(i, j, k, 1)`` to world coordinates in millimetres in the RAS frame,
  exactly as nibabel's ``img.affine``: +x = patient Right, +y = Anterior, +z = Superior.
- ITK (SimpleITK, NRRD files from Slicer, DICOM) describes the same grid with ``spacing``, ``origin`` and a
  ``direction`` matrix in the LPS frame (+x = Left, +y = Posterior, +z = Superior). The two frames differ by
  the sign of x and y: ``RAS = diag(-1, -1, 1) @ LPS``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from samadapt.errors import InputError

__all__ = ["LPS_TO_RAS", "Volume", "affine_from_lps", "lps_from_affine", "reorient_like", "require_3d"]

#: Flips x and y; its own inverse, so it converts LPS -> RAS and RAS -> LPS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def affine_from_lps(spacing: Any, origin: Any, direction: Any) -> np.ndarray:
    """Build the 4x4 voxel-to-RAS affine from ITK geometry.

    Args:
        spacing: 3 voxel sizes in mm along i, j, k.
        origin: world position (LPS, mm) of voxel (0, 0, 0).
        direction: 3x3 LPS direction cosines; column ``n`` is the unit direction of voxel axis ``n``
            (a flat sequence of 9 values is read row-major, as SimpleITK's ``GetDirection`` gives it).

    Returns:
        float64 array of shape (4, 4).
    """
    sp = np.asarray(spacing, dtype=np.float64).reshape(3)
    org = np.asarray(origin, dtype=np.float64).reshape(3)
    dirs = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ dirs @ np.diag(sp)
    affine[:3, 3] = LPS_TO_RAS @ org
    return affine


def lps_from_affine(affine: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a voxel-to-RAS affine into ITK geometry.

    Args:
        affine: 4x4 voxel-to-RAS matrix.

    Returns:
        ``(spacing (3,), origin_lps (3,), direction_lps (3, 3))``; direction columns are unit vectors.

    Raises:
        InputError: if a voxel axis has zero length (singular affine).
    """
    aff = np.asarray(affine, dtype=np.float64)
    m = LPS_TO_RAS @ aff[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(aff)):
        raise InputError(f"volume affine is singular or not finite (voxel sizes {spacing.tolist()})")
    return spacing, LPS_TO_RAS @ aff[:3, 3], m / spacing


@dataclass
class Volume:
    """A 3D voxel array and its geometry.

    Attributes:
        array: voxels, shape (I, J, K), indexed [i, j, k] in file order.
        affine: (4, 4) float64 voxel-index -> RAS world (mm) transform, the NIfTI convention.
        meta: free-form metadata (source path, format, NIfTI qform/sform codes, segment names under
            ``"labels"`` as ``{value: name}``, DICOM modality, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.array(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise InputError(f"volume affine must be 4x4, got shape {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Voxel grid shape (I, J, K)."""
        return tuple(int(n) for n in self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (lengths of the affine's columns)."""
        sp = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(sp[0]), float(sp[1]), float(sp[2]))

    @property
    def origin(self) -> tuple[float, float, float]:
        """RAS world position (mm) of the centre of voxel (0, 0, 0)."""
        o = self.affine[:3, 3]
        return (float(o[0]), float(o[1]), float(o[2]))

    @property
    def direction(self) -> np.ndarray:
        """(3, 3) RAS direction cosines; column ``n`` is the unit vector of voxel axis ``n``."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    def lps_geometry(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ITK geometry of this volume: ``(spacing, origin_lps, direction_lps)``."""
        return lps_from_affine(self.affine)

    def with_array(self, array: np.ndarray) -> Volume:
        """A new volume on the same grid (same affine, copied meta) holding ``array``.

        Raises:
            InputError: if ``array``'s shape differs from this volume's grid.
        """
        if tuple(array.shape) != self.shape:
            raise InputError(f"array shape {tuple(array.shape)} differs from the volume grid {self.shape}")
        return Volume(array, self.affine.copy(), copy.deepcopy(self.meta))


def require_3d(volume: Volume) -> Volume:
    """Return ``volume`` if it has at least 2 voxels along every axis, else raise.

    Reading a single slice is allowed; operations that move through slices (propagation, 3D adapters)
    call this first.

    Raises:
        InputError: for a single-slice (or otherwise flat) volume.
    """
    if len(volume.shape) != 3 or min(volume.shape) < 2:
        raise InputError(
            f"volume has a single slice (shape {volume.shape}); this operation needs a 3D volume"
        )
    return volume


def reorient_like(volume: Volume, reference: Volume, atol: float = 1e-4) -> Volume:
    """Permute and flip ``volume``'s axes so that it lies on ``reference``'s grid, without resampling.

    Works when both describe the same voxel centres in a different order (e.g. a DICOM series read by ITK
    versus the NIfTI file dcm2niix wrote from it, which flips the row axis).

    Args:
        volume: the volume to reorder.
        reference: the grid to match.
        atol: tolerance (voxels) on the index mapping.

    Returns:
        A new Volume with ``reference``'s affine and ``volume``'s meta.

    Raises:
        InputError: if the grids are not the same up to axis permutation and flips.
    """
    if len(volume.shape) != 3 or len(reference.shape) != 3:
        raise InputError("reorient_like needs two 3D volumes")
    # t maps a reference voxel index to a volume voxel index: idx_vol = R @ idx_ref + t.
    t = np.linalg.inv(volume.affine) @ reference.affine
    rot, off = t[:3, :3], t[:3, 3]
    perm = np.argmax(np.abs(rot), axis=0)  # perm[a] = volume axis feeding reference axis a
    signs = np.sign(rot[perm, np.arange(3)])
    expected = np.zeros((3, 3))
    expected[perm, np.arange(3)] = signs
    ok = sorted(perm.tolist()) == [0, 1, 2] and np.allclose(rot, expected, atol=atol)
    if ok:
        for a in range(3):
            n = volume.shape[perm[a]]
            ok = ok and reference.shape[a] == n
            ok = ok and abs(off[perm[a]] - (0.0 if signs[a] > 0 else n - 1)) <= atol
    if not ok:
        raise InputError(
            f"volumes are not on the same voxel grid up to axis order and flips "
            f"(shapes {volume.shape} and {reference.shape})"
        )
    arr = np.transpose(volume.array, tuple(int(p) for p in perm))
    flips = tuple(a for a in range(3) if signs[a] < 0)
    if flips:
        arr = np.flip(arr, axis=flips)
    return Volume(np.ascontiguousarray(arr), reference.affine.copy(), copy.deepcopy(volume.meta))
