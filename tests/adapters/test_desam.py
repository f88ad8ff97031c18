"""DeSAM: prompt invariance of the mask, structure and counts, gradients, save -> load, predictor, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import REPO, run_samadapt, write_tiny_checkpoint

import samadapt
from samadapt import Predictor
from samadapt.adapter import REPLACES_DECODER, get_adapter_type, load_adapter, save_adapter
from samadapt.adapters.desam import PIMM, PRIM, DeSAM, DeSAMDecoder, grid_point_inference, point_grid
from samadapt.domains.images import read_image, read_mask
from samadapt.modeling import PromptBatch
from samadapt.weights import checkpoint_sha256

IMAGE = REPO / "tests" / "data" / "sam_med2d" / "images" / "amos_0006_90.png"


def _attached(variant: str = "tiny", seed: int = 0, **kwargs) -> tuple[samadapt.SamModel, DeSAM]:
    torch.manual_seed(seed)
    model = samadapt.build(variant).eval()
    adapter = DeSAM(**kwargs)
    adapter.attach(model)
    adapter.freeze_base(model)
    return model, adapter


def _point(x: float, y: float) -> PromptBatch:
    return PromptBatch(points=torch.tensor([[[x, y]]]), point_labels=torch.ones(1, 1))


@pytest.mark.parametrize("variant", ["tiny", "lite_medsam"])
def test_mask_is_prompt_invariant_by_construction_and_iou_is_not(variant: str) -> None:
    model, _ = _attached(variant)
    size = model.input_size
    image = torch.rand(1, 3, size, size)
    with torch.no_grad():
        encoded = model.encode(image)
        logits_a, iou_a = model.decode_prompts(encoded, _point(0.1 * size, 0.2 * size))
        logits_b, iou_b = model.decode_prompts(
            encoded,
            PromptBatch(
                points=torch.tensor([[[0.8 * size, 0.7 * size], [0.5 * size, 0.5 * size]]]),
                point_labels=torch.tensor([[1.0, 0.0]]),
                boxes=torch.tensor([[5.0, 5.0, 0.6 * size, 0.9 * size]]),
            ),
        )
        whole = torch.tensor([[0.0, 0.0, size - 1.0, size - 1.0]])  # the reference's "whole box" mode
        logits_c, iou_c = model.decode_prompts(encoded, PromptBatch(boxes=whole))
    grid = 4 * model.prompt_encoder.image_embedding_size[0]
    assert logits_a.shape == (1, 1, grid, grid) and iou_a.shape == (1, 1)
    assert torch.equal(logits_a, logits_b) and torch.equal(logits_a, logits_c)  # same mask
    assert (iou_a - iou_b).abs().item() > 1e-6 and (iou_a - iou_c).abs().item() > 1e-6  # other scores
    assert logits_a.std() > 0  # a real output, not a constant
    if variant == "tiny":  # and one that depends on the image
        with torch.no_grad():
            other = model.decode_prompts(model.encode(torch.rand(1, 3, size, size)), _point(3.0, 3.0))[0]
        assert not torch.equal(other, logits_a)


def test_reference_fusion_lets_the_prompt_reach_the_mask() -> None:
    """fusion="prim" is the reference wiring: PIMM fuses PRIM's prompt-updated tokens."""
    model, _ = _attached(fusion="prim")
    image = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        encoded = model.encode(image)
        a = model.decode_prompts(encoded, _point(10.0, 20.0))[0]
        b = model.decode_prompts(encoded, _point(100.0, 90.0))[0]
    assert (a - b).abs().max() > 1e-6


