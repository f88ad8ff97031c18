"""Automatic mask generation: mechanics on the tiny core, agreement with segment-anything, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import write_tiny_checkpoint
from PIL import Image
from torchvision.ops import box_iou

from samadapt import Predictor, build
from samadapt.automatic import (
    AutomaticMaskGenerator,
    crop_boxes,
    masks_to_boxes,
    point_grid,
    remove_small_regions,
)
from samadapt.cli import main

ASSETS = Path(__file__).resolve().parents[2] / "core" / "assets"
TOTALSEG = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator" / "example_ct_sm.nii.gz"


def ct_slice() -> np.ndarray:
    return np.asarray(Image.open(ASSETS / "demo_ct.png").convert("RGB"))


@pytest.fixture(scope="module")
def tiny_predictor() -> Predictor:
    torch.manual_seed(0)
    return Predictor(build("tiny"), precision="fp32")


def loose(predictor: Predictor, **kwargs) -> AutomaticMaskGenerator:
    """Thresholds off: random weights predict low IoUs, and every candidate should reach the filters."""
    settings = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, **kwargs}
    return AutomaticMaskGenerator(predictor, **settings)


# ------------------------------------------------------------------------------------------ geometry
def test_grid_and_crops_match_segment_anything() -> None:
    from segment_anything.utils.amg import build_point_grid, generate_crop_boxes

    np.testing.assert_allclose(point_grid(5), build_point_grid(5))
    for size, layers in (((512, 512), 2), ((300, 717), 1)):
        boxes, layer_ids = generate_crop_boxes(size, layers, 512 / 1500)
        assert crop_boxes(size, layers, 512 / 1500) == list(zip(boxes, layer_ids, strict=True))


def test_masks_to_boxes_gives_edge_pixels_and_zeros_for_empty() -> None:
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    assert masks_to_boxes(masks).tolist() == [[3, 2, 8, 4], [0, 0, 0, 0]]


def test_remove_small_regions_fills_holes_and_drops_islands() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:30, 5:30] = True
    mask[10:12, 10:12] = False  # a 4-pixel hole
    mask[35:37, 35:37] = True  # a 4-pixel island
    filled, changed = remove_small_regions(mask, 10, "holes")
    assert changed and filled[10:12, 10:12].all() and filled[35:37, 35:37].all()
    cleaned, changed = remove_small_regions(filled, 10, "islands")
    assert changed and not cleaned[35:37, 35:37].any() and cleaned.sum() == 25 * 25
    same, changed = remove_small_regions(cleaned, 10, "islands")
    assert not changed and same is cleaned
    lone = np.zeros((20, 20), dtype=bool)
    lone[2:4, 2:4] = True
    lone[10:13, 10:13] = True
    kept, _ = remove_small_regions(lone, 100, "islands")  # all small: the largest stays
    assert kept.sum() == 9 and kept[10:13, 10:13].all()


# ------------------------------------------------------------------------------------------ mechanics
def test_points_decode_in_batches_one_decoder_call_each(tiny_predictor: Predictor) -> None:
    calls: list[int] = []
    hook = tiny_predictor.model.mask_decoder.register_forward_hook(
        lambda m, i, o: calls.append(o[0].shape[0])
    )
    try:
        result = loose(tiny_predictor, points_per_batch=20).generate(ct_slice())
        assert calls == [20, 20, 20, 4] and result.decoder_calls == 4
        calls.clear()
        result = loose(tiny_predictor, points_per_side=4, crop_n_layers=1).generate(ct_slice())
        assert calls == [16] * 5 and result.decoder_calls == 5  # the image and its 2 x 2 crops
    finally:
        hook.remove()


def test_nms_removes_duplicates(tiny_predictor: Predictor) -> None:
    image = ct_slice()
    everything = loose(tiny_predictor, box_nms_thresh=1.0).generate(image)
    kept = loose(tiny_predictor, box_nms_thresh=0.7).generate(image)
    assert len(everything) == 8 * 8 * 3  # no filter at all: every candidate of every point
    assert 0 < len(kept) < len(everything)
    boxes = torch.tensor(
        [[x, y, x + w, y + h] for x, y, w, h in (r.bbox for r in kept.records)], dtype=torch.float
    )
    overlaps = box_iou(boxes, boxes) - torch.eye(len(boxes))
    assert overlaps.max() <= 0.7


def test_min_area_leaves_no_small_islands(tiny_predictor: Predictor) -> None:
    from scipy import ndimage

    result = loose(tiny_predictor, min_mask_region_area=500).generate(ct_slice())
    assert len(result) > 0
    for mask in result.masks.numpy():
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel())[1:]
        assert count <= 1 or sizes.min() >= 500


def test_label_map_and_records_agree_and_json_is_valid(tiny_predictor: Predictor, tmp_path: Path) -> None:
    result = loose(tiny_predictor).generate(ct_slice())
    labels = result.label_map()
    assert labels.dtype == np.int32 and labels.shape == (512, 512)
    areas = [r.area for r in result.records]
    assert areas == sorted(areas, reverse=True)
    for n, record in enumerate(result.records):
        mask = result.masks[n].numpy()
        assert record.label == n + 1
        assert record.area == int(mask.sum())
        assert (labels == record.label).sum() <= record.area and mask[labels == record.label].all()
        x, y, w, h = record.bbox
        rows, cols = np.nonzero(mask)
        assert [x, y, x + w, y + h] == [cols.min(), rows.min(), cols.max(), rows.max()]
    assert set(np.unique(labels)) <= set(range(len(result) + 1))
    path = tmp_path / "masks.json"
    result.write_json(path)
    document = json.loads(path.read_text())
    assert len(document["masks"]) == len(result) and document["size"] == [512, 512]
    assert set(document["masks"][0]) >= {"label", "area", "bbox", "predicted_iou", "stability_score", "point"}


# ------------------------------------------------------------------------------------------ agreement
@pytest.mark.slow
def test_agrees_with_segment_anything_on_vit_b_with_identical_weights() -> None:
    """6 x 6 grid on the CT slice, random ViT-B weights copied into both. Random weights predict IoUs
    near 0.1, logits within +-1 and near-identical masks for every point, so NMS leaves one mask: the
    thresholds are off and, in a second run, NMS too. Every candidate of theirs (point, predicted IoU)
    has its twin in ours with the same predicted IoU and a mask IoU >= 0.9."""
    from segment_anything import SamAutomaticMaskGenerator

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from oracles import sam_vit_b_pair

    ours_model, reference = sam_vit_b_pair()
    image = ct_slice()
    predictor = Predictor(ours_model, precision="fp32")
    embedding = predictor.set_image(image)  # our encoder runs once; both NMS settings reuse it
    settings: dict[str, float] = {"points_per_side": 6, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    theirs_generator = SamAutomaticMaskGenerator(reference, **settings)
    # theirs gets our embedding: the two ViT-B encoders are compared on their own (test_parity.py's
    # test_vit_b_image_encoder_matches_segment_anything); here their point grid, decoder, filters and
    # NMS meet ours, without a second ViT-B pass at 1024 (half of this test's time)
    theirs_predictor = theirs_generator.predictor
    theirs_predictor.reset_image()
    theirs_predictor.original_size = image.shape[:2]
    theirs_predictor.input_size = tuple(theirs_predictor.transform.apply_image(image).shape[:2])
    theirs_predictor.features = embedding.embedding.clone()
    theirs_predictor.is_image_set = True
    theirs_generator.predictor.set_image = lambda *a, **k: None  # type: ignore[method-assign]
    theirs_generator.predictor.reset_image = lambda *a, **k: None  # type: ignore[method-assign]
    for nms in (0.7, 1.0):
        theirs_generator.box_nms_thresh = nms
        with torch.inference_mode():
            theirs = theirs_generator.generate(image)
        ours = AutomaticMaskGenerator(predictor, **settings, box_nms_thresh=nms).generate(
            image, embedding=embedding
        )
        assert len(ours) == len(theirs) and len(theirs) >= (1 if nms < 1 else 90)  # 36 points x 3 masks
        for record in theirs:
            if record["area"] == 0:
                continue
            twins = [
                n
                for n, r in enumerate(ours.records)
                if np.allclose(r.point, record["point_coords"][0], atol=1e-3)
                and abs(r.predicted_iou - record["predicted_iou"]) < 1e-3
            ]
            assert twins, record["point_coords"]
            mask = torch.as_tensor(record["segmentation"])
            best = max(
                float((ours.masks[n] & mask).sum() / (ours.masks[n] | mask).sum().clamp(min=1)) for n in twins
            )
            assert best >= 0.9


@pytest.mark.slow
def test_agrees_with_segment_anything_on_trained_lite_medsam_decoder_weights() -> None:
    """LiteMedSAM's real (trained) prompt encoder and mask decoder in segment-anything's Sam and in ours,
    one shared embedding of the CT slice, 8 x 8 grid, multimask output (theirs' only mode), thresholds off
    (LiteMedSAM's untrained multimask tokens pass none above 0), box NMS 0.7: the same masks are kept,
    and every one of theirs is found in ours at mask IoU >= 0.9 (benchmarks/amg_speed.py measures 16 x 16)."""
    from segment_anything import SamAutomaticMaskGenerator

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from oracles import lite_medsam_decoder_in_segment_anything

    from samadapt import load_model
    from samadapt.weights import verified_default_checkpoint

    predictor = Predictor(load_model(verified_default_checkpoint(), variant="lite_medsam"), precision="fp32")
    image = ct_slice()
    embedding = predictor.set_image(image)
    settings = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    theirs_generator = SamAutomaticMaskGenerator(lite_medsam_decoder_in_segment_anything(), **settings)
    state = theirs_generator.predictor  # holds our embedding; set_image must not run
    state.features, state.is_image_set = embedding.embedding, True
    state.original_size, state.input_size = embedding.original_size, embedding.resized_size
    state.set_image = lambda *a, **k: None  # type: ignore[method-assign]
    with torch.inference_mode():
        theirs = theirs_generator.generate(image)
    ours = AutomaticMaskGenerator(predictor, **settings).generate(image, embedding)
    assert len(ours) == len(theirs)
    masks = torch.stack([torch.as_tensor(r["segmentation"]) for r in theirs]).flatten(1).float()
    masks = masks[masks.sum(1) > 0]  # with the thresholds off, empty masks are kept too: they match nothing
    mine = ours.masks.flatten(1).float()
    mine = mine[mine.sum(1) > 0]
    assert masks.shape[0] >= 50 and mine.shape[0] == masks.shape[0]
    inter = mine @ masks.T
    union = mine.sum(1)[:, None] + masks.sum(1)[None, :] - inter
    best = (inter / union.clamp(min=1)).max(dim=0).values
    assert float((best >= 0.9).float().mean()) >= 0.95
    assert sorted(round(float(r["predicted_iou"]), 3) for r in theirs) == pytest.approx(
        sorted(round(r.predicted_iou, 3) for r in ours.records), abs=2e-3
    )


@pytest.mark.slow
def test_lite_medsam_needs_single_mask_and_lower_thresholds() -> None:
    """Real LiteMedSAM weights on the CT slice. LiteMedSAM was trained on boxes with the single-mask
    token: its multimask tokens are untrained and one point gives weak logits, so SAM's defaults keep
    nothing (docs/prompt_free.md); the single-mask token with lowered thresholds finds organ parts."""
    from samadapt import load_model
    from samadapt.weights import verified_default_checkpoint

    predictor = Predictor(load_model(verified_default_checkpoint(), variant="lite_medsam"), precision="fp32")
    image = ct_slice()
    embedding = predictor.set_image(image)
    assert len(AutomaticMaskGenerator(predictor, points_per_side=8).generate(image, embedding)) == 0
    lowered = AutomaticMaskGenerator(
        predictor,
        points_per_side=8,
        pred_iou_thresh=0.3,
        stability_score_thresh=0.5,
        stability_score_offset=0.5,
        multimask_output=False,
    )
    result = lowered.generate(image, embedding)
    assert len(result) >= 3
    liver = np.asarray(Image.open(ASSETS / "demo_ct_liver.png")) > 0
    masks = result.masks.numpy()
    inside = (masks & liver).sum((1, 2)) / masks.sum((1, 2))
    assert inside.max() > 0.5  # most of one mask lies in the liver


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")


LOOSE_FLAGS = [
    "--points-per-side",
    "6",
    "--pred-iou-thresh",
    "0",
    "--stability-thresh",
    "0",
    "--precision",
    "fp32",
]


def test_cli_auto_2d_writes_label_png_and_json(tiny_ckpt: Path, tmp_path: Path) -> None:
    out, records = tmp_path / "labels.png", tmp_path / "labels.json"
    argv = ["segment", str(ASSETS / "demo_ct.png"), "--auto", "-o", str(out), "--json", str(records)]
    assert main([*argv, "--checkpoint", str(tiny_ckpt), *LOOSE_FLAGS]) == 0
    labels = np.asarray(Image.open(out))
    document = json.loads(records.read_text())
    assert labels.shape == (512, 512) and labels.dtype in (np.uint8, np.uint16)
    assert labels.max() >= 1 and set(np.unique(labels)) <= set(range(len(document["masks"]) + 1))


def test_cli_auto_refuses_a_box_in_one_line(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.png"
    argv = ["segment", str(ASSETS / "demo_ct.png"), "--auto", "--box", "1", "1", "20", "20", "-o", str(out)]
    assert main([*argv, "--checkpoint", str(tiny_ckpt)]) != 0
    err = capsys.readouterr().err.strip()
    assert "--auto" in err and len(err.splitlines()) == 1
    assert not out.exists()


def _ct_crop(tmp_path: Path) -> tuple[Path, object]:
    from samadapt.domains.medical import Volume, read_volume, write_volume

    ct = read_volume(TOTALSEG)
    crop = Volume(ct.array[:, :, 14:17].copy(), ct.affine)
    path = tmp_path / "ct3.nii.gz"
    write_volume(path, crop.array, crop)
    return path, crop


def test_cli_auto_volume_keeps_shape_and_affine(tiny_ckpt: Path, tmp_path: Path) -> None:
    from samadapt.domains.medical import read_volume

    path, crop = _ct_crop(tmp_path)
    out = tmp_path / "auto.nii.gz"
    argv = [
        "segment",
        str(path),
        "--auto",
        "-o",
        str(out),
        "--no-progress",
        "--json",
        str(tmp_path / "v.json"),
    ]
    assert main([*argv, "--checkpoint", str(tiny_ckpt), *LOOSE_FLAGS]) == 0
    result = read_volume(out)
    assert result.shape == crop.shape  # type: ignore[attr-defined]
    np.testing.assert_allclose(result.affine, crop.affine, atol=1e-4)  # type: ignore[attr-defined]
    assert result.array.max() >= 1
    assert len(json.loads((tmp_path / "v.json").read_text())["slices"]) == crop.shape[2]  # type: ignore[attr-defined]


class _ConstantPrompts(torch.nn.Module):
    """A stand-in prompt generator: SAM's 'no prompt' embeddings for every image."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = [model]

    def forward(self, encoded):
        sparse, dense = self.model[0].embed_prompts()
        count = encoded.embedding.shape[0]
        return sparse.expand(count, -1, -1), dense.expand(count, -1, -1, -1)


def test_cli_auto_volume_with_a_prompt_generator_gives_one_3d_mask(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import samadapt.cli.automatic as automatic
    from samadapt.domains.medical import read_volume

    original = automatic.load_predictor

    def with_generator(args):
        predictor, described = original(args)
        predictor.model.prompt_generator = _ConstantPrompts(predictor.model)
        calls.append(1)
        return predictor, described

    calls: list[int] = []
    monkeypatch.setattr(automatic, "load_predictor", with_generator)
    path, crop = _ct_crop(tmp_path)
    out = tmp_path / "auto3d.nii.gz"
    argv = ["segment", str(path), "--auto", "-o", str(out), "--no-progress", "--checkpoint", str(tiny_ckpt)]
    assert main(argv) == 0 and calls
    result = read_volume(out)
    assert result.shape == crop.shape  # type: ignore[attr-defined]
    np.testing.assert_allclose(result.affine, crop.affine, atol=1e-4)  # type: ignore[attr-defined]
    assert set(np.unique(result.array)) <= {0, 1}
