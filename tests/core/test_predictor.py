"""Predictor behaviour on the tiny random-weight core (fast) and on the real LiteMedSAM weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samadapt import InputError, Predictor, build, load_model
from samadapt.precision import resolve_precision
from samadapt.preprocess import LITEMEDSAM_PROFILE, SAM_PROFILE, preprocess
from samadapt.weights import verified_default_checkpoint


@pytest.fixture(scope="module")
def tiny_predictor() -> Predictor:
    torch.manual_seed(0)
    return Predictor(build("tiny"), precision="fp32")


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).integers(0, 255, (90, 130), dtype=np.uint8),
        np.random.default_rng(1).integers(0, 65535, (70, 50), dtype=np.uint16),
        np.random.default_rng(2).normal(size=(64, 64, 3)).astype(np.float32),
        np.random.default_rng(3).integers(0, 255, (40, 60, 4), dtype=np.uint8),
    ],
    ids=["gray-u8", "gray-u16", "rgb-float", "rgba"],
)
def test_masks_come_back_at_the_original_size(tiny_predictor: Predictor, image: np.ndarray) -> None:
    emb = tiny_predictor.set_image(image)
    height, width = image.shape[:2]
    assert emb.original_size == (height, width)
    result = tiny_predictor.predict(boxes=[2, 3, width - 5, height - 4])
    assert result.masks.shape == (1, 1, height, width)
    assert result.masks.dtype == bool
    assert result.scores.shape == (1, 1)
    assert result.low_res_logits.shape == (1, 1, 32, 32)


def test_many_boxes_points_and_multimask(tiny_predictor: Predictor) -> None:
    image = np.random.default_rng(0).integers(0, 255, (100, 120), dtype=np.uint8)
    tiny_predictor.set_image(image)
    boxes = np.array([[0, 0, 50, 50], [10, 20, 110, 90], [60, 10, 119, 99]])
    many = tiny_predictor.predict(boxes=boxes, multimask_output=True)
    assert many.masks.shape == (3, 3, 100, 120)
    # each box of a batch decodes exactly as it does alone
    single = tiny_predictor.predict(boxes=boxes[1], multimask_output=True)
    np.testing.assert_allclose(single.low_res_logits[0].numpy(), many.low_res_logits[1].numpy(), atol=1e-5)
    points = tiny_predictor.predict(point_coords=[[30, 40], [80, 70]], point_labels=[1, 0])
    assert points.masks.shape == (1, 1, 100, 120)


def test_mask_input_changes_the_decoding_under_identical_prompts(tiny_predictor: Predictor) -> None:
    """The same prompts with and without ``mask_input``: any difference is the mask input's doing."""
    image = np.random.default_rng(0).integers(0, 255, (100, 120), dtype=np.uint8)
    tiny_predictor.set_image(image)
    earlier = tiny_predictor.predict(point_coords=[[30, 40], [80, 70]], point_labels=[1, 0]).low_res_logits
    prompts = {"point_coords": [[30, 40]], "point_labels": [1], "boxes": [5, 5, 90, 90]}
    plain = tiny_predictor.predict(**prompts).low_res_logits
    assert torch.equal(plain, tiny_predictor.predict(**prompts).low_res_logits)  # deterministic
    refined = tiny_predictor.predict(**prompts, mask_input=earlier).low_res_logits
    assert not torch.allclose(refined, plain, atol=1e-4)
    # (B, H, W) is the same input as (B, 1, H, W); the decoder reads the mask's content, not its presence
    torch.testing.assert_close(
        tiny_predictor.predict(**prompts, mask_input=earlier[:, 0]).low_res_logits, refined
    )
    other = tiny_predictor.predict(**prompts, mask_input=-earlier).low_res_logits
    assert not torch.allclose(other, refined, atol=1e-4)


