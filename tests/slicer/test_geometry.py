"""SamAdaptLib.geometry: RAS <-> IJK, slicing axis from a view, boxes; checked against samadapt's own
conventions on a real CT (nibabel's affine stands in for Slicer's IJKToRAS, a transposed array for
``slicer.util.arrayFromVolume``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from SamAdaptLib.geometry import (
    AXIS_NAMES,
    STANDARD_SLICE_TO_RAS,
    VIEW_ORIENTATIONS,
    GeometryError,
    Prompt,
    box_from_corners,
    box_from_roi,
    ijk_to_ras,
    prompt_from_markups,
    ras_to_ijk,
    roi_corners,
    slice_axis,
    view_for_point,
)

CT = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator" / "example_ct_sm.nii.gz"
MR = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator" / "example_mr_sm.nii.gz"


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [n for n in range(3) if n != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def _affine(rotation: np.ndarray, spacing=(0.8, 1.2, 3.0), origin=(-100.0, 20.0, 55.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def _view(orientation: str, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = STANDARD_SLICE_TO_RAS[orientation]
    m[:3, 3] = centre
    return m


ORIENTED = {
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "flipped-k": np.diag([1.0, 1.0, -1.0]),
    "oblique-5deg": _rotation(2, 5.0) @ _rotation(0, 5.0),
}


@pytest.mark.parametrize("name", sorted(ORIENTED))
def test_ras_ijk_round_trip(name: str) -> None:
    affine = _affine(ORIENTED[name])
    rng = np.random.default_rng(0)
    for ijk in rng.uniform(-5, 60, size=(20, 3)):
        ras = ijk_to_ras(affine, ijk)
        np.testing.assert_allclose(ras_to_ijk(affine, ras), ijk, atol=1e-9)
        np.testing.assert_allclose(ijk_to_ras(affine, ras_to_ijk(affine, ras)), ras, atol=1e-9)


def test_round_trip_through_parent_transform() -> None:
    affine = _affine(np.eye(3))
    local_to_world = _affine(_rotation(1, 30.0), spacing=(1, 1, 1), origin=(5.0, -7.0, 12.0))
    world_to_local = np.linalg.inv(local_to_world)
    ijk = np.array([10.0, 20.0, 5.0])
    world = local_to_world @ np.append(affine @ np.append(ijk, 1), 1)[:4]
    np.testing.assert_allclose(ras_to_ijk(affine, world[:3], world_to_local), ijk, atol=1e-9)
    np.testing.assert_allclose(ijk_to_ras(affine, ijk, world_to_local), world[:3], atol=1e-9)


@pytest.mark.parametrize("name", ["RAS", "LPS", "flipped-k"])
@pytest.mark.parametrize(("view", "expected"), [("Red", 2), ("Yellow", 0), ("Green", 1)])
def test_axis_of_standard_views_on_axial_volumes(name: str, view: str, expected: int) -> None:
    """Red/axial cuts k, Yellow/sagittal i, Green/coronal j for any axial acquisition, flips included."""
    affine = _affine(ORIENTED[name])
    axis = slice_axis(_view(VIEW_ORIENTATIONS[view]), affine)
    assert axis == expected
    assert AXIS_NAMES[axis] == {"Red": "axial", "Yellow": "sagittal", "Green": "coronal"}[view]


def test_axis_follows_the_voxel_grid_not_the_view_colour() -> None:
    """A sagittal acquisition (k runs left-right): the Red view cuts j, the Yellow view cuts k."""
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # i->A, j->S, k->R
    affine = _affine(sagittal)
    assert slice_axis(_view("Axial"), affine) == 1
    assert slice_axis(_view("Sagittal"), affine) == 2
    assert slice_axis(_view("Coronal"), affine) == 0


def test_axis_from_reformatted_view_matrix() -> None:
    """A view reformatted to the volume's own plane (slice-to-RAS from the volume) is not oblique."""
    rotation = _rotation(2, 5.0) @ _rotation(0, 5.0)
    affine = _affine(rotation)
    for axis in range(3):
        view = np.eye(4)
        x, y = [a for a in range(3) if a != axis]
        view[:3, 0], view[:3, 1], view[:3, 2] = rotation[:, x], rotation[:, y], -rotation[:, axis]
        assert slice_axis(view, affine) == axis
    with pytest.raises(GeometryError, match="oblique"):
        slice_axis(_view("Axial"), affine)  # the standard axial view is 7 degrees off this grid