def test_structure_and_parameter_counts() -> None:
    model, adapter = _attached()
    assert REPLACES_DECODER in DeSAM.capabilities and get_adapter_type("desam") is DeSAM
    assert isinstance(model.mask_decoder, DeSAMDecoder) and model.mask_decoder is adapter.decoder
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for p in [*adapter.prim.parameters(), *adapter.pimm.parameters()]}
    assert trainable == expected  # exactly PRIM + PIMM, nothing of the encoders
    assert set(adapter.trainable_parameters(model)) == {f"adapter.{n}" for n, _ in adapter.named_parameters()}
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())
    counts = {}
    for variant in ("tiny", "lite_medsam", "sam_vit_b", "sam_vit_h"):
        with torch.device("meta"):
            base = samadapt.build(variant)
        desam = DeSAM()
        desam.attach(base)
        prim = sum(p.numel() for p in desam.prim.parameters())
        pimm = sum(p.numel() for p in desam.pimm.parameters())
        counts[variant] = (prim, pimm, desam.parameter_counts(base)["trainable"], base.feature_indexes)
        assert prim + pimm == counts[variant][2]
    print("DeSAM (PRIM, PIMM, trainable, feature indexes):", counts)
    # PRIM = SAM's decoder (4,058,340) minus the upscaling + hypernetworks (633,184) that DeSAM never calls
    assert counts["sam_vit_b"][0] == counts["lite_medsam"][0] == 4_058_340 - 633_184
    assert counts["sam_vit_b"][3] == (2, 5, 8) and counts["sam_vit_h"][3] == (7, 15, 23)  # as the reference
    assert counts["lite_medsam"][3] == (0, 1, 2)  # TinyViT stages 0-2
    # the reference's 13,815,204 on ViT-H = ours + 633,184 unused decoder heads + 24,704 unused PIMM convs
    assert counts["sam_vit_h"][2] == 13_815_204 - 633_184 - 24_704
    assert counts["sam_vit_b"][2] == 10_863_556 and counts["lite_medsam"][2] == 8_438_212


def test_prim_starts_from_sams_decoder() -> None:
    torch.manual_seed(0)
    model = samadapt.build("tiny")
    sam_decoder = model.mask_decoder
    adapter = DeSAM()
    adapter.attach(model)
    assert isinstance(adapter.prim, PRIM) and isinstance(adapter.pimm, PIMM)
    torch.testing.assert_close(adapter.prim.iou_token.weight, sam_decoder.iou_token.weight)
    for ours, theirs in zip(
        adapter.prim.transformer.parameters(), sam_decoder.transformer.parameters(), strict=True
    ):
        assert torch.equal(ours, theirs) and ours is not theirs