def test_prompt_coordinates_are_pixel_indexes(tiny_predictor: Predictor) -> None:
    """x runs 0..W-1 and y 0..H-1 (the last pixel's index), for points and box corners alike."""
    tiny_predictor.set_image(np.zeros((60, 80), dtype=np.uint8) + np.arange(80, dtype=np.uint8))
    assert tiny_predictor.predict(boxes=[0, 0, 79, 59]).masks.shape == (1, 1, 60, 80)
    assert tiny_predictor.predict(point_coords=[[79, 59], [0, 0]], point_labels=[1, 0]).masks.shape[0] == 1
    for kwargs in (
        {"boxes": [0, 0, 80, 59]},
        {"boxes": [0, 0, 79, 60]},
        {"point_coords": [[79.5, 10]], "point_labels": [1]},
        {"point_coords": [[10, 60]], "point_labels": [1]},
    ):
        with pytest.raises(InputError, match=r"outside the 80x60 image \(pixel indexes x 0..79, y 0..59\)"):
            tiny_predictor.predict(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"boxes": [50, 10, 20, 40]}, "reversed"),
        ({"boxes": [10, 10, 10, 40]}, "reversed"),
        ({"boxes": [-5, 10, 20, 40]}, "outside"),
        ({"boxes": [5, 10, 20, 400]}, "outside"),
        ({"point_coords": [[500, 10]], "point_labels": [1]}, "outside"),
        ({"boxes": [1, 2, 3]}, "x0 y0 x1 y1"),
        ({"point_coords": [[5, 10]], "point_labels": [1, 0]}, "one label per point"),
    ],
)
def test_bad_prompts_raise_input_errors(tiny_predictor: Predictor, kwargs, message: str) -> None:
    tiny_predictor.set_image(np.zeros((60, 80), dtype=np.uint8) + np.arange(80, dtype=np.uint8))
    with pytest.raises(InputError, match=message):
        tiny_predictor.predict(**kwargs)


def test_bad_images_raise_input_errors(tiny_predictor: Predictor) -> None:
    with pytest.raises(InputError, match="NaN"):
        tiny_predictor.set_image(np.full((10, 10), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="gray or RGB"):
        tiny_predictor.set_image(np.zeros((10, 10, 2)))


def test_precision_is_resolved_and_reported() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("bf16-partial", "fp32")  # tests/core/test_precision.py
    with pytest.raises(InputError):
        resolve_precision("fp16", cpu)
    with pytest.raises(InputError):
        resolve_precision("int8", cpu)


def test_preprocess_profiles() -> None:
    image = np.zeros((100, 200), dtype=np.uint16)
    image[10:20, 30:40] = 4000
    tensor, resized = preprocess(image, LITEMEDSAM_PROFILE)
    assert tensor.shape == (1, 3, 256, 256) and resized == (128, 256)
    assert float(tensor.max()) == pytest.approx(1.0) and float(tensor.min()) == 0.0
    assert float(tensor[..., 128:, :].abs().max()) == 0.0  # bottom padding
    tensor, resized = preprocess(image.astype(np.uint8), SAM_PROFILE)
    assert tensor.shape == (1, 3, 1024, 1024) and resized == (512, 1024)
    assert float(tensor[0, 0, 0, 0]) == pytest.approx(-123.675 / 58.395, rel=1e-5)


@pytest.mark.slow
def test_real_weights_bf16_agree_with_fp32() -> None:
    """The bf16 encoder path changes at most a sliver of the mask on a real CT slice."""
    from importlib import resources

    from samadapt.domains.images import read_image, read_mask

    assets = resources.files("samadapt.assets")
    image = read_image(assets / "demo_ct.png")
    truth = read_mask(assets / "demo_ct_liver.png")
    ys, xs = np.nonzero(truth)
    box = [xs.min(), ys.min(), xs.max(), ys.max()]
    model = load_model(verified_default_checkpoint())
    fp32 = Predictor(model, precision="fp32")
    fp32.set_image(image)
    reference = fp32.predict(boxes=box).masks[0, 0]
    dice = 2 * (reference & truth).sum() / (reference.sum() + truth.sum())
    assert dice > 0.9
    bf16 = Predictor(model, precision="bf16")
    assert bf16.precision == "bf16"
    bf16.set_image(image)
    fast = bf16.predict(boxes=box).masks[0, 0]
    assert (fast == reference).mean() > 0.995
