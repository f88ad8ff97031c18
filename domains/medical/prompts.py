"""Prompts on one slice of a volume: boxes and points in voxels or RAS millimetres, checked and labelled.

Coordinates follow :mod:`samadapt.domains.medical.propagation`: on a slice along ``axis``, X is the
first in-plane voxel axis and Y the second (axial: X = i, Y = j). With ``mm=True`` the user gives world
(RAS) millimetres instead: X and Y along the world axes the in-plane voxel axes follow most, and the
slice value along the world axis the slice axis follows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from samadapt.domains.medical.propagation import AXES, SlicePrompt, plane_size, slice_count
from samadapt.domains.medical.volume import Volume
from samadapt.errors import InputError

__all__ = ["volume_prompts", "world_to_voxel"]

Point = tuple[float, float, int]  # X, Y, label (1 foreground, 0 background)


def world_to_voxel(affine: np.ndarray, axis: int, x: float, y: float, s: float) -> np.ndarray:
    """RAS mm -> continuous IJK voxel coordinates.

    Args:
        affine: (4, 4) voxel-to-RAS matrix.
        axis: the slice axis (0, 1, 2 for i, j, k).
        x, y: world coordinates along the dominant world directions of the two in-plane voxel axes.
        s: world coordinate along the dominant world direction of the slice axis.

    Returns:
        (3,) IJK coordinates.

    Raises:
        InputError: two voxel axes follow the same world axis (a strongly oblique volume).
    """
    in_plane = [a for a in range(3) if a != axis]
    dominant = np.abs(affine[:3, :3]).argmax(axis=0)  # world component that each voxel axis follows most
    if len(set(dominant.tolist())) != 3:
        raise InputError("--mm needs a volume whose voxel axes follow distinct world axes")
    world = np.zeros(3)
    world[dominant[in_plane[0]]], world[dominant[in_plane[1]]], world[dominant[axis]] = x, y, s
    return (np.linalg.inv(affine) @ np.append(world, 1.0))[:3]


def _to_voxels(
    affine: np.ndarray,
    axis: int,
    boxes: list[list[float]],
    points: list[Point],
    slice_mm: float,
) -> tuple[list[list[float]], list[Point], float]:
    """Boxes, points and the slice value from RAS mm to voxels (boxes re-sorted to X0 < X1, Y0 < Y1)."""
    in_plane = [a for a in range(3) if a != axis]
    converted_boxes = []
    for box in boxes:
        a = world_to_voxel(affine, axis, box[0], box[1], slice_mm)
        b = world_to_voxel(affine, axis, box[2], box[3], slice_mm)
        converted_boxes.append(
            [
                float(min(a[in_plane[0]], b[in_plane[0]])),
                float(min(a[in_plane[1]], b[in_plane[1]])),
                float(max(a[in_plane[0]], b[in_plane[0]])),
                float(max(a[in_plane[1]], b[in_plane[1]])),
            ]
        )
    converted_points = []
    for x, y, label in points:
        v = world_to_voxel(affine, axis, x, y, slice_mm)
        converted_points.append((float(v[in_plane[0]]), float(v[in_plane[1]]), label))
    centre = world_to_voxel(affine, axis, 0.0, 0.0, slice_mm)
    return converted_boxes, converted_points, float(np.round(centre[axis]))


def volume_prompts(
    volume: Volume,
    axis_name: str,
    *,
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[Point] = (),
    slice_value: float | None,
    mm: bool = False,
    labels: Sequence[int] | None = None,
    point_boxes: Sequence[int] | None = None,
) -> tuple[int, list[SlicePrompt]]:
    """One :class:`SlicePrompt` per object on the prompted slice, checked against the volume.

    Each box is one object; each point goes with the box ``point_boxes`` names (by default every point
    goes with the first box), or the points make the only object when no box is given. Coordinates are
    voxel indexes, 0..W-1 and 0..H-1 inclusive (fractions allowed), as in
    :meth:`samadapt.predictor.Predictor.check_points`.

    Args:
        volume: the volume the prompts are drawn on (its shape, and its affine when ``mm``).
        axis_name: ``axial``, ``coronal`` or ``sagittal``.
        boxes: (X0, Y0, X1, Y1) per object, in voxels (or RAS mm when ``mm``).
        points: (X, Y, label) with label 1 (foreground) or 0 (background).
        slice_value: the slice index (or its world coordinate in mm when ``mm``).
        mm: coordinates and ``slice_value`` are RAS millimetres.
        labels: label value per object (default 1, 2, ...), each in 1..65535.
        point_boxes: per point, the index (0-based) of the box it goes with; None: the first box.

    Returns:
        (slice index, prompts).

    Raises:
        InputError: no slice, a fractional or out-of-range slice, a box or point outside the slice,
            a reversed box, labels that do not match the boxes, or a point naming a missing box.
    """
    axis = AXES[axis_name]
    box_list = [[float(v) for v in box] for box in boxes]
    point_list = [(float(x), float(y), int(label)) for x, y, label in points]
    if mm:
        if slice_value is None:
            raise InputError("--mm needs --slice given in mm too")
        box_list, point_list, slice_value = _to_voxels(
            volume.affine, axis, box_list, point_list, float(slice_value)
        )
    if slice_value is None:
        raise InputError("volumes need --slice K (the slice index the prompt is drawn on) or --roi")
    if float(slice_value) != int(slice_value):
        raise InputError(f"--slice must be a whole slice index, got {slice_value}")
    index = int(slice_value)
    count = slice_count(volume.shape, axis_name)
    if not 0 <= index < count:
        raise InputError(
            f"--slice {index} is outside the volume ({count} {axis_name} slices, 0..{count - 1})"
        )
    height, width = plane_size(volume.shape, axis_name)
    for box in box_list:
        if box[2] <= box[0] or box[3] <= box[1]:
            raise InputError("box is reversed or empty: need X0 < X1 and Y0 < Y1")
        if min(box) < 0 or box[2] > width - 1 or box[3] > height - 1:
            raise InputError(
                f"box {box} lies outside the {width}x{height} {axis_name} slice "
                f"(voxel indexes X 0..{width - 1}, Y 0..{height - 1})"
            )
    for x, y, _ in point_list:
        if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
            raise InputError(
                f"point ({x}, {y}) lies outside the {width}x{height} {axis_name} slice "
                f"(voxel indexes X 0..{width - 1}, Y 0..{height - 1})"
            )
    values = list(labels or [])
    count_objects = max(len(box_list), 1)
    if values and len(values) != count_objects:
        raise InputError(f"give one --label per --box ({count_objects}), got {len(values)}")
    values = values or list(range(1, count_objects + 1))
    if any(v <= 0 or v > 65535 for v in values):
        raise InputError("--label values must be between 1 and 65535")
    owners = [0] * len(point_list) if point_boxes is None else [int(b) for b in point_boxes]
    if len(owners) != len(point_list):
        raise InputError(f"point_boxes must name one box per point ({len(point_list)}), got {len(owners)}")
    if any(not 0 <= b < count_objects for b in owners):
        raise InputError(f"a point goes with a box that was not given (there are {count_objects} box(es))")
    prompts = []
    for n in range(count_objects):
        object_box = (box_list[n][0], box_list[n][1], box_list[n][2], box_list[n][3]) if box_list else None
        object_points = [p for p, owner in zip(point_list, owners, strict=True) if owner == n]
        prompts.append(SlicePrompt(index, object_box, object_points, values[n]))
    return index, prompts
