"""AutoSAM: prompt-free prediction, the trainable set (generator + surrogate head, core frozen), save -> load,
the multi-class variant, label selection in training and the data module, and label maps for the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import REPO, run_samadapt
from PIL import Image

import samadapt
from samadapt import Predictor
from samadapt.adapter import GENERATES_PROMPTS, get_adapter_type, load_adapter, save_adapter
from samadapt.adapters.autosam import AutoSAM, AutoSamGenerator, prompt_free_label_maps
from samadapt.checkpoint import save_model
from samadapt.errors import InputError
from samadapt.modeling import PromptBatch
from samadapt.weights import checkpoint_sha256


def _attached(variant: str = "tiny", **kwargs) -> tuple[samadapt.SamModel, AutoSAM]:
    torch.manual_seed(0)
    model = samadapt.build(variant)
    adapter = AutoSAM(**{"width": 16, **kwargs})
    adapter.attach(model)
    return model, adapter


def _perturb(adapter: AutoSAM, model: samadapt.SamModel) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _image(seed: int = 0, size: tuple[int, int] = (100, 120)) -> np.ndarray:
    return (np.random.default_rng(seed).random(size) * 255).astype(np.uint8)


def test_parameter_counts_on_litemedsam_and_vit_b() -> None:
    for variant, frozen in (("lite_medsam", 9_791_300), ("sam_vit_b", 93_735_472)):
        for classes, count in (([1], 956_001), ([1, 2, 3, 5], 1_055_124)):
            with torch.device("meta"):
                model = samadapt.build(variant)
                adapter = AutoSAM(classes=classes)
                adapter.attach(model)
            counts = adapter.parameter_counts(model)
            assert counts == {"adapter": count, "trainable": count, "frozen": frozen}, (variant, classes)
    assert GENERATES_PROMPTS in AutoSAM.capabilities
    assert get_adapter_type("autosam") is AutoSAM


@pytest.mark.parametrize("surrogate_weight", [1.0, 0.0])
def test_trainable_set_is_exactly_the_generator_and_the_core_gets_no_grad(surrogate_weight: float) -> None:
    model, adapter = _attached(surrogate_weight=surrogate_weight)
    adapter.freeze_base(model)
    generator = model.prompt_generator
    assert isinstance(generator, AutoSamGenerator) and generator is adapter.generator
    own = {id(p) for p in generator.parameters()}
    assert {id(p) for p in adapter.trainable_parameters(model).values()} == own
    assert adapter.core_parameters(model) == {}
    for role in ("image_encoder", "prompt_encoder", "mask_decoder"):
        assert not any(p.requires_grad for p in getattr(model, role).parameters()), role
    _perturb(adapter, model)  # away from the zero-initialised output layer so every weight gets a gradient
    model.train()
    masks = torch.zeros(2, 1, 128, 128)
    masks[:, :, 30:90, 40:100] = 1
    batch = {"image": torch.rand(2, 3, 128, 128), "mask": masks, "meta": {"object": torch.tensor([1, 1])}}
    images, targets, prompts = adapter.training_inputs(batch)
    assert prompts.is_empty and prompts.classes is None
    logits, iou = model.forward_batch(images, prompts)
    terms = adapter.loss(logits, iou, targets)
    assert set(terms) == {"dice", "bce", "loss"} | ({"surrogate"} if surrogate_weight else set())
    terms["loss"].backward()
    for name, p in generator.named_parameters():  # every trainable parameter is used (DDP needs it)
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (generator.surrogate is not None) == bool(surrogate_weight)
    for name, p in model.named_parameters():
        if id(p) not in own:
            assert p.grad is None, name


def test_surrogate_head_reads_detached_features_unless_aux() -> None:
    for aux in (False, True):
        model, adapter = _attached(surrogate_aux=aux)
        adapter.freeze_base(model)
        _perturb(adapter, model)
        generator = adapter.generator
        encoded = model.encode(torch.rand(1, 3, 128, 128))
        generator(encoded)
        assert generator.last_surrogate is not None and generator.last_surrogate.shape == (1, 1, 32, 32)
        generator.last_surrogate.sum().backward()
        stem_grad = generator.stem[0].weight.grad
        assert (stem_grad is not None and stem_grad.abs().sum() > 0) == aux


@pytest.mark.parametrize("variant", ["tiny", "lite_medsam"])
def test_prompt_free_prediction_through_the_predictor(variant: str) -> None:
    model, adapter = _attached(variant)
    image = _image()
    predictor = Predictor(model, precision="fp32")
    predictor.set_image(image)
    # untrained, the generator reproduces SAM's own "no prompt" output exactly
    start = predictor.predict()
    with torch.no_grad():
        plain, _ = model.decode(predictor.current.embedding)
    torch.testing.assert_close(start.low_res_logits, plain, atol=1e-5, rtol=0)
    _perturb(adapter, model)
    result = predictor.predict()
    assert result.masks.shape == (1, 1, *image.shape) and result.scores.shape == (1, 1)
    assert not torch.equal(result.low_res_logits, start.low_res_logits)
    bare = Predictor(samadapt.build(variant), precision="fp32")
    bare.set_image(image)
    with pytest.raises(InputError, match="no prompt generator"):
        bare.predict()


def test_multi_class_variant_gives_one_mask_per_class_and_picks_classes() -> None:
    model, adapter = _attached(classes=[2, 5, 7], sparse_tokens=2)
    _perturb(adapter, model)
    model.eval()
    predictor = Predictor(model, precision="fp32")
    predictor.set_image(_image())
    result = predictor.predict()
    assert result.masks.shape == (3, 1, 100, 120) and result.scores.shape == (3, 1)
    encoded = predictor.current.encoder_output()
    with torch.no_grad():
        every, _ = model.decode_prompts(encoded, PromptBatch())
        for k in range(3):
            one, _ = model.decode_prompts(encoded, PromptBatch(classes=torch.tensor([k])))
            torch.testing.assert_close(one[0], every[k], atol=1e-5, rtol=0)
    assert not torch.allclose(every[0], every[1])
    # training: each sample decodes its own class; objects of other labels are dropped
    model.train()
    batch = {
        "image": torch.rand(4, 3, 128, 128),
        "mask": torch.rand(4, 1, 128, 128).round(),
        "meta": {"object": torch.tensor([5, 3, 2, 7])},
    }
    images, targets, prompts = adapter.training_inputs(batch)
    assert images.shape[0] == targets.shape[0] == 3
    assert prompts.classes is not None and prompts.classes.tolist() == [1, 0, 2]
    torch.testing.assert_close(targets, batch["mask"][[0, 2, 3]])
    logits, iou = model.forward_batch(images, prompts)
    assert logits.shape == (3, 1, 32, 32)
    assert "surrogate" in adapter.loss(logits, iou, targets)
    with pytest.raises(InputError, match=r"data\.labels"):
        adapter.training_inputs({**batch, "meta": {"object": torch.tensor([1, 3, 4, 6])}})


@pytest.mark.parametrize("kwargs", [{}, {"classes": [1, 4], "sparse_tokens": 1}])
def test_save_then_load_gives_identical_outputs(tmp_path: Path, kwargs: dict) -> None:
    torch.manual_seed(0)
    base = tmp_path / "tiny.pth"
    save_model(samadapt.build("tiny"), base)
    model = samadapt.load_model(base)
    adapter = AutoSAM(width=16, **kwargs)
    adapter.attach(model)
    _perturb(adapter, model)
    image = torch.rand(1, 3, 128, 128)
    model.eval()
    with torch.no_grad():
        expected = model.forward_batch(image, PromptBatch())
    out = save_adapter(tmp_path / "out", adapter, model, base_sha256=checkpoint_sha256(base))
    fresh = samadapt.load_model(base)
    loaded = load_adapter(out, fresh, base_sha256=checkpoint_sha256(base))
    assert isinstance(loaded, AutoSAM) and loaded.classes == adapter.classes
    fresh.eval()
    with torch.no_grad():
        got = fresh.forward_batch(image, PromptBatch())
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)


def test_label_maps_of_volume_slices_for_the_cli() -> None:
    model, adapter = _attached(classes=[3, 9])
    _perturb(adapter, model)
    predictor = Predictor(model, precision="fp32")
    volume = np.stack([_image(k, (64, 80)) for k in range(5)])  # (Z, H, W)
    maps = prompt_free_label_maps(predictor, list(volume), batch_size=2)
    assert maps.shape == volume.shape and maps.dtype == np.uint16
    assert set(np.unique(maps)) <= {0, 3, 9}
    per_slice = []
    for plane in volume:
        predictor.set_image(plane)
        result = predictor.predict()
        assert result.masks.shape == (2, 1, *plane.shape)
        expected = np.zeros(plane.shape, np.uint16)
        for k in np.argsort(-result.scores[:, 0], kind="stable"):  # overlaps: the higher score wins
            expected[result.masks[k, 0] & (expected == 0)] = (3, 9)[k]
        per_slice.append(expected)
    np.testing.assert_array_equal(maps, np.stack(per_slice))
    assert maps.any()
    with pytest.raises(InputError, match="no AutoSAM prompt generator"):
        prompt_free_label_maps(Predictor(samadapt.build("tiny"), precision="fp32"), list(volume))


def _data_root(root: Path) -> Path:
    """ROOT/images + ROOT/masks: two 64x64 images, label maps with values 1 and 2 (and 3 on one)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for n, stem in enumerate(("a", "b", "c")):
        Image.fromarray(_image(n, (64, 64))).save(root / "images" / f"{stem}.png")
        labels = np.zeros((64, 64), np.uint8)
        labels[5:25, 5:25], labels[30:60, 30:60] = 1, 2
        if n == 0:
            labels[40:50, 5:20] = 3
        Image.fromarray(labels).save(root / "masks" / f"{stem}.png")
    return root


