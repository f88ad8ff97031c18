"""Numerical parity with the reference implementations (CPU, fp32).

- ViT-B: our image encoder, prompt encoder and mask decoder against Meta's segment-anything with the same
  random weights (constant-initialised tensors such as rel_pos randomised so the test can fail).
- LiteMedSAM: our predictor against LiteMedSAM's own modelling code with the real weights on the
  sam_med2d slices, one tight box per mask.
"""

from __future__ import annotations

import numpy as np
import oracles
import pytest
import torch

import samadapt
from samadapt import Predictor
from samadapt.preprocess import LITEMEDSAM_PROFILE, preprocess

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # timm's deprecated import paths

ATOL_FP32 = 1e-4
LITE_LOGITS_ATOL = 1e-3
LITE_MASK_AGREEMENT = 0.999


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


# ------------------------------------------------------------------------------------- SAM ViT-B
@pytest.fixture(scope="module")
def vit_b():
    ours, reference = oracles.sam_vit_b_pair(seed=0)
    rel_pos = reference.image_encoder.blocks[0].attn.rel_pos_h
    assert rel_pos.abs().max() > 0, "rel_pos must be randomised or the parity test cannot fail"
    return ours, reference


@pytest.fixture(scope="module")
def vit_b_embeddings(vit_b):
    """Both encoders on one 1024 input (the slow part: ~15 s per forward on 2 CPU cores)."""
    ours, reference = vit_b
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return ours.image_encoder(x), reference.image_encoder(x)


def test_vit_b_image_encoder_matches_segment_anything(vit_b_embeddings):
    ours, reference = vit_b_embeddings
    assert ours.shape == (1, 256, 64, 64)
    assert max_abs(ours, reference) <= ATOL_FP32


def _prompts(kind: str, batch: int = 2):
    g = torch.Generator().manual_seed(2)
    points = (torch.rand(batch, 3, 2, generator=g) * 1024, torch.tensor([[1.0, 0.0, 1.0]] * batch))
    x0y0 = torch.rand(batch, 2, generator=g) * 500
    boxes = torch.cat([x0y0, x0y0 + 100 + torch.rand(batch, 2, generator=g) * 400], dim=1)
    masks = torch.randn(batch, 1, 256, 256, generator=g) * 5
    return {
        "points+box": {"points": points, "boxes": boxes, "masks": None},
        "points": {"points": points, "boxes": None, "masks": None},
        "box": {"points": None, "boxes": boxes, "masks": None},
        "mask": {"points": None, "boxes": None, "masks": masks},
        "points+mask": {"points": points, "boxes": None, "masks": masks},
    }[kind]


@pytest.mark.parametrize("kind", ["points+box", "points", "box", "mask", "points+mask"])
def test_vit_b_prompt_encoder_matches_segment_anything(vit_b, kind):
    ours, reference = vit_b
    prompts = _prompts(kind)
    with torch.inference_mode():
        sparse, dense = ours.prompt_encoder(**prompts)
        ref_sparse, ref_dense = reference.prompt_encoder(**prompts)
        assert (
            max_abs(ours.prompt_encoder.get_dense_pe(), reference.prompt_encoder.get_dense_pe()) <= ATOL_FP32
        )
    assert max_abs(sparse, ref_sparse) <= ATOL_FP32
    assert max_abs(dense, ref_dense) <= ATOL_FP32


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("kind", ["points+box", "points+mask"])
def test_vit_b_mask_decoder_matches_segment_anything(vit_b, multimask, kind):
    ours, reference = vit_b
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(3))
    prompts = _prompts(kind)
    with torch.inference_mode():
        sparse, dense = reference.prompt_encoder(**prompts)
        args = {
            "image_embeddings": embedding,
            "image_pe": reference.prompt_encoder.get_dense_pe(),
            "sparse_prompt_embeddings": sparse,
            "dense_prompt_embeddings": dense,
            "multimask_output": multimask,
        }
        logits, iou = ours.mask_decoder(**args)
        ref_logits, ref_iou = reference.mask_decoder(**args)
        # The whole prompt path through our SamModel.decode, too.
        dec_logits, dec_iou = ours.decode(
            embedding,
            points=prompts["points"],
            boxes=prompts["boxes"],
            mask_input=prompts["masks"],
            multimask_output=multimask,
        )
    assert logits.shape == (2, 3 if multimask else 1, 256, 256)
    assert max_abs(logits, ref_logits) <= ATOL_FP32
    assert max_abs(iou, ref_iou) <= ATOL_FP32
    assert max_abs(dec_logits, ref_logits) <= ATOL_FP32
    assert max_abs(dec_iou, ref_iou) <= ATOL_FP32


