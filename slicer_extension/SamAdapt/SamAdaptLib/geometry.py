"""Geometry between 3D Slicer's world (RAS) and the voxel indices samadapt's server expects.

Pure Python + numpy (no slicer, qt, vtk or torch import), so pytest covers it without Slicer.

Conventions, and how they line up (read with ``samadapt.domains.medical.io.read_volume`` and
``samadapt.domains.medical.propagation``):

- Slicer's **IJK** index ``(i, j, k)`` of a volume node is the voxel index in the file the node was read
  from or is saved to (NIfTI/NRRD keep voxel order; Slicer never reorders voxels). ``i`` is the column
  (fastest on disk), ``j`` the row, ``k`` the slice of an axial acquisition. Integer IJK values are voxel
  centres. ``volumeNode.GetIJKToRASMatrix`` equals nibabel's ``img.affine`` for a NIfTI file.
- ``slicer.util.arrayFromVolume`` returns the voxels indexed ``[k, j, i]``. samadapt's
  ``Volume.array`` (what ``read_volume`` returns and what the server keeps) is indexed ``[i, j, k]``:
  ``samadapt_array = slicer_array.transpose(2, 1, 0)``.
- samadapt names slicing axes after **array axes**, not anatomy: ``sagittal`` = axis 0 (i),
  ``coronal`` = axis 1 (j), ``axial`` = axis 2 (k) (``propagation.AXES``). On a slice along one axis,
  X is the first remaining array axis and Y the second: axial X = i, Y = j; coronal X = i, Y = k;
  sagittal X = j, Y = k. ``samadapt segment CT.nii.gz --box X0 Y0 X1 Y1 --slice K`` (axial, the default)
  is therefore a box from (i, j) = (X0, Y0) to (X1, Y1) on the slice k = K.
- Which array axis a Slicer slice view cuts is decided from the view's orientation (its SliceToRAS
  matrix) against the volume's IJK axes, never from the view's colour: the Red ("Axial") view of a
  sagittally acquired volume cuts the volume's ``i`` or ``j`` axis, not ``k``.

Matrices are 4x4 (nested lists, numpy arrays, or anything with 16 numbers in row-major order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "AXIS_NAMES",
    "STANDARD_SLICE_TO_RAS",
    "VIEW_ORIENTATIONS",
    "GeometryError",
    "Prompt",
    "as_matrix",
    "box_from_corners",
    "box_from_roi",
    "ijk_to_ras",
    "in_plane_axes",
    "plane_xy",
    "prompt_from_markups",
    "ras_to_ijk",
    "roi_corners",
    "slice_axis",
    "slice_index",
    "view_for_point",
]

#: samadapt's axis name for each array axis of ``Volume.array`` ([i, j, k]); same as ``propagation.AXES``.
AXIS_NAMES: tuple[str, str, str] = ("sagittal", "coronal", "axial")

#: Default orientation of Slicer's three slice views.
VIEW_ORIENTATIONS: dict[str, str] = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}

#: Slicer's SliceToRAS rotation for each standard orientation (vtkMRMLSliceNode::SetOrientationTo...):
#: columns are the view's X (screen right), Y (screen up) and normal directions in RAS.
STANDARD_SLICE_TO_RAS: dict[str, np.ndarray] = {
    "Axial": np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
    "Sagittal": np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
    "Coronal": np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
}


class GeometryError(ValueError):
    """A prompt that cannot be mapped onto the volume (oblique view, outside the volume, ...)."""


def as_matrix(values: Any) -> np.ndarray:
    """A (4, 4) float64 matrix from nested lists, a numpy array or 16 row-major numbers."""
    m = np.asarray(values, dtype=np.float64)
    if m.size != 16:
        raise GeometryError(f"expected a 4x4 matrix, got {m.size} values")
    return m.reshape(4, 4)


def _apply(matrix: Any, point: Sequence[float]) -> np.ndarray:
    p = np.asarray(point, dtype=np.float64).reshape(3)
    return (as_matrix(matrix) @ np.append(p, 1.0))[:3]


def ras_to_ijk(ijk_to_ras: Any, point_ras: Sequence[float], world_to_local: Any = None) -> np.ndarray:
    """Continuous IJK of a world point.

    Args:
        ijk_to_ras: the volume's IJKToRAS matrix (``volumeNode.GetIJKToRASMatrix``).
        point_ras: world RAS position (what markups report with ``GetNthControlPointPositionWorld``).
        world_to_local: world -> volume-local RAS when the volume sits under a (linear) parent transform;
            None for no transform.

    Returns:
        (3,) float IJK.
    """
    p = np.asarray(point_ras, dtype=np.float64)
    if world_to_local is not None:
        p = _apply(world_to_local, p)
    return _apply(np.linalg.inv(as_matrix(ijk_to_ras)), p)


def ijk_to_ras(ijk_to_ras: Any, point_ijk: Sequence[float], world_to_local: Any = None) -> np.ndarray:
    """World RAS of a (continuous) IJK position; the inverse of :func:`ras_to_ijk`."""
    p = _apply(ijk_to_ras, point_ijk)
    if world_to_local is not None:
        p = _apply(np.linalg.inv(as_matrix(world_to_local)), p)
    return p


def _ijk_to_world(ijk_to_ras: Any, world_to_local: Any) -> np.ndarray:
    m = as_matrix(ijk_to_ras)
    if world_to_local is not None:
        m = np.linalg.inv(as_matrix(world_to_local)) @ m
    return m


def in_plane_axes(axis: int) -> tuple[int, int]:
    """The (X, Y) array axes of a slice along ``axis``: the other two, in increasing order."""
    if axis not in (0, 1, 2):
        raise GeometryError(f"axis must be 0, 1 or 2, got {axis}")
    x_axis, y_axis = (a for a in range(3) if a != axis)
    return x_axis, y_axis


def slice_axis(
    slice_to_ras: Any, ijk_to_ras: Any, world_to_local: Any = None, tolerance_degrees: float = 2.0
) -> int:
    """The array axis (0 = i, 1 = j, 2 = k) that a slice view cuts.

    The view's normal (third column of its SliceToRAS) is compared with the volume's three IJK axis
    directions in world space; the axis it is parallel to (either sign) is the slicing axis.

    Args:
        slice_to_ras: the view's ``sliceNode.GetSliceToRAS()`` (a 3x3 rotation is accepted too).
        ijk_to_ras: the volume's IJKToRAS.
        world_to_local: optional world -> volume-local transform (see :func:`ras_to_ijk`).
        tolerance_degrees: largest angle between the normal and the voxel axis.

    Raises:
        GeometryError: the view is oblique to the voxel grid (reslice the view onto the volume's axes,
            e.g. Slicer's "Rotate to volume plane").
    """
    s = np.asarray(slice_to_ras, dtype=np.float64)
    rotation = s.reshape(4, 4)[:3, :3] if s.size == 16 else s.reshape(3, 3)
    normal = rotation[:, 2] / np.linalg.norm(rotation[:, 2])
    axes = _ijk_to_world(ijk_to_ras, world_to_local)[:3, :3]
    cosines = np.abs(normal @ (axes / np.linalg.norm(axes, axis=0)))
    best = int(np.argmax(cosines))
    angle = math.degrees(math.acos(min(1.0, float(cosines[best]))))
    if angle > tolerance_degrees:
        raise GeometryError(
            f"the slice view is {angle:.1f} degrees oblique to the volume's voxel axes; "
            "rotate the view to the volume plane first"
        )
    return best


def slice_index(point_ijk: Sequence[float], axis: int, shape_ijk: Sequence[int]) -> int:
    """The slice (rounded voxel index along ``axis``) that an IJK point lies on.

    Raises:
        GeometryError: the point is outside the volume along ``axis``.
    """
    value = int(np.floor(float(point_ijk[axis]) + 0.5))
    if not 0 <= value < int(shape_ijk[axis]):
        raise GeometryError(
            f"the prompt lies outside the volume ({AXIS_NAMES[axis]} slice {value}, "
            f"volume has 0..{int(shape_ijk[axis]) - 1})"
        )
    return value


def _snap(value: float, tolerance: float = 1e-6) -> float:
    """Round away matrix round-off: a click on voxel 30 must send 30, not 29.999999999999996."""
    nearest = float(np.floor(value + 0.5))
    return nearest if abs(value - nearest) < tolerance else float(value)


def plane_xy(point_ijk: Sequence[float], axis: int) -> tuple[float, float]:
    """(X, Y) of an IJK point on a slice along ``axis`` (samadapt's slice coordinates)."""
    x_axis, y_axis = in_plane_axes(axis)
    return _snap(float(point_ijk[x_axis])), _snap(float(point_ijk[y_axis]))


def _clip_xy(x: float, y: float, axis: int, shape_ijk: Sequence[int]) -> tuple[float, float]:
    x_axis, y_axis = in_plane_axes(axis)
    return (
        float(min(max(x, 0.0), shape_ijk[x_axis] - 1)),
        float(min(max(y, 0.0), shape_ijk[y_axis] - 1)),
    )


def box_from_corners(
    corner_a_ijk: Sequence[float], corner_b_ijk: Sequence[float], axis: int, shape_ijk: Sequence[int]
) -> tuple[float, float, float, float]:
    """The (X0, Y0, X1, Y1) slice box spanned by two IJK corners, sorted and clipped to the slice.

    Raises:
        GeometryError: the box lies entirely outside the slice or is empty after clipping.
    """
    ax, ay = plane_xy(corner_a_ijk, axis)
    bx, by = plane_xy(corner_b_ijk, axis)
    x_axis, y_axis = in_plane_axes(axis)
    lo_x, hi_x, lo_y, hi_y = min(ax, bx), max(ax, bx), min(ay, by), max(ay, by)
    if hi_x < 0 or hi_y < 0 or lo_x > shape_ijk[x_axis] - 1 or lo_y > shape_ijk[y_axis] - 1:
        raise GeometryError("the box lies outside the volume")
    x0, y0 = _clip_xy(lo_x, lo_y, axis, shape_ijk)
    x1, y1 = _clip_xy(hi_x, hi_y, axis, shape_ijk)
    if x1 <= x0 or y1 <= y0:
        raise GeometryError("the box is empty on this slice; draw it in the view you prompt on")
    return x0, y0, x1, y1


def roi_corners(center: Sequence[float], size: Sequence[float], object_to_world: Any = None) -> np.ndarray:
    """The 8 world corners of a markups ROI (``GetCenter``/``GetSize`` in ROI coordinates).

    Args:
        center: ROI centre in the ROI's object frame (world when ``object_to_world`` is None).
        size: edge lengths along the ROI's axes (mm).
        object_to_world: ``roiNode.GetObjectToWorldMatrix()`` for a rotated ROI.

    Returns:
        (8, 3) RAS corners.
    """
    c = np.asarray(center, dtype=np.float64).reshape(3)
    half = np.asarray(size, dtype=np.float64).reshape(3) / 2.0
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    corners = c + signs * half
    if object_to_world is not None:
        corners = np.array([_apply(object_to_world, p) for p in corners])
    return corners


def box_from_roi(
    corners_ras: np.ndarray,
    ijk_to_ras: Any,
    axis: int,
    shape_ijk: Sequence[int],
    current_slice: int | None = None,
    world_to_local: Any = None,
) -> tuple[int, tuple[float, float, float, float]]:
    """The prompt slice and slice box of an ROI.

    The ROI's IJK bounding box gives the in-plane box; the slice is ``current_slice`` when the ROI
    covers it (the slice the user is looking at), otherwise the ROI's middle slice along ``axis`` (what
    ``samadapt segment --roi`` does).

    Returns:
        (slice index, (X0, Y0, X1, Y1)).
    """
    ijk = np.array([ras_to_ijk(ijk_to_ras, p, world_to_local) for p in np.asarray(corners_ras)])
    lower, upper = ijk.min(axis=0), ijk.max(axis=0)
    low = max(0, int(np.floor(lower[axis] + 0.5)))
    high = min(int(shape_ijk[axis]) - 1, int(np.floor(upper[axis] + 0.5)))
    if high < low:
        raise GeometryError("the ROI lies outside the volume")
    if current_slice is not None and low <= current_slice <= high:
        index = int(current_slice)
    else:
        index = (low + high) // 2
    return index, box_from_corners(lower, upper, axis, shape_ijk)


def view_for_point(
    point_ras: Sequence[float], slice_to_ras_by_view: dict[str, Any], tolerance_mm: float = 0.5
) -> str | None:
    """The slice view whose plane holds a world point (where a markup was placed), or None.

    Views are tried in the dictionary's order; the nearest plane within ``tolerance_mm`` wins.
    """
    p = np.asarray(point_ras, dtype=np.float64).reshape(3)
    best, best_distance = None, tolerance_mm
    for name, matrix in slice_to_ras_by_view.items():
        m = as_matrix(matrix)
        normal = m[:3, 2] / np.linalg.norm(m[:3, 2])
        distance = abs(float(normal @ (p - m[:3, 3])))
        if distance <= best_distance and (best is None or distance < best_distance):
            best, best_distance = name, distance
    return best


@dataclass
class Prompt:
    """One prompt on one slice, in the coordinates samadapt's server and CLI use.

    Attributes:
        axis: samadapt axis name (``axial`` = array axis k, ``coronal`` = j, ``sagittal`` = i).
        slice_index: voxel index along that axis.
        box: (X0, Y0, X1, Y1) on the slice, or None.
        points: [(X, Y), ...] on the slice.
        point_labels: 1 foreground / 0 background, one per point.
    """

    axis: str
    slice_index: int
    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)

    def to_request(self) -> dict[str, Any]:
        """Keyword arguments for ``client.prompt(session_id, **request, label=...)``."""
        return {
            "axis": self.axis,
            "slice_index": int(self.slice_index),
            "box": None if self.box is None else [float(v) for v in self.box],
            "points": [[float(x), float(y)] for x, y in self.points] or None,
            "point_labels": [int(v) for v in self.point_labels] or None,
        }

    def cli_args(self) -> list[str]:
        """The equivalent ``samadapt segment VOLUME`` arguments (for docs, logs and parity tests)."""
        args = ["--axis", self.axis, "--slice", str(self.slice_index)]
        if self.box is not None:
            args += ["--box", *(f"{v:g}" for v in self.box)]
        for (x, y), label in zip(self.points, self.point_labels, strict=True):
            args += ["--point", f"{x:g}", f"{y:g}", str(label)]
        return args


def prompt_from_markups(
    ijk_to_ras: Any,
    shape_ijk: Sequence[int],
    slice_to_ras: Any,
    points_ras: Sequence[Sequence[float]] = (),
    point_labels: Sequence[int] = (),
    box_corners_ras: Sequence[Sequence[float]] | None = None,
    world_to_local: Any = None,
    slice_value: int | None = None,
    current_slice: int | None = None,
) -> Prompt:
    """Turn markups placed in a slice view into a :class:`Prompt`.

    The slicing axis comes from the view's orientation; the slice from ``slice_value``, else from the
    last point, else (a box alone) the view's ``current_slice`` when the box covers it, else the box's
    middle slice. Points on other slices are dropped, and so is a box that does not cover the prompt's
    slice: a prompt is one slice.

    Args:
        ijk_to_ras: the volume's IJKToRAS.
        shape_ijk: volume dimensions (I, J, K) (``imageData.GetDimensions()``).
        slice_to_ras: the view's SliceToRAS.
        points_ras: world positions of the control points.
        point_labels: 1 foreground / 0 background per point.
        box_corners_ras: world corners (2 or 8) of a box/ROI, or None.
        world_to_local: optional world -> volume-local transform.
        slice_value: force this slice index.
        current_slice: the slice the view shows (used for a box without points).

    Raises:
        GeometryError: oblique view, prompt outside the volume, or nothing to send.
    """
    if len(points_ras) != len(point_labels):
        raise GeometryError("give one label (foreground/background) per point")
    axis = slice_axis(slice_to_ras, ijk_to_ras, world_to_local)
    points_ijk = [ras_to_ijk(ijk_to_ras, p, world_to_local) for p in points_ras]
    box = None
    box_span: tuple[int, int] | None = None
    if box_corners_ras is not None and len(box_corners_ras):
        corners = np.asarray(box_corners_ras, dtype=np.float64)
        if slice_value is None and not points_ijk:
            slice_value, box = box_from_roi(
                corners, ijk_to_ras, axis, shape_ijk, current_slice, world_to_local
            )
        else:
            ijk = np.array([ras_to_ijk(ijk_to_ras, p, world_to_local) for p in corners])
            box = box_from_corners(ijk.min(axis=0), ijk.max(axis=0), axis, shape_ijk)
            box_span = (
                int(np.floor(ijk[:, axis].min() + 0.5)),
                int(np.floor(ijk[:, axis].max() + 0.5)),
            )
    if slice_value is None:
        if not points_ijk:
            raise GeometryError("place a point or a box first")
        slice_value = slice_index(points_ijk[-1], axis, shape_ijk)
    index = int(slice_value)
    if not 0 <= index < int(shape_ijk[axis]):
        raise GeometryError(f"slice {index} is outside the volume (0..{int(shape_ijk[axis]) - 1})")
    if box_span is not None and not box_span[0] <= index <= box_span[1]:
        box = None  # the box was drawn on another slice
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    for p, label in zip(points_ijk, point_labels, strict=True):
        if int(np.floor(p[axis] + 0.5)) != index:
            continue
        x, y = plane_xy(p, axis)
        x_axis, y_axis = in_plane_axes(axis)
        if not (-0.5 <= x <= shape_ijk[x_axis] - 0.5 and -0.5 <= y <= shape_ijk[y_axis] - 0.5):
            raise GeometryError("a point lies outside the volume")
        points.append(_clip_xy(x, y, axis, shape_ijk))
        labels.append(1 if int(label) else 0)
    if box is None and not points:
        raise GeometryError("no point or box on this slice")
    return Prompt(AXIS_NAMES[axis], index, box, points, labels)
