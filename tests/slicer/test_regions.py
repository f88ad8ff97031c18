"""SamAdaptLib.regions: decoding changed regions, writing them in Slicer ([k, j, i]) and samadapt
([i, j, k]) order, binary segment writes, and the local undo/redo history."""

from __future__ import annotations

import numpy as np
import pytest
from SamAdaptLib.regions import (
    PatchHistory,
    RegionError,
    apply_region,
    decode_region,
    encode_region,
    extent_ijk,
    region_labels,
)


def _sub() -> np.ndarray:
    sub = np.zeros((4, 3, 2), np.uint8)  # [i, j, k]
    sub[1:3, 0:2, 1] = 2
    sub[0, 2, 0] = 1
    return sub


def test_encode_decode_round_trip() -> None:
    region = encode_region((5, 6, 7), _sub(), label=2)
    offset, sub = decode_region(region)
    assert offset == (5, 6, 7)
    np.testing.assert_array_equal(sub, _sub())
    assert extent_ijk(region) == (5, 8, 6, 8, 7, 8)
    assert region_labels(region) == [1, 2]
    assert decode_region({"region": region})[0] == (5, 6, 7)  # a wrapped response


def test_matches_the_client_library_encoding() -> None:
    from SamAdaptLib import client

    sub = _sub()
    region = client.encode_region((1, 2, 3), sub.shape, sub.tobytes(), label=2)
    np.testing.assert_array_equal(decode_region(region)[1], sub)
    ours = encode_region((1, 2, 3), sub, 2)
    assert client.decode_region(ours)[2] == sub.tobytes()


def test_apply_in_both_orders_agrees() -> None:
    region = encode_region((5, 6, 7), _sub(), label=2)
    ijk = np.zeros((12, 10, 9), np.uint8)
    kji = np.zeros((9, 10, 12), np.uint8)
    apply_region(ijk, region, order="ijk")
    before = apply_region(kji, region, order="kji")
    np.testing.assert_array_equal(kji, ijk.transpose(2, 1, 0))
    assert before is not None and not before.any()
    assert ijk[6, 6, 8] == 2 and kji[8, 6, 6] == 2 and ijk[5, 8, 7] == 1


def test_binary_segment_write_replaces_the_box_only() -> None:
    segment = np.ones((9, 10, 12), np.uint8)  # [k, j, i], everything set
    apply_region(segment, encode_region((5, 6, 7), _sub(), 2), order="kji", label=2)
    assert segment.sum() == segment.size - (4 * 3 * 2) + 4  # the box now holds label 2's 4 voxels
    assert segment[0, 0, 0] == 1 and segment[8, 6, 6] == 1 and segment[7, 6, 5] == 0


def test_empty_region_is_a_no_op() -> None:
    array = np.zeros((3, 3, 3), np.uint8)
    assert apply_region(array, encode_region((0, 0, 0), np.zeros((0, 0, 0), np.uint8))) is None
    assert extent_ijk(encode_region((0, 0, 0), np.zeros((0, 0, 0), np.uint8))) is None


@pytest.mark.parametrize(
    "bad",
    [
        {"offset": [0, 0], "shape": [1, 1, 1], "data": ""},
        {
            "offset": [0, 0, 0],
            "shape": [2, 2, 2],
            "encoding": "zlib+base64",
            "data": encode_region((0, 0, 0), np.zeros((1, 1, 1), np.uint8))["data"],
        },
        {"offset": [0, 0, 0], "shape": [1, 1, 1], "encoding": "blosc", "data": ""},
        {"offset": [0, 0, 0], "shape": [1, 1, 1], "dtype": "float32", "data": ""},
        {"shape": [1, 1, 1]},
    ],
)
def test_malformed_regions_are_refused(bad: dict) -> None:
    with pytest.raises(RegionError):
        decode_region(bad)


def test_region_outside_the_array_is_refused() -> None:
    with pytest.raises(RegionError, match="does not fit"):
        apply_region(np.zeros((4, 4, 4), np.uint8), encode_region((3, 0, 0), _sub()), order="ijk")


def test_history_undo_redo() -> None:
    array = np.zeros((9, 10, 12), np.uint8)
    history = PatchHistory()
    first = encode_region((0, 0, 0), np.full((2, 2, 2), 1, np.uint8), 1)
    second = encode_region((1, 1, 1), np.full((3, 3, 3), 2, np.uint8), 2)
    history.record(array, first)
    after_first = array.copy()
    history.record(array, second)
    after_second = array.copy()
    assert history.can_undo and not history.can_redo and len(history) == 2
    history.undo(array)
    np.testing.assert_array_equal(array, after_first)
    history.undo(array)
    assert not array.any() and not history.can_undo
    assert history.undo(array) is None
    history.redo(array)
    history.redo(array)
    np.testing.assert_array_equal(array, after_second)
    assert history.redo(array) is None
    history.undo(array)
    history.record(array, first)  # a new change drops the redo branch
    assert not history.can_redo


def test_history_is_bounded_in_bytes() -> None:
    array = np.zeros((4, 4, 40), np.uint8)
    history = PatchHistory(max_bytes=3 * 2 * 64)  # three 4x4x4 patches (before + after)
    for n in range(6):
        history.record(array, encode_region((0, 0, 4 * n), np.full((4, 4, 4), n + 1, np.uint8)), order="ijk")
    assert len(history) == 3