# ------------------------------------------------------------------------------ intermediate features
def test_tiny_forward_with_features_shapes_and_embedding():
    torch.manual_seed(0)
    model = samadapt.build("tiny").eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        embedding, features = model.image_encoder.forward_with_features(x, [0, 1])
        plain = model.image_encoder(x)
        reordered = model.encode(x, [1, 0])
    assert embedding.shape == (2, 32, 8, 8)
    assert [tuple(f.shape) for f in features] == [(2, 8, 8, 32), (2, 8, 8, 32)]
    assert not torch.equal(features[0], features[1])
    assert torch.equal(embedding, plain)
    assert torch.equal(reordered.embedding, plain)
    assert torch.equal(reordered.features[0], features[1])
    assert torch.equal(reordered.features[1], features[0])


# ------------------------------------------------------------------------------------ LiteMedSAM
@pytest.fixture(scope="module")
def lite():
    """Cases, our fp32 predictor and the reference, with every slice embedded once by both (~25 s)."""
    cases = oracles.load_sam_med2d()
    assert len(cases) == 30
    reference = oracles.lite_medsam_reference()
    predictor = Predictor(oracles.lite_medsam_ours(), device="cpu", precision="fp32")
    ours_emb, ref_emb = {}, {}
    for case in cases:
        if case.image_name not in ours_emb:
            ours_emb[case.image_name] = predictor.embed([case.image])[0]
            # The same input tensor for both: this compares the models, not the resize kernels
            # (test_preprocess_matches_official_cv2_resize covers those).
            ref_emb[case.image_name] = oracles.reference_embed(reference, case.image, resize="samadapt")
    return cases, predictor, reference, ours_emb, ref_emb


@pytest.mark.slow
def test_lite_medsam_embeddings_match_reference(lite):
    _, _, _, ours_emb, ref_emb = lite
    for name, ours in ours_emb.items():
        assert ours.resized_size == ref_emb[name].resized, name
        assert max_abs(ours.embedding, ref_emb[name].embedding) <= ATOL_FP32, name


@pytest.mark.slow
def test_lite_medsam_masks_match_reference(lite):
    cases, predictor, reference, ours_emb, ref_emb = lite
    failures = []
    for name, group in oracles.group_by_image(cases).items():
        boxes = np.stack([case.box for case in group]).astype(np.float64)  # (B, 4)
        ours = predictor.predict(boxes=boxes, embedding=ours_emb[name])
        embedded = ref_emb[name]
        # The boxes our predictor uses in the encoder frame (benchmarks/quality_2d.py compares the mapping).
        box256 = predictor.profile.boxes_to_input(boxes, embedded.original)
        ref_logits, ref_masks = oracles.reference_decode(reference, embedded, box256)
        for i, case in enumerate(group):
            logits_diff = max_abs(ours.low_res_logits[i], ref_logits[i])
            agreement = float((ours.masks[i, 0] == ref_masks[i]).mean())
            if logits_diff > LITE_LOGITS_ATOL or agreement < LITE_MASK_AGREEMENT:
                failures.append(f"{case.name}: logits diff {logits_diff:.2e}, mask agreement {agreement:.5f}")
    assert not failures, "\n".join(failures)


def test_preprocess_matches_official_cv2_resize():
    """Our LiteMedSAM input equals the official one (cv2.INTER_AREA on uint8, min-max, pad).

    Shrinking is exact; when enlarging, cv2's fixed-point weights round a few pixels the other way
    (one grey level on under 10% of the pixels of the one enlarged image).
    """
    cases = {c.image_name: c.image for c in oracles.load_sam_med2d()}
    for name, image in cases.items():
        ours, resized = preprocess(image, LITEMEDSAM_PROFILE)
        official, official_resized, _ = oracles.official_preprocess(image, resize="cv2-emu")
        assert resized == official_resized, name
        diff = (ours - official).abs()
        assert float(diff.max()) <= 1.0 / 250, name  # one grey level of an image spanning >= 250 levels
        assert float((diff > 1e-6).float().mean()) < 0.1, name


@pytest.mark.parametrize(
    ("ours_name", "ref_name"), [("sam_vit_b", "vit_b"), ("sam_vit_l", "vit_l"), ("sam_vit_h", "vit_h")]
)
def test_vit_variants_have_the_official_parameter_names_and_shapes(ours_name: str, ref_name: str) -> None:
    """Official SAM ViT-B/L/H checkpoints load strictly: same keys and shapes as segment-anything's."""
    from segment_anything import sam_model_registry

    from samadapt import build

    with torch.device("meta"):
        reference = sam_model_registry[ref_name]()
        ours = build(ours_name)
    ref_sig = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    our_sig = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_sig == ref_sig
