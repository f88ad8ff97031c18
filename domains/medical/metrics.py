"""Segmentation metrics in physical units: Dice, normalised surface Dice (NSD) and HD95.

Surfaces are voxel-based: a surface voxel is a foreground voxel with at least one face neighbour
(6-connectivity in 3D) in the background; voxels on the array border count as surface (outside the array is
background). The distance between surfaces is measured between voxel centres with
``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``, so anisotropic spacing is honoured.

- NSD at tolerance ``tau`` (Nikolov et al. 2021, as in the MedSAM evaluation, voxel-counted instead of
  surfel-area-weighted): the fraction of both surfaces' voxels lying within ``tau`` mm of the other
  surface, ``(|{a in dA: d(a, dB) <= tau}| + |{b in dB: d(b, dA) <= tau}|) / (|dA| + |dB|)``.
- HD95: the larger of the two directed 95th-percentile surface distances (the MONAI / DeepMind
  ``surface-distance`` definition; medpy pools both directions instead).

Empty masks: both empty -> Dice 1.0, NSD 1.0, HD95 0.0 (perfect agreement on "nothing here"); exactly one
empty -> Dice 0.0, NSD 0.0, HD95 ``inf`` (there is no surface to measure to).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from samadapt._optional import optional_import
from samadapt.domains.medical.volume import Volume
from samadapt.errors import InputError

__all__ = ["dice", "evaluate_label_arrays", "evaluate_labels", "hd95", "nsd"]


def _masks(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if p.shape != g.shape:
        raise InputError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    return p, g


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(np.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"spacing must be {ndim} positive numbers, got {list(spacing)}")
    return sp


def _surface(mask: np.ndarray) -> np.ndarray:
    ndi = optional_import("scipy.ndimage", extra="medical")
    structure = ndi.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndi.binary_erosion(mask, structure=structure, border_value=0)


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances (mm) pred-surface -> gt-surface and gt-surface -> pred-surface; both non-empty.

    Works on the bounding box of ``pred | gt`` (plus one voxel), which gives the same distances.
    """
    ndi = optional_import("scipy.ndimage", extra="medical")
    union = pred | gt
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.nonzero(np.any(union, axis=other))[0]
        box.append(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2))
    p, g = pred[tuple(box)], gt[tuple(box)]
    sp, sg = _surface(p), _surface(g)
    to_gt = ndi.distance_transform_edt(~sg, sampling=spacing)
    to_pred = ndi.distance_transform_edt(~sp, sampling=spacing)
    return np.asarray(to_gt[sp], dtype=np.float64), np.asarray(to_pred[sg], dtype=np.float64)


def dice(pred: Any, gt: Any) -> float:
    """Dice coefficient ``2|P & G| / (|P| + |G|)`` of two masks (nonzero = foreground); 1.0 if both empty.

    Raises:
        InputError: if the shapes differ.
    """
    p, g = _masks(pred, gt)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, g).sum()) / total


