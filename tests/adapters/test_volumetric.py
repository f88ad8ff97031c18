"""The volumetric (3DSAM) adapter: design counts, exact pieces, shapes, prompts, save/load, a smoke fit."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import samadapt
import samadapt.adapter
import samadapt.errors
from samadapt.adapter import get_adapter_type, load_adapter, save_adapter
from samadapt.adapters.volumetric import VolumetricAdapter, sample_points_3d, trainable_groups
from samadapt.adapters.volumetric_blocks import VolumetricEncoder, shift_mask
from samadapt.modeling import PromptBatch
from samadapt.weights import checkpoint_sha256

DESIGN_TRAINABLE = 25_462_400  # medical.md appendix A: 15,209,984 + 3,164,160 + 7,088,256
SIDE = 32  # tiny volumes: 32^3 at scale 2 -> 4^3 tokens


def tiny_adapter(**overrides: object) -> VolumetricAdapter:
    args: dict = dict(
        scale=2.0, grid_depth=4, window=2, neck_chans=16, head_chans=8, prompt_heads=2,
        prompt_mlp_dim=32, global_tokens=4, positive_points=3, negative_points=2,
    )  # fmt: skip
    args.update(overrides)
    return VolumetricAdapter(**args)  # type: ignore[arg-type]


def tiny_model(adapter: VolumetricAdapter, seed: int = 0) -> samadapt.SamModel:
    torch.manual_seed(seed)
    model = samadapt.build("tiny")
    adapter.attach(model)
    adapter.freeze_base(model)
    return model


def blob_masks(count: int = 2) -> torch.Tensor:
    masks = torch.zeros(count, 1, SIDE, SIDE, SIDE)
    masks[0, :, 8:20, 10:22, 5:15] = 1
    if count > 1:
        masks[1, :, 2:9, 20:30, 18:30] = 1
    return masks


# ------------------------------------------------------------------ design arithmetic
def test_vit_b_counts_match_the_design_arithmetic() -> None:
    with torch.device("meta"):  # shapes only: nothing allocated
        model = samadapt.build("sam_vit_b")
        adapter = VolumetricAdapter()
        adapter.attach(model)
    groups = trainable_groups(adapter)
    assert groups["encoder"] == 15_209_984  # adapters, LNs, depth/slice embeddings, rel_pos_d, necks
    assert groups["decoder"] == 7_088_256
    assert groups["prompt_encoder"] == 3_164_160 + 512  # + the point-label embedding (2 x 256)
    counts = adapter.parameter_counts(model)
    assert counts["trainable"] == sum(groups.values()) == 25_462_912
    assert abs(counts["trainable"] - DESIGN_TRAINABLE) / DESIGN_TRAINABLE < 0.05
    # frozen: ViT-B without its 2D neck and 2D LayerNorms; SAM's prompt encoder/decoder are replaced
    assert counts["frozen"] == 89_670_912 - 787_456 - 36_864 == 88_846_592


def test_registered_as_volumetric() -> None:
    assert get_adapter_type("volumetric") is VolumetricAdapter


def test_refuses_cores_without_vit_blocks_and_2d_prompts() -> None:
    with torch.device("meta"):
        lite = samadapt.build("lite_medsam")
    with pytest.raises(samadapt.adapter.AdapterError, match="needs a SAM ViT"):
        VolumetricAdapter().attach(lite)
    model = tiny_model(tiny_adapter())
    with pytest.raises(samadapt.adapter.AdapterError, match="3D points only"):
        model.forward_batch(torch.randn(1, 1, SIDE, SIDE, SIDE), PromptBatch(boxes=torch.zeros(1, 4)))
    with pytest.raises(samadapt.adapter.AdapterError, match=r"\(P, N, 3\) points"):
        two_d = PromptBatch(points=torch.zeros(1, 1, 2), point_labels=torch.ones(1, 1))
        model.forward_batch(torch.randn(1, 1, SIDE, SIDE, SIDE), two_d)


# ------------------------------------------------------------------ exact pieces
def test_fused_embedding_equals_patch_embedding_per_slice_then_slice_embedding() -> None:
    adapter = tiny_adapter()
    model = tiny_model(adapter)
    encoder = model.image_encoder
    assert isinstance(encoder, VolumetricEncoder)
    with torch.no_grad():
        adapter.encoder.slice_embed.weight.normal_()  # type: ignore[union-attr]
        adapter.encoder.slice_embed.bias.normal_()  # type: ignore[union-attr]
        volume = torch.randn(1, 1, SIDE, SIDE, SIDE)
        fused = encoder.embed(volume) - encoder.position_embedding((4, 4, 4))
        # the reference: upsample, repeat to 3 channels, 2D patch embedding slice by slice, slice conv
        up = F.interpolate(volume, scale_factor=2.0, mode="trilinear").repeat(1, 3, 1, 1, 1)
        slices = up[0].permute(3, 0, 1, 2)  # (S2', 3, S0', S1')
        per_slice = encoder.patch_embed(slices)  # (S2', g0, g1, D)
        stacked = per_slice.permute(3, 1, 2, 0)[None]  # (1, D, g0, g1, S2')
        reference = adapter.encoder.slice_embed(stacked).permute(0, 2, 3, 4, 1)  # type: ignore[union-attr]
    assert fused.shape == (1, 4, 4, 4, 32)
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)


def _dense_attention_with_3d_rel_pos(block, x: torch.Tensor) -> torch.Tensor:
    """Naive global attention with the 3D decomposed bias built entry by entry."""
    attn = block.attn
    _, g0, g1, g2, dim = x.shape
    qkv = attn.qkv(x.reshape(1, -1, dim)).reshape(1, -1, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    tables = [
        F.interpolate(t.T[None], size=2 * g - 1, mode="linear")[0].T
        for t, g in zip((attn.rel_pos_h, attn.rel_pos_w, block.rel_pos_d), (g0, g1, g2), strict=True)
    ]
    coords = list(itertools.product(range(g0), range(g1), range(g2)))
    bias = torch.zeros(1, attn.num_heads, len(coords), len(coords))
    for a, (x0, y0, z0) in enumerate(coords):
        for b, (x1, y1, z1) in enumerate(coords):
            r = tables[0][x0 - x1 + g0 - 1] + tables[1][y0 - y1 + g1 - 1] + tables[2][z0 - z1 + g2 - 1]
            bias[0, :, a, b] = (q[0, :, a] * r).sum(-1)
    weights = torch.softmax(q @ k.transpose(-1, -2) / attn.head_dim**0.5 + bias, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(1, g0, g1, g2, dim)
    return attn.proj(out)


def test_window_attention_is_dense_attention_with_3d_relative_positions() -> None:
    adapter = tiny_adapter(window=4)  # one 4^3 window covers the 4^3 token grid: no shift
    model = tiny_model(adapter)
    block = model.image_encoder.blocks[1]  # type: ignore[index]
    with torch.no_grad():
        for table in (block.attn.rel_pos_h, block.attn.rel_pos_w, block.rel_pos_d):
            table.normal_(0, 0.5)
        x = torch.randn(1, 4, 4, 4, 32)
        torch.testing.assert_close(
            block.attention(x), _dense_attention_with_3d_rel_pos(block, x), atol=1e-4, rtol=1e-4
        )


def test_shift_mask_separates_wrapped_regions() -> None:
    mask = shift_mask((4, 4, 4), 2, 1, torch.device("cpu"))
    assert mask.shape == (8, 8, 8)
    assert torch.all(mask[0] == 0)  # the first window holds one region
    last = mask[-1]  # the corner window mixes 2^3 wrapped regions: each token sees only itself
    assert torch.equal(last == 0, torch.eye(8, dtype=torch.bool))


# ------------------------------------------------------------------ prompts and loss
def test_training_points_come_from_the_labels() -> None:
    masks = blob_masks()
    masks = torch.cat([masks, torch.zeros(1, 1, SIDE, SIDE, SIDE)])  # a crop without the object
    points, labels = sample_points_3d(masks, 5, 7, torch.Generator().manual_seed(0))
    assert points.shape == (3, 12, 3) and labels.shape == (3, 12)
    for p in range(2):
        idx = points[p].long()
        values = masks[p, 0, idx[:, 0], idx[:, 1], idx[:, 2]]
        assert torch.all(values[:5] == 1) and torch.all(values[5:] == 0)
        assert torch.all(labels[p, :5] == 1) and torch.all(labels[p, 5:] == 0)
    assert torch.all(labels[2, :5] == -1) and torch.all(labels[2, 5:] == 0)  # no object: padding


def test_dice_ce_equals_the_two_class_softmax_form() -> None:
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    two = torch.randn(2, 2, 8, 8, 8)
    targets = (torch.rand(2, 1, 8, 8, 8) > 0.6).float()
    reference = DiceCELoss(
        include_background=False, softmax=True, to_onehot_y=True, lambda_dice=0.5, lambda_ce=0.5
    )
    ours = tiny_adapter().loss(two[:, 1:] - two[:, :1], torch.zeros(2, 1), targets)["loss"]
    torch.testing.assert_close(ours, reference(two, targets), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ model
def test_tiny_forward_backward_trains_only_the_adapter() -> None:
    adapter = tiny_adapter()
    model = tiny_model(adapter)
    counts = adapter.parameter_counts(model)
    assert counts == {"adapter": 69_512, "trainable": 69_512, "frozen": 44_192}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(
        ".attn." in n or ".mlp." in n or "patch_embed" in n or "pos_embed" in n for n in frozen
    )
    masks = blob_masks()
    volumes = torch.randn(2, 1, SIDE, SIDE, SIDE)
    prompts = adapter.simulate_prompts(masks, torch.Generator().manual_seed(1))
    model.train()
    logits, iou = model.forward_batch(volumes, prompts)
    assert logits.shape == (2, 1, SIDE, SIDE, SIDE) and iou.shape == (2, 1)
    loss = adapter.loss(logits, iou, masks)["loss"]
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    missing = [n for n, p in adapter.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing  # every trainable parameter is in the graph (DDP needs that)
    optimiser = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    optimiser.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_points_steer_the_mask() -> None:
    adapter = tiny_adapter()
    model = tiny_model(adapter).eval()
    volume = torch.randn(1, 1, SIDE, SIDE, SIDE)
    one = torch.tensor([[[10.0, 12.0, 8.0]]])
    other = torch.tensor([[[25.0, 3.0, 28.0]]])
    with torch.no_grad():
        a = model.forward_batch(volume, PromptBatch(points=one, point_labels=torch.ones(1, 1)))[0]
        b = model.forward_batch(volume, PromptBatch(points=other, point_labels=torch.ones(1, 1)))[0]
        c = model.forward_batch(volume, PromptBatch(points=one, point_labels=torch.zeros(1, 1)))[0]
        padded = PromptBatch(points=torch.cat([one, other], 1), point_labels=torch.tensor([[1.0, -1.0]]))
        d = model.forward_batch(volume, padded)[0]
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4
    torch.testing.assert_close(a, d, atol=1e-5, rtol=1e-5)  # a padding point changes nothing


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        adapter = tiny_adapter()
        model = tiny_model(adapter, seed=3)
        model.image_encoder.activation_checkpointing = checkpointing  # type: ignore[union-attr]
        model.train()
        torch.manual_seed(4)
        volumes, masks = torch.randn(1, 1, SIDE, SIDE, SIDE), blob_masks(1)
        prompts = adapter.simulate_prompts(masks, torch.Generator().manual_seed(0))
        logits, iou = model.forward_batch(volumes, prompts)
        adapter.loss(logits, iou, masks)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapter.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_save_and_reload_give_identical_outputs(tmp_path: Path) -> None:
    base = tmp_path / "tiny.pth"
    torch.manual_seed(0)
    samadapt.save_model(samadapt.build("tiny"), base)
    adapter = tiny_adapter()
    model = samadapt.load_model(base)
    adapter.attach(model)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    volume = torch.randn(1, 1, SIDE, SIDE, SIDE)
    prompts = PromptBatch(points=torch.tensor([[[10.0, 12.0, 8.0]]]), point_labels=torch.ones(1, 1))
    with torch.no_grad():
        expected = model.forward_batch(volume, prompts)[0]
    out = save_adapter(tmp_path / "vol", adapter, model, base_sha256=checkpoint_sha256(base))
    assert (out / "adapter.safetensors").stat().st_size < 4 * 80_000  # adapter-only: ~69.5k float32
    fresh = samadapt.load_model(base)
    loaded = load_adapter(out, fresh, base_sha256=checkpoint_sha256(base))
    assert isinstance(loaded, VolumetricAdapter) and loaded.init_args == adapter.init_args
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_batch(volume, prompts)[0], expected, atol=1e-6, rtol=1e-6)
    other = samadapt.load_model(base)
    other_adapter = copy.deepcopy(tiny_adapter())
    other_adapter.attach(other)
    other.eval()
    with torch.no_grad():
        assert (other.forward_batch(volume, prompts)[0] - expected).abs().max() > 1e-3  # weights matter


# ------------------------------------------------------------------ data and a smoke fit
def _write_case(root: Path, name: str, seed: int) -> None:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    image = rng.normal(0, 20, (40, 36, 30)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[10:24, 8:20, 6:18] = 2
    image[label == 2] += 120
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for folder, array in (("imagesTr", image), ("labelsTr", label)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), str(root / folder / f"{name}.nii.gz"))


@pytest.fixture
def volume_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i in range(3):
        _write_case(root, f"case{i}", i)
    return root


def test_data_module_gives_balanced_patches_at_the_target_spacing(volume_root: Path) -> None:
    from samadapt.domains.medical.volumetric_data import VolumetricDataModule

    data = VolumetricDataModule(
        root=str(volume_root), val_fraction=0.34, patch=(SIDE, SIDE, SIDE), spacing=(1.5, 1.5, 1.5),
        clip=(-100.0, 200.0), labels=[2], samples_per_volume=8, batch_size=4,
    )  # fmt: skip
    data.setup()
    assert data.train_set is not None and data.val_set is not None
    assert len(data.train_set.cases) == 2 and len(data.val_set.cases) == 1
    resampled = data.train_set.cases.volumes[0]["image"]
    assert resampled.shape == (1, 40, 36, 40)  # k: 30 slices of 2 mm -> 40 of 1.5 mm
    assert abs(float(resampled.mean())) < 0.1 and abs(float(resampled.std()) - 1) < 0.1  # z-scored
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == batch["mask"].shape == (4, 1, SIDE, SIDE, SIDE)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    val = next(iter(data.val_dataloader()))
    assert val["mask"][:, 0, SIDE // 2, SIDE // 2, SIDE // 2].eq(1).all()  # centred on the object


def test_training_patches_get_intensity_augmentation_validation_patches_do_not(volume_root: Path) -> None:
    from samadapt.domains.medical.volumetric_data import VolumePatches, VolumetricDataModule

    def module(shift: float, scale: float) -> VolumetricDataModule:
        data = VolumetricDataModule(
            root=str(volume_root), val_fraction=0.34, patch=(SIDE, SIDE, SIDE), spacing=(1.5, 1.5, 1.5),
            labels=[2], intensity_shift=shift, intensity_scale=scale,
        )  # fmt: skip
        data.setup()
        return data

    plain, augmented = module(0.0, 0.0), module(0.5, 0.2)
    assert plain.train_set is not None and augmented.train_set is not None
    differ = 0
    for index in range(8):
        torch.manual_seed(index)  # the same crop in both (the crop seed comes from torch)
        a = plain.train_set[index]
        torch.manual_seed(index)
        b = augmented.train_set[index]
        torch.testing.assert_close(a["mask"], b["mask"])  # same patch, labels untouched
        inside = a["image"] != a["image"].min()
        # an affine map of the intensities: b = a * (1 + f) + o for one factor f and offset o per patch
        fit = np.polyfit(a["image"][inside].numpy(), b["image"][inside].numpy(), 1)
        assert 0.8 - 1e-4 <= fit[0] <= 1.2 + 1e-4 and abs(fit[1]) <= 0.5 * 1.2 + 1e-3
        differ += not torch.equal(a["image"], b["image"])
    assert differ >= 4  # applied with probability 0.8 each
    assert augmented.val_set is not None and augmented.val_set.augment is None  # validation stays as is
    assert isinstance(augmented.val_set, VolumePatches)


def test_one_object_patches_target_one_label_value_not_the_union(tmp_path: Path) -> None:
    import nibabel as nib

    from samadapt.domains.medical.volumetric_data import VolumetricDataModule

    root = tmp_path / "organs"
    rng = np.random.default_rng(0)
    image = rng.normal(0, 20, (40, 36, 30)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[4:16, 6:18, 6:18] = 2  # two touching organs: the union is one blob, the objects are not
    label[16:30, 6:18, 6:18] = 5
    image[label == 2] += 120
    image[label == 5] += 60
    for folder, array in (("imagesTr", image), ("labelsTr", label)):
        (root / folder).mkdir(parents=True)
        nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0])), str(root / folder / "a.nii.gz"))
    data = VolumetricDataModule(
        root=str(root), val_fraction=0.0, patch=(SIDE, SIDE, SIDE), spacing=None, one_object=True,
        samples_per_volume=12, intensity_shift=0.0, intensity_scale=0.0,
    )  # fmt: skip
    data.setup()
    assert data.train_set is not None
    prepared = data.train_set.cases.volumes[0]
    z2 = float(prepared["image"][prepared["mask"] == 2].mean())
    z5 = float(prepared["image"][prepared["mask"] == 5].mean())
    middle = (z2 + z5) / 2  # organ 2 is 60 units brighter than organ 5 (noise sd 20)
    seen = set()
    for index in range(12):
        torch.manual_seed(index)
        patch = data.train_set[index]
        mask = patch["mask"] > 0
        assert set(patch["mask"].unique().tolist()) <= {0.0, 1.0}
        if mask.any():
            bright = float((patch["image"][mask] > middle).float().mean())
            assert bright > 0.85 or bright < 0.15  # one organ (noise: ~7% cross the middle); the union ~50%
            seen.add(2 if bright > 0.5 else 5)
    assert seen == {2, 5}  # both organs are trained as objects of their own


def test_smoke_fit_through_the_lightning_task(volume_root: Path, tmp_path: Path) -> None:
    import lightning as L

    from samadapt.domains.medical.volumetric_data import VolumetricDataModule
    from samadapt.training import SamTask

    base = tmp_path / "tiny.pth"
    torch.manual_seed(0)
    samadapt.save_model(samadapt.build("tiny"), base)
    task = SamTask(tiny_adapter(), base=str(base), lr=1e-3, activation_checkpointing=True)
    assert "trainable parameters 69,512" in task.parameter_report()
    before = {n: p.detach().clone() for n, p in task.adapter.named_parameters()}
    frozen = {n: p.detach().clone() for n, p in task.model.named_parameters() if not p.requires_grad}
    data = VolumetricDataModule(
        root=str(volume_root), val_fraction=0.0, patch=(SIDE, SIDE, SIDE), spacing=None, labels=[2],
        samples_per_volume=2, batch_size=2,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    assert trainer.global_step == 3
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and 0 < float(loss) < 2
    moved = [n for n, p in task.adapter.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)
    assert all(torch.equal(p, frozen[n]) for n, p in task.model.named_parameters() if n in frozen)
    out = task.export(tmp_path / "exported", {"steps": 3})
    fresh = samadapt.load_model(base)
    load_adapter(out, fresh, base_sha256=checkpoint_sha256(base))
    assert torch.equal(
        fresh.image_encoder.parts.depth_embed,  # type: ignore[union-attr]
        task.adapter.encoder.depth_embed,  # type: ignore[union-attr]
    )


# ------------------------------------------------------------------ whole-volume inference and the CLI
class _Threshold:
    """A stand-in model whose mask is "intensity above 0.5" of the prepared patch."""

    def forward_batch(self, images: torch.Tensor, prompts: PromptBatch, multimask_output: bool = False):
        assert prompts.points is not None and prompts.points.shape[-1] == 3
        assert torch.all(prompts.points >= 0) and torch.all(prompts.points < 32)  # patch frame
        return (images > 0.5).float() * 10 - 5, torch.zeros(1, 1)


def test_sliding_window_maps_clicks_and_keeps_the_grid() -> None:
    from samadapt.domains.medical.volume import Volume
    from samadapt.domains.medical.volumetric_inference import mm_to_voxel, segment_volume

    array = np.zeros((90, 44, 30), np.float32)
    array[10:30, 5:25, 8:20] = 100  # a bright box
    array[75:85, 30:40, 2:6] = 100  # another one, beyond every patch that holds the click
    affine = np.array([[-1.5, 0, 0, 10], [0, -1.5, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1]])  # not RAS
    volume = Volume(array, affine)
    common = dict(roi=(32, 32, 32), spacing=(1.5, 1.5, 1.5), clip=None, overlap=0.25)
    mask, prob = segment_volume(_Threshold(), volume, np.array([[20, 15, 14]]), np.array([1]), **common)
    assert mask.shape == prob.shape == array.shape and mask.dtype == np.uint8
    assert np.array_equal(mask, (array > 50) & (np.arange(90)[:, None, None] < 50))  # the clicked box only
    click_mm = (affine @ np.array([20, 15, 14, 1.0]))[:3]
    np.testing.assert_allclose(mm_to_voxel(click_mm[None], affine), [[20, 15, 14]], atol=1e-9)
    with pytest.raises(samadapt.errors.InputError, match="outside"):
        segment_volume(_Threshold(), volume, np.array([[95, 15, 14]]), np.array([1]), **common)
    with pytest.raises(samadapt.errors.InputError, match="positive"):
        segment_volume(_Threshold(), volume, np.array([[20, 15, 14]]), np.array([0]), **common)


def test_cli_segments_a_ct_from_a_click_and_keeps_its_geometry(tmp_path: Path) -> None:
    from samadapt.cli.volumetric import main, wants
    from samadapt.domains.medical.io import read_volume

    base = tmp_path / "tiny.pth"
    torch.manual_seed(0)
    samadapt.save_model(samadapt.build("tiny"), base)
    adapter = tiny_adapter(spacing=(3.0, 3.0, 3.0))
    model = samadapt.load_model(base)
    adapter.attach(model)
    folder = save_adapter(tmp_path / "vol", adapter, model, base_sha256=checkpoint_sha256(base))
    ct = Path(__file__).resolve().parents[1] / "data/totalsegmentator/example_ct_sm.nii.gz"
    out = tmp_path / "seg.nii.gz"
    argv = [str(ct), "--checkpoint", str(base), "--adapter", str(folder), "--point", "60", "50", "15",
            "--negative-point", "10", "10", "10", "-o", str(out), "--no-progress"]  # fmt: skip
    assert wants(argv) and not wants(["x.nii.gz", "--adapter", str(tmp_path)])
    assert main(argv) == 0
    source, result = read_volume(ct), read_volume(out)
    assert result.shape == source.shape == (122, 101, 30)
    np.testing.assert_allclose(result.affine, source.affine)
    assert set(np.unique(result.array).tolist()) <= {0, 1}