def test_oblique_view_is_refused() -> None:
    view = np.eye(4)
    view[:3, :3] = _rotation(0, 10.0) @ STANDARD_SLICE_TO_RAS["Axial"]
    with pytest.raises(GeometryError, match="oblique"):
        slice_axis(view, _affine(np.eye(3)))
    assert slice_axis(view, _affine(np.eye(3)), tolerance_degrees=15.0) == 2


def test_box_from_corners_sorts_and_clips() -> None:
    shape = (50, 40, 10)
    assert box_from_corners([30, 5, 4], [10, 25, 4], 2, shape) == (10.0, 5.0, 30.0, 25.0)
    assert box_from_corners([-3, 5, 4], [60, 45, 4], 2, shape) == (0.0, 5.0, 49.0, 39.0)
    assert box_from_corners([3, 4, 2], [6, 9, 7], 1, shape) == (3.0, 2.0, 6.0, 7.0)  # coronal: X=i, Y=k
    assert box_from_corners([3, 4, 2], [6, 9, 7], 0, shape) == (4.0, 2.0, 9.0, 7.0)  # sagittal: X=j, Y=k
    with pytest.raises(GeometryError):
        box_from_corners([60, 50, 0], [70, 60, 0], 2, shape)


def test_box_from_roi_uses_view_slice_or_middle() -> None:
    affine = _affine(np.eye(3), spacing=(1, 1, 1), origin=(0, 0, 0))
    corners = roi_corners([20.0, 15.0, 5.0], [10.0, 8.0, 4.0])
    assert box_from_roi(corners, affine, 2, (50, 40, 12)) == (5, (15.0, 11.0, 25.0, 19.0))
    assert box_from_roi(corners, affine, 2, (50, 40, 12), current_slice=6)[0] == 6
    assert box_from_roi(corners, affine, 2, (50, 40, 12), current_slice=9)[0] == 5  # outside the ROI
    rotated = np.eye(4)
    rotated[:3, :3] = _rotation(2, 90.0)
    rotated[:3, 3] = [20.0, 15.0, 5.0]
    corners = roi_corners([0.0, 0.0, 0.0], [10.0, 8.0, 4.0], rotated)
    assert box_from_roi(corners, affine, 2, (50, 40, 12))[1] == (16.0, 10.0, 24.0, 20.0)


def test_view_for_point() -> None:
    views = {
        "Red": _view("Axial", (0, 0, 12.0)),
        "Yellow": _view("Sagittal", (-4.0, 0, 0)),
        "Green": _view("Coronal", (0, 7.5, 0)),
    }
    assert view_for_point([1.0, 2.0, 12.0], views) == "Red"
    assert view_for_point([-4.0, 2.0, 3.0], views) == "Yellow"
    assert view_for_point([1.0, 7.5, 3.0], views) == "Green"
    assert view_for_point([1.0, 2.0, 3.0], views) is None


def test_prompt_from_markups_points_box_and_slices() -> None:
    affine = _affine(np.diag([-1.0, -1.0, 1.0]), spacing=(2, 2, 3), origin=(50, 40, -10))
    shape = (40, 30, 12)
    at = lambda i, j, k: ijk_to_ras(affine, [i, j, k])  # noqa: E731
    prompt = prompt_from_markups(
        affine,
        shape,
        _view("Axial"),
        points_ras=[at(10, 12, 3), at(30, 5, 7), at(11, 14.4, 3.2)],
        point_labels=[1, 1, 0],
        box_corners_ras=[at(5, 6, 3), at(20, 25, 3)],
    )
    assert prompt.axis == "axial" and prompt.slice_index == 3
    np.testing.assert_allclose(prompt.points, [(10, 12), (11, 14.4)], atol=1e-9)  # (30, 5) is on slice 7
    assert prompt.point_labels == [1, 0]
    np.testing.assert_allclose(prompt.box, (5, 6, 20, 25), atol=1e-9)
    request = prompt.to_request()
    assert request["axis"] == "axial" and request["slice_index"] == 3 and len(request["points"]) == 2
    # a box drawn on another slice is not sent with points on this one
    other = prompt_from_markups(
        affine, shape, _view("Axial"), [at(10, 12, 3)], [1], [at(5, 6, 8), at(20, 25, 8)]
    )
    assert other.box is None and other.points
    with pytest.raises(GeometryError):
        prompt_from_markups(affine, shape, _view("Axial"), [at(10, 12, 30)], [1])
    with pytest.raises(GeometryError):
        prompt_from_markups(affine, shape, _view("Axial"))