def nsd(pred: Any, gt: Any, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (see the module docstring for definition and conventions).

    Args:
        pred: predicted mask, any number of dimensions.
        gt: ground-truth mask, same shape.
        spacing: voxel size in mm per axis, in array axis order.
        tolerance_mm: accepted surface deviation in mm (>= 0).

    Raises:
        InputError: shape mismatch, bad spacing or negative tolerance.
    """
    p, g = _masks(pred, gt)
    sp = _spacing(spacing, p.ndim)
    if not tolerance_mm >= 0:
        raise InputError(f"NSD tolerance must be >= 0 mm, got {tolerance_mm}")
    has_p, has_g = bool(p.any()), bool(g.any())
    if not (has_p and has_g):
        return 1.0 if has_p == has_g else 0.0
    d_p, d_g = _surface_distances(p, g, sp)
    return _nsd_from(d_p, d_g, tolerance_mm)


def hd95(pred: Any, gt: Any, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm: max of the two directed 95th percentiles.

    Returns 0.0 if both masks are empty and ``inf`` if exactly one is.

    Raises:
        InputError: shape mismatch or bad spacing.
    """
    p, g = _masks(pred, gt)
    sp = _spacing(spacing, p.ndim)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not (has_p and has_g):
        return 0.0 if has_p == has_g else float("inf")
    d_p, d_g = _surface_distances(p, g, sp)
    return _hd95_from(d_p, d_g)


def _nsd_from(d_p: np.ndarray, d_g: np.ndarray, tolerance_mm: float) -> float:
    ok = int(np.count_nonzero(d_p <= tolerance_mm)) + int(np.count_nonzero(d_g <= tolerance_mm))
    return ok / (d_p.size + d_g.size)


def _hd95_from(d_p: np.ndarray, d_g: np.ndarray) -> float:
    return float(max(np.percentile(d_p, 95), np.percentile(d_g, 95)))


def evaluate_labels(
    pred: Volume,
    gt: Volume,
    tolerance_mm: float = 2.0,
    labels: dict[int, str] | Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Per-label Dice, NSD and HD95 of two label maps on the same grid.

    Args:
        pred: predicted label map.
        gt: ground-truth label map; its spacing is used for distances.
        tolerance_mm: NSD tolerance in mm.
        labels: label values to evaluate, optionally with names (``{value: name}``); by default every
            nonzero value present in either map, named from ``gt.meta["labels"]`` or ``pred.meta["labels"]``
            when available.

    Returns:
        One dict per label, in ascending label order, with keys ``label``, ``name`` (str or None),
        ``dice``, ``nsd``, ``hd95`` (mm), ``pred_voxels``, ``gt_voxels``. Empty-mask conventions as in the
        module docstring.

    Raises:
        InputError: ``label grid mismatch: ...`` when the shapes differ or the affines are not equal within
            1e-4; bad tolerance.
    """
    if pred.shape != gt.shape:
        raise InputError(f"label grid mismatch: prediction shape {pred.shape} vs ground truth {gt.shape}")
    if not np.allclose(pred.affine, gt.affine, rtol=0, atol=1e-4):
        diff = float(np.max(np.abs(pred.affine - gt.affine)))
        raise InputError(f"label grid mismatch: affines differ (max abs difference {diff:.6g})")
    if not tolerance_mm >= 0:
        raise InputError(f"NSD tolerance must be >= 0 mm, got {tolerance_mm}")
    spacing = _spacing(gt.spacing, 3)
    names: dict[int, str] = {}
    for source in (pred.meta.get("labels"), gt.meta.get("labels")):  # gt names win
        if isinstance(source, dict):
            names.update({int(k): str(v) for k, v in source.items()})
    if labels is None:
        values = sorted({int(v) for v in np.unique(gt.array)} | {int(v) for v in np.unique(pred.array)})
        values = [v for v in values if v != 0]
    elif isinstance(labels, dict):
        names.update({int(k): str(v) for k, v in labels.items()})
        values = sorted(int(v) for v in labels)
    else:
        values = sorted(int(v) for v in labels)
    return evaluate_label_arrays(pred.array, gt.array, spacing, tolerance_mm, values, names)


def evaluate_label_arrays(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
    labels: Sequence[int] | None = None,
    names: dict[int, str] | None = None,
) -> list[dict[str, Any]]:
    """Per-label Dice, NSD and HD95 of two label arrays of any dimension (2D masks, 3D volumes).

    Args:
        pred: predicted label array.
        gt: ground-truth label array of the same shape.
        spacing: pixel/voxel size per array axis (mm; for a plain 2D image, 1 per pixel).
        tolerance_mm: NSD tolerance in the units of ``spacing``.
        labels: label values to evaluate; by default every nonzero value present in either array.
        names: optional ``{value: name}`` for the ``name`` column.

    Returns:
        One dict per label as :func:`evaluate_labels` returns them.

    Raises:
        InputError: the shapes differ, bad spacing or negative tolerance.
    """
    if np.shape(pred) != np.shape(gt):
        raise InputError(
            f"label grid mismatch: prediction shape {np.shape(pred)} vs ground truth {np.shape(gt)}"
        )
    if not tolerance_mm >= 0:
        raise InputError(f"NSD tolerance must be >= 0 mm, got {tolerance_mm}")
    spacing = _spacing(spacing, np.ndim(gt))
    names = names or {}
    if labels is None:
        present = {int(v) for v in np.unique(gt)} | {int(v) for v in np.unique(pred)}
        values = sorted(v for v in present if v != 0)
    else:
        values = sorted(int(v) for v in labels)
    rows = []
    for value in values:
        p, g = pred == value, gt == value
        n_p, n_g = int(p.sum()), int(g.sum())
        if n_p and n_g:
            d_p, d_g = _surface_distances(p, g, spacing)
            row_nsd, row_hd = _nsd_from(d_p, d_g, tolerance_mm), _hd95_from(d_p, d_g)
        else:
            row_nsd = 1.0 if n_p == n_g else 0.0
            row_hd = 0.0 if n_p == n_g else float("inf")
        rows.append(
            {
                "label": value,
                "name": names.get(value),
                "dice": dice(p, g),
                "nsd": row_nsd,
                "hd95": row_hd,
                "pred_voxels": n_p,
                "gt_voxels": n_g,
            }
        )
    return rows
