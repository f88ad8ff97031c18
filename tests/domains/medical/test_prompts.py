"""Volume prompts: voxel and RAS-mm coordinates, per-object labels, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from samadapt.domains.medical import Volume
from samadapt.domains.medical.prompts import volume_prompts, world_to_voxel
from samadapt.errors import InputError

# 2 x 3 x 4 mm voxels, origin (10, 20, 30) mm: voxel (i, j, k) sits at (10 + 2i, 20 + 3j, 30 + 4k).
AFFINE = np.array([[2.0, 0, 0, 10], [0, 3.0, 0, 20], [0, 0, 4.0, 30], [0, 0, 0, 1]])
VOLUME = Volume(np.zeros((20, 16, 8), np.float32), AFFINE)


def test_voxel_prompts_keep_their_coordinates_and_default_labels() -> None:
    index, prompts = volume_prompts(
        VOLUME, "axial", boxes=[(1, 2, 5, 6), (8, 8, 12, 10)], points=[(3, 4, 1)], slice_value=3
    )
    assert index == 3
    assert [p.box for p in prompts] == [(1.0, 2.0, 5.0, 6.0), (8.0, 8.0, 12.0, 10.0)]
    assert [p.label for p in prompts] == [1, 2]
    assert prompts[0].points == [(3.0, 4.0, 1)] and prompts[1].points == []  # points go with object 1
    assert {p.slice_index for p in prompts} == {3}


def test_points_alone_make_one_object_with_the_given_label() -> None:
    _, prompts = volume_prompts(VOLUME, "coronal", points=[(3, 4, 1), (5, 5, 0)], slice_value=2, labels=[7])
    assert len(prompts) == 1 and prompts[0].box is None and prompts[0].label == 7
    assert prompts[0].points == [(3.0, 4.0, 1), (5.0, 5.0, 0)]


def test_millimetres_convert_to_voxels_and_boxes_are_reordered() -> None:
    np.testing.assert_allclose(world_to_voxel(AFFINE, 2, 14.0, 26.0, 42.0), [2.0, 2.0, 3.0])
    # axial: X = i (x mm), Y = j (y mm), slice k from z = 42 mm; a box given high-to-low comes out sorted
    index, prompts = volume_prompts(
        VOLUME, "axial", boxes=[(20.0, 35.0, 12.0, 26.0)], points=[(14.0, 29.0, 0)], slice_value=42.0, mm=True
    )
    assert index == 3
    assert prompts[0].box == pytest.approx((1.0, 2.0, 5.0, 5.0))
    assert prompts[0].points == [pytest.approx((2.0, 3.0, 0))]
    assert all(type(v) is float for v in prompts[0].box or ())


def test_millimetres_on_a_sagittal_slice() -> None:
    # sagittal (slice i): X = j (y mm), Y = k (z mm), slice from x mm
    index, prompts = volume_prompts(
        VOLUME, "sagittal", boxes=[(23.0, 34.0, 32.0, 46.0)], slice_value=20.0, mm=True
    )
    assert index == 5
    assert prompts[0].box == pytest.approx((1.0, 1.0, 4.0, 4.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"boxes": [(1, 1, 4, 4)], "slice_value": None}, "volumes need --slice K"),
        ({"boxes": [(1, 1, 4, 4)], "slice_value": None, "mm": True}, "--mm needs --slice given in mm too"),
        ({"boxes": [(1, 1, 4, 4)], "slice_value": 2.5}, "--slice must be a whole slice index, got 2.5"),
        (
            {"boxes": [(1, 1, 4, 4)], "slice_value": 8},
            "--slice 8 is outside the volume (8 axial slices, 0..7)",
        ),
        ({"boxes": [(4, 1, 1, 4)], "slice_value": 2}, "box is reversed or empty"),
        ({"boxes": [(1, 1, 20, 4)], "slice_value": 2}, "lies outside the 20x16 axial slice"),
        ({"points": [(3, 16, 1)], "slice_value": 2}, "point (3.0, 16.0) lies outside"),
        (
            {"boxes": [(1, 1, 4, 4)], "slice_value": 2, "labels": [1, 2]},
            "give one --label per --box (1), got 2",
        ),
        ({"boxes": [(1, 1, 4, 4)], "slice_value": 2, "labels": [0]}, "between 1 and 65535"),
    ],
)
def test_bad_prompts_raise_one_line_input_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError) as info:
        volume_prompts(VOLUME, "axial", **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_mm_refuses_a_volume_whose_axes_share_a_world_axis() -> None:
    sheared = np.array([[1.0, 1.0, 0, 0], [0.1, 0.2, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    with pytest.raises(InputError, match="distinct world axes"):
        volume_prompts(
            Volume(np.zeros((8, 8, 4)), sheared), "axial", boxes=[(1, 1, 2, 2)], slice_value=1, mm=True
        )


def test_points_go_with_the_box_point_boxes_names() -> None:
    _, prompts = volume_prompts(
        VOLUME,
        "axial",
        boxes=[(1, 2, 5, 6), (8, 8, 12, 10)],
        points=[(3, 4, 1), (10, 9, 1), (9, 9, 0)],
        point_boxes=[0, 1, 1],
        slice_value=3,
    )
    assert prompts[0].points == [(3.0, 4.0, 1)]
    assert prompts[1].points == [(10.0, 9.0, 1), (9.0, 9.0, 0)]
    with pytest.raises(InputError, match="not given"):
        volume_prompts(
            VOLUME, "axial", boxes=[(1, 2, 5, 6)], points=[(3, 4, 1)], point_boxes=[1], slice_value=3
        )


def test_voxel_coordinates_run_to_the_last_index() -> None:
    """X 0..W-1 and Y 0..H-1 on the 20x16 axial slice, as in the 2D predictor."""
    _, prompts = volume_prompts(VOLUME, "axial", boxes=[(0, 0, 19, 15)], points=[(19, 15, 0)], slice_value=0)
    assert prompts[0].box == (0.0, 0.0, 19.0, 15.0)
    for kwargs in ({"boxes": [(0, 0, 20, 15)]}, {"boxes": [(0, 0, 19, 16)]}, {"points": [(19.5, 3, 1)]}):
        with pytest.raises(
            InputError, match=r"outside the 20x16 axial slice \(voxel indexes X 0..19, Y 0..15\)"
        ):
            volume_prompts(VOLUME, "axial", slice_value=0, **kwargs)