def test_gradients_reach_prim_and_pimm_not_the_encoder() -> None:
    model, adapter = _attached()
    model.train()
    masks = torch.zeros(4, 1, 128, 128)
    masks[:, :, 30:70, 40:90] = 1
    generator = torch.Generator().manual_seed(1)
    prompts = adapter.simulate_prompts(masks, generator)
    assert prompts.points is not None and prompts.point_labels is not None
    assert prompts.points.shape == (4, 1, 2) and (prompts.point_labels == 1).all()  # reference: always 1
    logits, iou = model.forward_batch(torch.rand(4, 3, 128, 128), prompts)
    terms = adapter.loss(logits, iou, masks)
    assert set(terms) == {"dice_ce", "iou_l1", "loss"}
    terms["loss"].backward()
    for name, p in adapter.named_parameters():
        assert p.grad is not None, name  # every PRIM and PIMM parameter is in the graph (DDP-safe)
    assert adapter.pimm.head.weight.grad.abs().sum() > 0
    assert adapter.prim.transformer.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert adapter.prim.iou_prediction_head.layers[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert all(p.grad is None for p in model.prompt_encoder.parameters())


def test_training_points_are_foreground_or_background_with_matching_iou_targets() -> None:
    adapter = DeSAM()
    masks = torch.zeros(200, 1, 64, 64)
    masks[:, :, 10:30, 20:50] = 1
    prompts = adapter.simulate_prompts(masks, torch.Generator().manual_seed(0))
    assert prompts.points is not None and adapter._iou_targets is not None
    xs, ys = prompts.points[:, 0, 0].long(), prompts.points[:, 0, 1].long()
    inside = masks[torch.arange(200), 0, ys, xs]
    assert torch.equal(inside, adapter._iou_targets[:, 0])  # target 1 exactly for points on the object
    assert 60 < int(inside.sum()) < 140  # about half each
    never = DeSAM(background_probability=0.0, background_label=0)
    prompts = never.simulate_prompts(masks)
    assert prompts.point_labels is not None and (prompts.point_labels == 1).all()


def test_grid_point_inference() -> None:
    model, _ = _attached()
    grid = point_grid(3, 90)
    assert grid[0].tolist() == [15.0, 15.0] and grid[-1].tolist() == [75.0, 75.0]
    images = torch.rand(2, 3, 128, 128)
    encoded = model.encode(images)
    result = grid_point_inference(model, encoded, grid=4, iou_threshold=-1e9, stability_threshold=-1.0)
    assert result.logits.shape == (2, 1, 32, 32) and result.iou.shape == (2,) and result.found.all()
    with torch.no_grad():
        single = model.decode_prompts(model.encode(images[1:]), _point(*result.points[1].tolist()))
    torch.testing.assert_close(result.logits[1:], single[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.iou[1:], single[1][:, 0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the chosen point has the best score of the whole grid
        everything = model.decode_prompts(
            model.encode(images[:1]),
            PromptBatch(points=point_grid(4, 128)[:, None], point_labels=torch.ones(16, 1)),
        )[1]
    assert torch.isclose(result.iou[0], everything.max(), atol=1e-5)
    nothing = grid_point_inference(model, encoded, grid=4, iou_threshold=1e9)
    assert not nothing.found.any()


# ---------------------------------------------------------------------------- files, predictor, CLI
@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    return write_tiny_checkpoint(tmp_path / "tiny.pth")


@pytest.fixture
def exported(tiny_base: Path, tmp_path: Path) -> Path:
    model = samadapt.load_model(tiny_base)
    adapter = DeSAM()
    adapter.attach(model)
    with torch.no_grad():
        for p in adapter.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    return save_adapter(tmp_path / "desam", adapter, model, base_sha256=checkpoint_sha256(tiny_base))


def test_save_then_load_gives_identical_outputs(tiny_base: Path, exported: Path, tmp_path: Path) -> None:
    config = json.loads((exported / "adapter.json").read_text())
    assert config["adapter_type"] == "desam" and config["parameters"]["trainable"] == 109_852
    image = torch.rand(1, 3, 128, 128)
    outputs = []
    for _ in range(2):
        model = samadapt.load_model(tiny_base)
        load_adapter(exported, model, base_sha256=checkpoint_sha256(tiny_base))
        model.eval()
        with torch.no_grad():
            outputs.append(model(image, points=(torch.tensor([[[40.0, 50.0]]]), torch.ones(1, 1))))
    plain = samadapt.load_model(tiny_base)
    reloaded = load_adapter(exported, plain, base_sha256=None)
    again = save_adapter(tmp_path / "again", reloaded, plain, base_sha256=checkpoint_sha256(tiny_base))
    assert (again / "adapter.safetensors").read_bytes() == (exported / "adapter.safetensors").read_bytes()
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


def test_predictor_and_segment_cli_run_with_a_desam_adapter(
    tiny_base: Path, exported: Path, tmp_path: Path
) -> None:
    model = samadapt.load_model(tiny_base)
    load_adapter(exported, model, base_sha256=checkpoint_sha256(tiny_base))
    predictor = Predictor(model, precision="fp32")
    predictor.set_image(read_image(IMAGE))
    first = predictor.predict(point_coords=[[60.0, 80.0]], point_labels=[1])
    second = predictor.predict(point_coords=[[200.0, 30.0]], point_labels=[1])
    np.testing.assert_array_equal(first.masks, second.masks)  # the click moves the score only
    assert first.scores.shape == (1, 1) and first.scores[0, 0] != second.scores[0, 0]
    out = tmp_path / "mask.png"
    proc = run_samadapt(
        "segment", IMAGE, "--point", "60", "80", "--checkpoint", tiny_base, "--adapter", exported,
        "--precision", "fp32", "-o", out, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "desam" in proc.stdout
    np.testing.assert_array_equal(read_mask(out), first.masks[0, 0])
