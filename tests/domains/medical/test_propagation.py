"""Slice propagation: slice geometry per axis, stopping rules, re-prompting, caching (fake predictor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samadapt.domains.medical.propagation import (
    Roi,
    SlicePrompt,
    VolumeSegmenter,
    combine_labels,
    mask_box,
    plane_size,
    put_slice,
    slice_image,
)
from samadapt.errors import InputError
from samadapt.predictor import ImageEmbedding, Prediction
from samadapt.preprocess import LITEMEDSAM_PROFILE


class FakePredictor:
    """Segments a fixed 3D ball: the mask is the ball's cross-section inside the prompt box."""

    profile = LITEMEDSAM_PROFILE

    def __init__(self, ball: np.ndarray, axis: str) -> None:
        self.ball, self.axis = ball, axis
        self.embedded: list[int] = []

    def embed(self, images, batch_size: int = 8, propagation: bool = False):
        out = []
        for image in images:
            index = int(image[0, 0])  # the test encodes the slice index in pixel (0, 0)
            self.embedded.append(index)
            out.append(ImageEmbedding(torch.tensor([index]), image.shape, image.shape))
        return out

    def predict(self, *, boxes=None, point_coords=None, point_labels=None, embedding=None, **_):
        index = int(embedding.embedding[0])
        section = slice_image(self.ball, self.axis, index)
        mask = np.zeros_like(section)
        if boxes is not None:
            x0, y0, x1, y1 = (round(float(v)) for v in boxes)
            mask[y0 : y1 + 1, x0 : x1 + 1] = section[y0 : y1 + 1, x0 : x1 + 1]
        else:
            mask = section.copy()
        return Prediction(mask[None, None], np.ones((1, 1)), torch.zeros(1, 1, 4, 4))


def _ball(shape=(40, 36, 30), centre=(20, 18, 15), radius=9.0) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    return dist <= radius


def _index_volume(shape, axis: str) -> np.ndarray:
    """Image whose pixel (0, 0) of every slice holds that slice's index."""
    image = np.zeros(shape, dtype=np.float32)
    for k in range(shape[{"sagittal": 0, "coronal": 1, "axial": 2}[axis]]):
        plane = np.zeros(plane_size(shape, axis), dtype=np.float32)
        plane[0, 0] = k
        put_slice(image, axis, k, plane)
    return image


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_slice_image_follows_ijk_and_round_trips(axis: str) -> None:
    array = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    image = slice_image(array, axis, 2)
    assert image.shape == plane_size(array.shape, axis)
    # X is the first in-plane voxel axis, Y the second
    if axis == "axial":
        assert image[3, 1] == array[1, 3, 2]
    elif axis == "coronal":
        assert image[4, 1] == array[1, 2, 4]
    else:
        assert image[4, 3] == array[2, 3, 4]
    copy = np.zeros_like(array)
    put_slice(copy, axis, 2, image)
    assert np.array_equal(slice_image(copy, axis, 2), image)


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_propagation_recovers_a_ball_and_stops_where_it_vanishes(axis: str) -> None:
    ball = _ball()
    fake = FakePredictor(ball, axis)
    seg = VolumeSegmenter(fake, _index_volume(ball.shape, axis), axis, batch_size=4)  # type: ignore[arg-type]
    centre_index = {"sagittal": 20, "coronal": 18, "axial": 15}[axis]
    box = mask_box(slice_image(ball, axis, centre_index), 0)
    result = seg.segment(SlicePrompt(centre_index, box))
    assert np.array_equal(result, ball)
    # embeddings are computed once per slice, a few batches ahead at most
    assert len(fake.embedded) == len(set(fake.embedded))
    assert (
        len(fake.embedded)
        <= int(
            ball.any(
                axis=tuple(a for a in range(3) if a != {"sagittal": 0, "coronal": 1, "axial": 2}[axis])
            ).sum()
        )
        + 8
    )


def test_roi_limits_propagation_and_in_plane_extent() -> None:
    ball = _ball()
    fake = FakePredictor(ball, "axial")
    seg = VolumeSegmenter(fake, _index_volume(ball.shape, "axial"), "axial")  # type: ignore[arg-type]
    roi = Roi.from_values([0, 0, 12, 20, 35, 17], ball.shape)
    result = seg.segment(SlicePrompt(15, (0, 0, 39, 35)), roi)
    assert result[:, :, :12].sum() == 0 and result[:, :, 18:].sum() == 0
    assert result[21:].sum() == 0
    assert np.array_equal(result[:21, :, 12:18], ball[:21, :, 12:18])
    with pytest.raises(InputError, match="outside --roi"):
        seg.segment(SlicePrompt(25, (10, 10, 30, 28)), roi)


def test_reprompt_only_touches_one_side_and_reuses_embeddings() -> None:
    ball = _ball()
    fake = FakePredictor(ball, "axial")
    seg = VolumeSegmenter(fake, _index_volume(ball.shape, "axial"), "axial")  # type: ignore[arg-type]
    first = seg.segment(SlicePrompt(15, (11, 9, 29, 27)))
    embedded = len(fake.embedded)
    # shrink the object from slice 18 upwards with a tighter box: slices below 18 must not change
    corrected = seg.reprompt(first, SlicePrompt(18, (15, 14, 25, 22)), direction=1)
    assert np.array_equal(corrected[:, :, :18], first[:, :, :18])
    assert corrected[:, :, 18:].sum() < first[:, :, 18:].sum()
    assert not corrected[:14, :, 18:].any()
    assert len(fake.embedded) == embedded


def test_bad_prompts() -> None:
    ball = _ball()
    seg = VolumeSegmenter(FakePredictor(ball, "axial"), _index_volume(ball.shape, "axial"), "axial")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="outside the volume"):
        seg.segment(SlicePrompt(30, (1, 1, 5, 5)))
    with pytest.raises(InputError, match="box or at least one point"):
        seg.segment(SlicePrompt(3))
    with pytest.raises(InputError, match="outside the volume"):
        Roi.from_values([50, 50, 50, 60, 60, 60], ball.shape)


def test_combine_labels_keeps_the_first_object_on_overlap() -> None:
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[:2], b[1:] = True, True
    labels = combine_labels([(3, a), (7, b)], a.shape)
    assert labels.dtype == np.uint8
    assert (labels[:2] == 3).all() and (labels[2:] == 7).all()
    assert combine_labels([(300, a)], a.shape).dtype == np.uint16


def test_mask_box_margin_is_clipped() -> None:
    mask = np.zeros((10, 12), bool)
    mask[2:5, 0:3] = True
    assert mask_box(mask, 2.0) == (0.0, 0.0, 4.0, 6.0)
    assert mask_box(np.zeros((3, 3), bool), 1.0) is None
