"""Volume geometry: RAS affine <-> ITK LPS conversions, properties, require_3d, reorient_like."""

from __future__ import annotations

import numpy as np
import pytest

from samadapt.domains.medical import Volume, affine_from_lps, lps_from_affine, reorient_like, require_3d
from samadapt.errors import InputError


def test_lps_conversion_flips_x_and_y() -> None:
    direction = np.array(
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    )  # i -> +y(P), j -> +z, k -> +x(L)
    affine = affine_from_lps([0.5, 2.0, 3.0], [10.0, 20.0, 30.0], direction)
    expected = np.array(
        [[0.0, 0.0, -3.0, -10.0], [-0.5, 0.0, 0.0, -20.0], [0.0, 2.0, 0.0, 30.0], [0.0, 0.0, 0.0, 1.0]]
    )
    np.testing.assert_array_equal(affine, expected)
    spacing, origin, back = lps_from_affine(affine)
    np.testing.assert_allclose(spacing, [0.5, 2.0, 3.0])
    np.testing.assert_allclose(origin, [10.0, 20.0, 30.0])
    np.testing.assert_allclose(back, direction)
    # a flat row-major 9-tuple, as SimpleITK's GetDirection returns it, means the same matrix
    np.testing.assert_array_equal(
        affine_from_lps([0.5, 2.0, 3.0], [10, 20, 30], direction.reshape(-1)), affine
    )


def test_volume_properties(reference: Volume) -> None:
    aff = reference.affine
    np.testing.assert_allclose(reference.spacing, np.linalg.norm(aff[:3, :3], axis=0))
    np.testing.assert_allclose(reference.origin, aff[:3, 3])
    np.testing.assert_allclose(reference.direction @ np.diag(reference.spacing), aff[:3, :3])
    np.testing.assert_allclose(reference.direction.T @ reference.direction, np.eye(3), atol=1e-6)
    assert reference.shape == (7, 9, 5)
    with pytest.raises(InputError, match="differs from the volume grid"):
        reference.with_array(np.zeros((7, 9, 4)))


def test_singular_affine_is_an_input_error() -> None:
    vol = Volume(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="singular"):
        vol.lps_geometry()


def test_require_3d() -> None:
    assert require_3d(Volume(np.zeros((4, 4, 2)), np.eye(4))).shape == (4, 4, 2)
    with pytest.raises(InputError, match=r"single slice \(shape \(4, 4, 1\)\)"):
        require_3d(Volume(np.zeros((4, 4, 1)), np.eye(4)))


def test_reorient_like_permutes_and_flips_without_resampling(
    reference: Volume, label_array: np.ndarray
) -> None:
    vol = reference.with_array(label_array)
    # Same voxel centres, other storage order: axes (k, i, j) with i reversed.
    arr = np.transpose(label_array, (2, 0, 1))[:, ::-1, :]
    index_map = np.zeros((4, 4))  # new index (a, b, c) -> old index (i, j, k) = (6 - b, c, a)
    index_map[0, 1], index_map[0, 3] = -1, label_array.shape[0] - 1
    index_map[1, 2] = 1
    index_map[2, 0] = 1
    index_map[3, 3] = 1
    other = Volume(np.ascontiguousarray(arr), vol.affine @ index_map)
    back = reorient_like(other, vol)
    np.testing.assert_array_equal(back.array, label_array)
    np.testing.assert_allclose(back.affine, vol.affine)
    shifted = Volume(
        other.array, other.affine @ np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    )
    with pytest.raises(InputError, match="not on the same voxel grid"):
        reorient_like(shifted, vol)