def test_real_ct_slicer_ijk_is_samadapt_ijk() -> None:
    """On example_ct_sm.nii.gz: Slicer's [k, j, i] array transposed is read_volume's [i, j, k] array; a
    world point maps to the same voxel both ways; a box drawn in the Red view is `segment --box --slice`."""
    import nibabel as nib

    from samadapt.domains.medical import read_volume
    from samadapt.domains.medical.prompts import volume_prompts
    from samadapt.domains.medical.propagation import AXES

    assert {name: n for n, name in enumerate(AXIS_NAMES)} == AXES
    image = nib.load(str(CT))
    ijk_to_ras_matrix = image.affine  # what volumeNode.GetIJKToRASMatrix gives for this file
    slicer_array = np.asanyarray(image.dataobj).transpose(2, 1, 0)  # what arrayFromVolume gives ([k, j, i])
    volume = read_volume(CT)
    np.testing.assert_array_equal(volume.array, slicer_array.transpose(2, 1, 0))
    np.testing.assert_allclose(volume.affine, ijk_to_ras_matrix)
    i, j, k = 70, 40, 17
    ras = ijk_to_ras(ijk_to_ras_matrix, [i, j, k])
    got = np.round(ras_to_ijk(ijk_to_ras_matrix, ras)).astype(int)
    assert tuple(got) == (i, j, k)
    assert slicer_array[k, j, i] == volume.array[i, j, k]

    # a box drawn in the Red (axial) view whose plane passes through slice 17
    red = _view("Axial", ras)
    corners = [ijk_to_ras(ijk_to_ras_matrix, [30, 25, 17]), ijk_to_ras(ijk_to_ras_matrix, [90, 70, 17])]
    prompt = prompt_from_markups(
        ijk_to_ras_matrix, volume.shape, red, box_corners_ras=corners, current_slice=17
    )
    assert prompt == Prompt("axial", 17, (30.0, 25.0, 90.0, 70.0))
    assert prompt.cli_args() == ["--axis", "axial", "--slice", "17", "--box", "30", "25", "90", "70"]
    index, prompts = volume_prompts(volume, prompt.axis, boxes=[prompt.box], slice_value=prompt.slice_index)
    assert index == 17 and prompts[0].box == prompt.box
    # the same box given to the CLI in millimetres (--mm) lands on the same voxels
    mm_box = [corners[0][0], corners[0][1], corners[1][0], corners[1][1]]
    _, mm_prompts = volume_prompts(volume, "axial", boxes=[mm_box], slice_value=ras[2], mm=True)
    np.testing.assert_allclose(mm_prompts[0].box, prompt.box, atol=1e-6)


def test_real_mr_lps_views() -> None:
    """example_mr_sm.nii.gz is stored LPS (i runs to the left): the standard views still cut k, i, j."""
    import nibabel as nib

    affine = nib.load(str(MR)).affine
    assert [slice_axis(_view(VIEW_ORIENTATIONS[v]), affine) for v in ("Red", "Yellow", "Green")] == [2, 0, 1]
    ras = ijk_to_ras(affine, [20, 30, 10])
    prompt = prompt_from_markups(affine, (117, 91, 20), _view("Coronal", ras), [ras], [1])
    assert prompt.axis == "coronal" and prompt.slice_index == 30
    np.testing.assert_allclose(prompt.points, [(20, 10)])  # coronal: X = i, Y = k
