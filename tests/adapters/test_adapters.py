"""The built-in adapters: designs and parameter counts, equivalences, prompts, save -> load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import samadapt
from samadapt.adapter import AdapterError, get_adapter_type, load_adapter, save_adapter
from samadapt.adapters.common import jittered_boxes, mask_boxes, random_points
from samadapt.adapters.lora import LoRA, SplitQKV
from samadapt.adapters.medsam import MedSAMFineTune
from samadapt.adapters.msa import MedicalSAMAdapter
from samadapt.checkpoint import save_model
from samadapt.weights import checkpoint_sha256


def _vit_b() -> samadapt.SamModel:
    with torch.device("meta"):  # counts only: no memory, no init time
        return samadapt.build("sam_vit_b")


def test_lora_rank_4_on_vit_b_qkv_has_samed_count() -> None:
    for targets in ("qkv", "qv"):
        model = _vit_b()
        adapter = LoRA(rank=4, targets=targets)
        adapter.attach(model)
        counts = adapter.parameter_counts(model)
        assert counts["adapter"] == 147_456, targets
        assert counts["trainable"] == 147_456 and counts["frozen"] == 93_735_472


def test_msa_on_vit_b_has_the_reference_adapter_count() -> None:
    model = _vit_b()
    MedicalSAMAdapter(depth_adapter=True).attach(model)  # the reference builds 3 adapters per block
    adapter = MedicalSAMAdapter(depth_adapter=True)
    model = _vit_b()
    adapter.attach(model)
    counts = adapter.parameter_counts(model)
    assert counts["adapter"] == 10_651_392
    assert counts["mask_decoder"] == 4_058_340
    two_d = MedicalSAMAdapter()
    model = _vit_b()
    two_d.attach(model)
    assert two_d.parameter_counts(model)["adapter"] == 7_100_928  # space + MLP adapters, 2D


def test_medsam_roles() -> None:
    model = _vit_b()
    full = MedSAMFineTune()
    full.attach(model)
    assert full.parameter_counts(model)["trainable"] == 89_670_912 + 4_058_340  # MedSAM: all but the PE
    model = _vit_b()
    decoder = MedSAMFineTune(train_image_encoder=False)
    decoder.attach(model)
    assert decoder.parameter_counts(model)["trainable"] == 4_058_340


@pytest.mark.parametrize("variant", ["tiny", "lite_medsam"])
@pytest.mark.parametrize("targets", ["qkv", "qv"])
def test_lora_starts_as_identity_and_merges_exactly(variant: str, targets: str) -> None:
    torch.manual_seed(0)
    base = samadapt.build(variant).eval()
    image = torch.rand(1, 3, base.input_size, base.input_size)
    box = torch.tensor([[10.0, 12.0, 60.0, 70.0]])
    with torch.no_grad():
        reference = base(image, boxes=box)[0]
    model = copy.deepcopy(base)
    adapter = LoRA(rank=4, targets=targets, decoder_attention=True)
    adapter.attach(model)
    adapter.freeze_base(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # the peft layers, nothing else
    with torch.no_grad():
        torch.testing.assert_close(model(image, boxes=box)[0], reference, atol=1e-5, rtol=1e-5)  # B = 0
        for p in adapter.parameters():
            p.normal_(0, 0.05)
        adapted = model(image, boxes=box)[0]
        assert (adapted - reference).abs().max() > 1e-3
        assert adapter.merge(model)
        merged = model(image, boxes=box)[0]
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    assert all(type(m.qkv) is torch.nn.Linear for m in model.modules() if hasattr(m, "qkv_rows"))


@pytest.mark.parametrize("variant", ["tiny", "lite_medsam"])
def test_split_qkv_reproduces_the_fused_projection(variant: str) -> None:
    model = samadapt.build(variant)
    attn = next(m for m in model.image_encoder.modules() if hasattr(m, "qkv_rows"))
    split = SplitQKV(attn.qkv, {p: attn.qkv_rows(p) for p in "qkv"})
    x = torch.randn(2, 5, attn.qkv.in_features)
    torch.testing.assert_close(split(x), attn.qkv(x))
    torch.testing.assert_close(split.fused()(x), attn.qkv(x))


def test_msa_trains_adapters_and_decoder_only_and_the_depth_branch_learns() -> None:
    torch.manual_seed(0)
    model = samadapt.build("tiny").train()
    adapter = MedicalSAMAdapter(depth_adapter=True, depth=2)
    adapter.attach(model)
    adapter.freeze_base(model)
    masks = torch.zeros(4, 1, 128, 128)
    masks[:, :, 30:70, 40:90] = 1
    logits, iou = model.forward_batch(torch.rand(4, 3, 128, 128), adapter.simulate_prompts(masks))
    adapter.loss(logits, iou, masks)["loss"].backward()
    assert model.image_encoder.patch_embed.proj.weight.grad is None  # frozen
    for group in (adapter.space_adapters, adapter.mlp_adapters, adapter.depth_adapters):
        assert all(a.fc1.weight.grad.abs().sum() > 0 for a in group)
    assert model.mask_decoder.iou_prediction_head.layers[0].weight.grad is not None


def test_msa_depth_branch_needs_vit_blocks() -> None:
    with pytest.raises(AdapterError, match="ViT blocks"):
        MedicalSAMAdapter(depth_adapter=True, depth=2).attach(samadapt.build("lite_medsam"))


def test_prompt_simulation() -> None:
    masks = torch.zeros(3, 1, 64, 64)
    masks[0, 0, 10:20, 30:40] = 1
    masks[1, 0, 0:5, 0:64] = 1
    masks[2, 0, 40:41, 50:51] = 1
    tight = mask_boxes(masks)
    assert tight[0].tolist() == [30, 10, 39, 19] and tight[2].tolist() == [50, 40, 50, 40]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        boxes = jittered_boxes(masks, 5, generator)
        grow = (boxes - tight) * torch.tensor([-1, -1, 1, 1])
        clipped = (boxes == 0) | (boxes == 63)
        assert ((grow >= 0) & (grow <= 5) | clipped).all()  # outward, at most 5 px, inside the frame
        points, labels = random_points(masks, generator)
        xs, ys = points[:, 0, 0].long(), points[:, 0, 1].long()
        assert (masks[torch.arange(3), 0, ys, xs] == 1).all() and (labels == 1).all()
    background, labels = random_points(masks, generator, foreground=torch.tensor([False, False, False]))
    xs, ys = background[:, 0, 0].long(), background[:, 0, 1].long()
    assert (masks[torch.arange(3), 0, ys, xs] == 0).all() and (labels == 0).all()


# ---------------------------------------------------------------------------- save / load
@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.pth"
    save_model(samadapt.build("tiny"), path)
    return path


def _adapters() -> list[samadapt.adapter.Adapter]:
    return [
        LoRA(rank=2, targets="qv", decoder_attention=True),
        MedicalSAMAdapter(),
        MedSAMFineTune(train_image_encoder=False),
    ]


@pytest.mark.parametrize("index", range(3))
def test_save_then_load_gives_identical_outputs(tiny_base: Path, tmp_path: Path, index: int) -> None:
    adapter = _adapters()[index]
    model = samadapt.load_model(tiny_base)
    adapter.attach(model)
    with torch.no_grad():
        for p in adapter.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    image = torch.rand(1, 3, 128, 128)
    box = torch.tensor([[10.0, 10.0, 90.0, 100.0]])
    model.eval()
    with torch.no_grad():
        expected = model(image, boxes=box)
    out = save_adapter(tmp_path / "out", adapter, model, base_sha256=checkpoint_sha256(tiny_base))
    assert sorted(p.name for p in out.iterdir()) == ["adapter.json", "adapter.safetensors"]
    fresh = samadapt.load_model(tiny_base)
    loaded = load_adapter(out, fresh, base_sha256=checkpoint_sha256(tiny_base))
    assert type(loaded) is type(adapter)
    fresh.eval()
    with torch.no_grad():
        got = fresh(image, boxes=box)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)


def test_loading_refuses_bad_adapters(tiny_base: Path, tmp_path: Path) -> None:
    model = samadapt.load_model(tiny_base)
    adapter = LoRA()
    adapter.attach(model)
    out = save_adapter(tmp_path / "a", adapter, model, base_sha256=checkpoint_sha256(tiny_base))
    fresh = lambda: samadapt.load_model(tiny_base)  # noqa: E731
    with pytest.raises(AdapterError, match="another base checkpoint"):
        load_adapter(out, fresh(), base_sha256="0" * 64)
    with pytest.raises(AdapterError, match="lite_medsam"):
        load_adapter(out, samadapt.build("lite_medsam"), base_sha256=None)
    weights = out / "adapter.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        load_adapter(out, fresh(), base_sha256=None)
    weights.write_bytes(good)
    config = (out / "adapter.json").read_text()
    (out / "adapter.json").write_text(config.replace('"lora"', '"no_such_adapter"'))
    with pytest.raises(AdapterError, match="unknown adapter type 'no_such_adapter'"):
        load_adapter(out, fresh(), base_sha256=None)
    (out / "adapter.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(out, fresh(), base_sha256=None)
    (out / "adapter.json").write_text(config.replace('"rank": 4', '"rank": 8'))
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(out, fresh(), base_sha256=None)
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(tmp_path / "missing", fresh(), base_sha256=None)


def test_registry_knows_the_built_in_adapters() -> None:
    assert get_adapter_type("lora") is LoRA
    assert get_adapter_type("msa") is MedicalSAMAdapter
    assert get_adapter_type("medsam") is MedSAMFineTune
    with pytest.raises(AdapterError, match=r"installed: .*lora"):
        get_adapter_type("nope")


def test_lora_adapter_file_is_under_5_percent_of_litemedsam(tmp_path: Path) -> None:
    from samadapt.weights import verified_default_checkpoint

    base = verified_default_checkpoint()
    model = samadapt.load_model(base)
    adapter = LoRA(rank=4, decoder_attention=True)  # recipes/lora/litemedsam.yaml
    adapter.attach(model)
    out = save_adapter(tmp_path / "lora", adapter, model, base_sha256=checkpoint_sha256(base))
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size < 0.05 * base.stat().st_size, (size, base.stat().st_size)
