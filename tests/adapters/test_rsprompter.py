"""RsPrompter adapters (query and anchor): parameter counts, forward shapes, Hungarian matching on a known
case, the trainable set, save -> load, mask AP with known answers, learning on a toy scene, and a smoke fit of
each recipe on the solaris GeoTIFF with the tiny core."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, write_tiny_checkpoint

import samadapt
from samadapt.adapter import GENERATES_PROMPTS, REPLACES_DECODER, get_adapter_type, load_adapter, save_adapter
from samadapt.adapters.rsprompter import RsPrompterQuery, batch_instances
from samadapt.adapters.rsprompter_anchor import RsPrompterAnchor
from samadapt.adapters.rsprompter_heads import FeatureAggregator, layer_specs, sincos_tokens
from samadapt.adapters.rsprompter_matching import MaskAP, assign_anchors, hungarian_match, match_cost
from samadapt.errors import InputError

GEO = REPO / "tests" / "data" / "geo"
SMALL_QUERY = {"num_queries": 5, "tokens": 2, "layers": [0, 1], "hidden": 8, "heads": 2, "decoder_layers": 2}
SMALL_ANCHOR = {"tokens": 2, "layers": [0, 1], "hidden": 8}


def _attached(cls, **kwargs):
    torch.manual_seed(0)
    model = samadapt.build("tiny")
    adapter = cls(**kwargs)
    adapter.attach(model)
    adapter.freeze_base(model)
    return model, adapter


def _scene() -> dict[str, torch.Tensor]:
    """Two tiles, bright squares on a dark ground: image 0 holds two objects, image 1 one (+ padding)."""
    inst = torch.zeros(2, 2, 128, 128)
    inst[0, 0, 16:48, 16:48] = 1
    inst[0, 1, 64:112, 72:120] = 1
    inst[1, 0, 20:60, 70:110] = 1
    classes = torch.tensor([[0, 0], [0, -1]])
    image = (inst.amax(1, keepdim=True) * 0.8 + 0.1).expand(-1, 3, -1, -1).contiguous()
    return {
        "image": image,
        "instances": inst,
        "instance_classes": classes,
        "mask": inst.amax(1, keepdim=True),
    }


def test_registered_types_capabilities_and_counts_on_real_cores() -> None:
    assert get_adapter_type("rsprompter_query") is RsPrompterQuery
    assert get_adapter_type("rsprompter_anchor") is RsPrompterAnchor
    assert {GENERATES_PROMPTS, REPLACES_DECODER} <= RsPrompterQuery.capabilities
    expected = {
        ("lite_medsam", RsPrompterQuery): (7_027_650, (0, 1, 2, 3)),
        ("lite_medsam", RsPrompterAnchor): (7_009_032, (0, 1, 2, 3)),
        ("sam_vit_b", RsPrompterQuery): (7_182_658, (1, 3, 5, 7, 9, 11)),
        ("sam_vit_b", RsPrompterAnchor): (7_164_040, (1, 3, 5, 7, 9, 11)),
    }
    for (variant, cls), (own, layers) in expected.items():
        with torch.device("meta"):
            model = samadapt.build(variant)
            adapter = cls()
            adapter.attach(model)
        counts = adapter.parameter_counts(model)
        assert counts["adapter"] == own, (variant, cls.__name__, counts)
        assert counts["mask_decoder"] == 4_058_340  # SAM's decoder, trained as the reference's release branch
        assert counts["trainable"] == own + 4_058_340
        assert model.feature_indexes == layers  # every other ViT block; TinyViT stages 0-3


def test_aggregator_reads_each_layer_and_sincos_tokens() -> None:
    model = samadapt.build("tiny")
    specs = layer_specs(model.image_encoder, [0, 1])
    assert [(s.index, s.chans) for s in specs] == [(0, 32), (1, 32)]
    torch.manual_seed(0)
    agg = FeatureAggregator(specs, 32, hidden=8)
    feats = [torch.randn(2, 8, 8, 32), torch.randn(2, 8, 8, 32)]  # ViT (B, h, w, D)
    out = agg(feats, (8, 8))
    assert out.shape == (2, 32, 8, 8)
    changed = agg([feats[0], feats[1] + 1.0], (8, 8))
    assert not torch.allclose(out, changed)  # the second layer reaches the output
    raw = torch.tensor([[0.5, 2.0, 1.0, -1.0]])
    assert torch.allclose(
        sincos_tokens(raw), torch.tensor([[torch.sin(torch.tensor(0.5)) + 2.0, 0.8414710 - 1.0]])
    )


def test_hungarian_matching_recovers_a_known_assignment() -> None:
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0], [0.5, 9.0, 9.0]])
    rows, cols = hungarian_match(cost)
    assert rows.tolist() == [1, 2, 3] and cols.tolist() == [1, 2, 0]  # total 0 + 2 + 0.5, the optimum
    # masks: query q predicts object perm[q] exactly (large logits), queries 3 and 4 predict nothing
    masks = torch.zeros(3, 16, 16)
    masks[0, :5, :5] = 1
    masks[1, 8:, 8:] = 1
    masks[2, :4, 10:] = 1
    perm = [2, 0, 1]
    logits = torch.full((5, 16, 16), -8.0)
    for q, m in enumerate(perm):
        logits[q][masks[m] > 0] = 8.0
    class_logits = torch.zeros(5, 2)
    rows, cols = hungarian_match(match_cost(class_logits, logits, torch.zeros(3, dtype=torch.long), masks))
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == perm
    empty_rows, _ = hungarian_match(torch.zeros(5, 0))
    assert empty_rows.numel() == 0


def test_anchor_assignment_gives_every_object_a_positive_anchor() -> None:
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20], [50, 50, 60, 60], [100, 100, 140, 140]])
    boxes = torch.tensor([[1.0, 1, 19, 19], [48, 48, 52, 52]])  # the second overlaps no anchor >= 0.5
    assigned, _ = assign_anchors(anchors, boxes)
    assert assigned.tolist() == [-1, 0, 1, -1]


@pytest.mark.parametrize("cls,kwargs", [(RsPrompterQuery, SMALL_QUERY), (RsPrompterAnchor, SMALL_ANCHOR)])
def test_forward_shapes_trainable_set_and_gradients(cls, kwargs) -> None:
    model, adapter = _attached(cls, **kwargs)
    trainable = {id(p) for p in adapter.trainable_parameters(model).values()}
    assert {id(p) for p in adapter.parameters()} | {
        id(p) for p in model.mask_decoder.parameters()
    } == trainable
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    model.train()
    batch = _scene()
    logits, iou, targets = adapter.training_forward(model, batch)
    if cls is RsPrompterQuery:
        assert logits.shape == (3, 1, 32, 32) and targets.shape == (3, 1, 128, 128)  # 3 objects matched
        assert sorted(int(t.sum()) for t in targets) == [32 * 32, 40 * 40, 48 * 48]
    else:
        assert logits.shape[0] == targets.shape[0] >= 3  # ground-truth boxes + positive proposals
    assert iou.shape == (logits.shape[0], 1)
    terms = adapter.loss(logits, iou, targets)
    assert torch.isfinite(terms["loss"]) and terms["loss"] > 0
    terms["loss"].backward()
    missing = [n for n, p in adapter.trainable_parameters(model).items() if p.grad is None]
    assert not missing  # every trainable weight is used (DDP needs it)
    assert all(p.grad is None for p in model.image_encoder.parameters())
    model.eval()
    preds = adapter.predict_instances(model, batch["image"])
    assert len(preds) == 2
    for p in preds:
        assert p["masks"].dtype == torch.bool and p["masks"].shape[1:] == (128, 128)
        assert p["scores"].shape == p["labels"].shape == (p["masks"].shape[0],)


def test_query_generator_decodes_prompt_free_through_the_core() -> None:
    model, adapter = _attached(RsPrompterQuery, **SMALL_QUERY)
    model.eval()
    with torch.no_grad():
        encoded = model.encode(torch.rand(1, 3, 128, 128))
        logits, _ = model.decode_prompts(encoded, samadapt.modeling.PromptBatch())
        direct = adapter._run(model, encoded)[1]
    assert logits.shape == (5, 1, 32, 32)  # one mask per query
    assert torch.allclose(logits[:, 0], direct[0], atol=1e-5)


@pytest.mark.parametrize("cls,kwargs", [(RsPrompterQuery, SMALL_QUERY), (RsPrompterAnchor, SMALL_ANCHOR)])
def test_save_and_reload_give_the_same_instances(cls, kwargs, tmp_path: Path) -> None:
    model, adapter = _attached(cls, **kwargs)
    with torch.no_grad():
        for p in adapter.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    model.eval()
    image = _scene()["image"][:1]
    before = adapter.predict_instances(model, image)[0]
    save_adapter(tmp_path / "a", adapter, model, base_sha256="0" * 64)
    torch.manual_seed(0)
    fresh = samadapt.build("tiny")
    loaded = load_adapter(tmp_path / "a", fresh, base_sha256="0" * 64)
    assert type(loaded) is cls and loaded.init_args == adapter.init_args
    fresh.eval()
    after = loaded.predict_instances(fresh, image)[0]
    assert torch.equal(before["masks"], after["masks"]) and torch.allclose(before["scores"], after["scores"])


def test_mask_ap_known_answers() -> None:
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 2:12, 2:12] = True
    masks[1, 16:30, 10:28] = True
    labels = torch.zeros(2, dtype=torch.long)
    target = [{"masks": masks, "labels": labels}]
    ap = MaskAP()
    ap.update([{"masks": masks.clone(), "scores": torch.tensor([0.9, 0.8]), "labels": labels}], target)
    perfect = ap.compute()
    assert perfect["map"].item() == pytest.approx(1.0) and perfect["map_50"].item() == pytest.approx(1.0)
    ap.update([{"masks": masks[:1].clone(), "scores": torch.tensor([0.9]), "labels": labels[:1]}], target)
    half = ap.compute()  # recall stops at 0.5 with precision 1: 51 of COCO's 101 recall points
    assert half["map"].item() == pytest.approx(51 / 101, abs=1e-4)
    nothing = {"masks": masks[:0], "scores": torch.zeros(0), "labels": labels[:0]}
    ap.update([nothing], target)  # nothing found: AP 0 (torchmetrics alone says -1)
    assert ap.compute()["map"].item() == 0.0


def test_class_indexes_beyond_the_adapter_are_refused() -> None:
    model, adapter = _attached(RsPrompterQuery, **SMALL_QUERY)
    batch = dict(_scene(), instance_classes=torch.tensor([[0, 1], [0, -1]]))
    with pytest.raises(InputError, match="num_classes 1"):
        adapter.training_forward(model, batch)


def test_batch_instances_without_instances_counts_each_mask_as_one_object() -> None:
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, :2, :2] = 1
    found = batch_instances({"mask": mask})
    assert [len(m) for m, _ in found] == [1, 0] and found[0][1].tolist() == [0]


def test_anchor_variant_learns_a_toy_scene() -> None:
    model, adapter = _attached(RsPrompterAnchor, **SMALL_ANCHOR)
    params = [p for p in adapter.trainable_parameters(model).values()]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    batch = {k: v[:1] for k, v in _scene().items()}
    model.train()
    losses = []
    for _ in range(12):
        terms = adapter.loss(*adapter.training_forward(model, batch, torch.Generator().manual_seed(0)))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(float(terms["loss"].detach()))
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses  # 2.6 -> 1.7 when it learns


# ---------------------------------------------------------------------------- recipes through the CLI
def _fit(recipe: str, base: Path, out: Path, *extra: str) -> dict:
    """``samadapt fit`` in-process through the CLI's own entry (the recipe's data section names its class)."""
    from samadapt.cli.lightning_cli import main

    args = [
        "--config", str(REPO / "recipes" / "rsprompter" / recipe), "--model.base", str(base),
        "--data.init_args.image", str(GEO / "sample_geotiff.tif"),
        "--data.init_args.vectors", str(GEO / "geotiff_labels.geojson"),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.check_val_every_n_epoch", "null", "--trainer.limit_val_batches", "2",
        "--trainer.logger", "false", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(out / "runs"), "--out", str(out / "adapter"), *extra,
    ]  # fmt: skip
    assert main("fit", args) == 0
    return json.loads((out / "adapter" / "adapter.json").read_text())


@pytest.mark.parametrize("recipe", ["query.yaml", "anchor.yaml"])
def test_recipe_smoke_fit_on_the_solaris_geotiff(recipe: str, tmp_path: Path) -> None:
    text = (REPO / "recipes" / "rsprompter" / recipe).read_text()
    assert text.startswith("# RsPrompter") and "samadapt fit --config recipes/rsprompter/" + recipe in text
    base = write_tiny_checkpoint(tmp_path / "tiny.pth")
    config = _fit(recipe, base, tmp_path)
    assert config["adapter_type"] == ("rsprompter_query" if recipe == "query.yaml" else "rsprompter_anchor")
    assert config["training"]["steps"] == 2
    metrics = config["training"]["metrics"]
    assert 0.0 <= metrics["val/map"] <= 1.0 and 0.0 <= metrics["val/map_50"] <= 1.0  # AP was computed
    assert metrics["train/loss"] > 0
    model = samadapt.load_model(base)
    adapter = load_adapter(tmp_path / "adapter", model, base_sha256=config["base"]["sha256"])
    model.eval()
    preds = adapter.predict_instances(model, torch.rand(1, 3, 128, 128))  # type: ignore[attr-defined]
    assert preds[0]["masks"].shape[1:] == (128, 128)
