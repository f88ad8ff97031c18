"""Training planes from medical data: image/label volume pairs on one grid, MedSAM ``.npz`` files, and the
objects (label values) on each 2D plane.

Volumes are intensity-mapped exactly as ``samadapt segment VOLUME`` does before it hands slices to the
predictor (``preset`` or :func:`~samadapt.domains.medical.intensity.guess_preset`, then
:func:`~samadapt.domains.medical.intensity.apply_intensity` on the whole volume), and cut with
:func:`~samadapt.domains.medical.propagation.slice_image`, so a training slice is the pixel array inference
sees.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from samadapt.domains.medical.intensity import apply_intensity, guess_preset
from samadapt.domains.medical.io import read_volume
from samadapt.domains.medical.propagation import AXES, slice_count, slice_image
from samadapt.domains.medical.volume import reorient_like
from samadapt.errors import InputError

__all__ = ["label_map", "labelled_planes", "plane_objects", "read_npz_pair", "read_volume_pair"]


def label_map(array: np.ndarray, source: str) -> np.ndarray:
    """A label array as compact non-negative integers (uint8, uint16 or int64), same shape.

    Raises:
        InputError: non-integer or negative values.
    """
    arr = np.asarray(array)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        rounded = np.rint(arr)
        if not np.all(np.isfinite(arr)) or np.any(np.abs(arr - rounded) > 1e-3):
            raise InputError(
                f"label map {source} has non-integer values; expected 0 = background, 1.. objects"
            )
        arr = rounded.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise InputError(f"label map {source} has unsupported value type {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise InputError(f"label map {source} has negative values; expected 0 = background, 1.. objects")
    top = int(arr.max(initial=0))
    return arr.astype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int64, copy=False)


def read_volume_pair(
    image_path: str | os.PathLike[str], label_path: str | os.PathLike[str], preset: str | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Read an image volume and its label volume onto the image's voxel grid, intensities mapped.

    A label stored in another voxel order than its image (a DICOM series next to dcm2niix's NIfTI, say) is
    permuted/flipped onto the image grid with :func:`reorient_like`; nothing is resampled.

    Args:
        image_path: volume file or DICOM series folder.
        label_path: label volume file.
        preset: intensity preset; ``None`` guesses one per volume as the ``segment`` CLI does.

    Returns:
        ``(image (I, J, K) float32 in [0, 1], labels (I, J, K) integers, preset used)``.

    Raises:
        InputError: unreadable files, or a label that does not share the image's voxels.
    """
    image = read_volume(image_path)
    label = read_volume(label_path)
    if label.shape != image.shape or not np.allclose(label.affine, image.affine, atol=1e-4):
        try:
            label = reorient_like(label, image, atol=1e-3)
        except InputError:
            raise InputError(
                f"label {Path(label_path).name} {label.shape} is not on the voxel grid of image "
                f"{Path(image_path).name} {image.shape}; resample it onto the image first"
            ) from None
    name = preset or guess_preset(image)
    return apply_intensity(image.array, preset=name), label_map(label.array, Path(label_path).name), name


def read_npz_pair(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read a MedSAM-style ``.npz``: ``imgs`` ((D, H, W), (H, W) or (H, W, 3)) and ``gts`` label map.

    Images are returned as stored (MedSAM's files are already intensity-normalised).

    Returns:
        ``(imgs, gts)``: gts is (H, W) for a 2D image or (D, H, W) for a volume sliced along axis 0.

    Raises:
        InputError: unreadable file, missing keys or mismatched shapes.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            missing = [k for k in ("imgs", "gts") if k not in data.files]
            if missing:
                raise InputError(f"{p.name} lacks {' and '.join(missing)}; a MedSAM .npz holds imgs and gts")
            imgs, gts = np.asarray(data["imgs"]), np.asarray(data["gts"])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"cannot read {p.name}: {' '.join(str(exc).split())}") from None
    spatial = imgs.shape if gts.ndim == 3 else imgs.shape[:2]
    ok = gts.ndim in (2, 3) and tuple(spatial) == tuple(gts.shape) and imgs.ndim in (2, 3)
    if gts.ndim == 3:
        ok = ok and imgs.ndim == 3
    elif imgs.ndim == 3:
        ok = ok and imgs.shape[2] in (1, 3, 4)
    if not ok or imgs.size == 0:
        raise InputError(
            f"{p.name}: imgs {imgs.shape} and gts {gts.shape} do not match; expected (D, H, W) with "
            "(D, H, W), or (H, W[, 3]) with (H, W)"
        )
    if imgs.dtype.kind not in "biuf" or (imgs.dtype.kind == "f" and not np.all(np.isfinite(imgs))):
        raise InputError(f"{p.name}: imgs must hold finite numbers, got {imgs.dtype}")
    return imgs, label_map(gts, p.name)


def plane_objects(labels: np.ndarray, min_area: int) -> list[int]:
    """Label values (nonzero) with at least ``min_area`` pixels on a (H, W) plane, ascending."""
    flat = np.asarray(labels).ravel()
    need = max(int(min_area), 1)
    if flat.dtype in (np.uint8, np.uint16):
        counts = np.bincount(flat)
        values = np.flatnonzero(counts >= need)
    else:
        uniq, counts = np.unique(flat, return_counts=True)
        values = uniq[counts >= need]
    return [int(v) for v in values if v != 0]


def labelled_planes(
    image: np.ndarray, labels: np.ndarray, axis: str | None, min_area: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray, list[int]]]:
    """The planes of a volume that hold at least one object.

    Args:
        image: (I, J, K) volume (``axis`` given) or (D, H, W) stack (``axis=None``: planes along axis 0).
        labels: integer label volume of the same shape.
        axis: ``axial``, ``coronal`` or ``sagittal`` (:data:`AXES`; planes as :func:`slice_image` shows
            them), or ``None``.
        min_area: smallest object kept, in pixels.

    Yields:
        ``(index, image plane (H, W), label plane (H, W), object values)``; planes are contiguous copies.
    """
    if axis is not None and axis not in AXES:
        raise InputError(f"unknown axis {axis!r}; choose from {', '.join(AXES)}")
    count = image.shape[0] if axis is None else slice_count(image.shape, axis)
    for index in range(count):
        lab = labels[index] if axis is None else slice_image(labels, axis, index)
        objects = plane_objects(lab, min_area)
        if objects:
            img = image[index] if axis is None else slice_image(image, axis, index)
            yield index, np.ascontiguousarray(img), np.ascontiguousarray(lab), objects