def test_multi_class_recipe_trains_and_the_export_predicts_prompt_free(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tmp_path / "tiny.pth"
    save_model(samadapt.build("tiny"), base)
    root = _data_root(tmp_path / "data")
    proc = run_samadapt(
        "fit", "--config", REPO / "recipes" / "autosam" / "autosam.yaml", "--model.base", base,
        "--data.root", root, "--model.adapter.init_args.classes", "[1,2]", "--data.labels", "[1,2]",
        "--model.adapter.init_args.width", "16", "--trainer.max_steps", "2", "--data.batch_size", "2",
        "--trainer.logger", "false", "--trainer.default_root_dir", tmp_path / "runs",
        "--out", tmp_path / "autosam", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "autosam adapter on tiny" in proc.stdout
    model = samadapt.load_model(base)
    adapter = load_adapter(tmp_path / "autosam", model, base_sha256=checkpoint_sha256(base))
    assert isinstance(adapter, AutoSAM) and adapter.classes == [1, 2]
    predictor = Predictor(model, precision="fp32")
    maps = prompt_free_label_maps(predictor, [_image(5, (64, 64))])
    assert maps.shape == (1, 64, 64) and set(np.unique(maps)) <= {0, 1, 2}


def test_data_module_keeps_only_the_requested_labels(tmp_path: Path) -> None:
    from samadapt.domains.segmentation_data import SegmentationDataModule

    _data_root(tmp_path)
    module = SegmentationDataModule(root=str(tmp_path), val_fraction=0.0, labels=[2], augment=False)
    module.profile = samadapt.build("tiny").profile
    module.setup()
    assert module.train_set is not None and len(module.train_set) == 3
    assert {module.train_set[i]["meta"]["object"] for i in range(3)} == {2}
    module = SegmentationDataModule(root=str(tmp_path), val_fraction=0.0, labels=[4])  # absent
    module.profile = samadapt.build("tiny").profile
    with pytest.raises(InputError, match=r"no object with a label in \[4\]"):
        module.setup()
