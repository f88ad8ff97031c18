"""``samadapt fit`` end to end: every recipe, export, reload, errors, DDP, resume (tiny core)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import REPO, run_samadapt

import samadapt
from samadapt import Predictor
from samadapt.adapter import load_adapter
from samadapt.domains.images import read_image, read_mask
from samadapt.weights import checkpoint_sha256

PREDICT_ONLY = {"geo/predict.yaml"}  # predict recipes (tests/domains/remote_sensing/test_geo_predict.py)
RECIPES = sorted(
    p
    for p in (REPO / "recipes").rglob("*.yaml")
    if p.relative_to(REPO / "recipes").as_posix() not in PREDICT_ONLY
)
IMAGE = "amos_0006_90.png"


def test_there_are_recipes_for_every_adapter_of_this_issue() -> None:
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {
        "medsam/full.yaml",
        "medsam/decoder.yaml",
        "lora/litemedsam.yaml",
        "lora/sam_vit_b.yaml",
        "msa/adapter.yaml",
    } <= names


def data_class(recipe: Path) -> str:
    """The data module a recipe names (``data: {class_path: ...}``), or "" for the 2D default."""
    import yaml

    data = yaml.safe_load(recipe.read_text()).get("data")
    return str(data.get("class_path", "")) if isinstance(data, dict) else ""


@pytest.fixture(scope="module")
def volume_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small synthetic CT-like NIfTI cases (imagesTr/labelsTr) with a bright box labelled 2."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("volumes")
    for i in range(3):
        rng = np.random.default_rng(i)
        image = rng.normal(0, 20, (40, 36, 30)).astype(np.float32)
        label = np.zeros(image.shape, np.uint8)
        label[10:24, 8:20, 6:18] = 2
        image[label == 2] += 120
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(
                nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0])), str(root / folder / f"c{i}.nii.gz")
            )
    return root


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_recipe_runs_fast_dev_run(
    recipe: Path, tiny_base: Path, data_root: Path, volume_root: Path, tmp_path: Path
) -> None:
    header = recipe.read_text().splitlines()[0]
    assert header.startswith("# ") and len(header) > 20  # says what it trains
    assert "samadapt fit --config" in recipe.read_text()
    named = data_class(recipe)
    data = ["--data.root", data_root, "--data.batch_size", "2"]
    if named:  # recipes that name their data module (RsPrompter: instances; volumetric: 3D patches)
        data = ["--data.init_args.root", data_root, "--data.init_args.batch_size", "2"]
    if named.endswith("VolumetricDataModule"):
        data = ["--data.init_args.root", volume_root, "--data.init_args.batch_size", "1"]
        if recipe.name != "tiny.yaml":  # ViT-B-sized patches take minutes per step on a CPU: parse only
            proc = run_samadapt("fit", "--config", recipe, *data, "--print_config", cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "samadapt.adapters.volumetric.VolumetricAdapter" in proc.stdout
            return
    proc = run_samadapt(
        "fit", "--config", recipe, "--model.base", tiny_base, *data,
        "--trainer.fast_dev_run=1", "--out", tmp_path / "adapter",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"trainable parameters [\d,]+ .*frozen [\d,]+", proc.stdout + proc.stderr)
    config = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert config["base"]["sha256"] == checkpoint_sha256(tiny_base)
    assert config["training"]["steps"] == 1


@pytest.fixture(scope="module")
def trained(tiny_base: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained for a few steps through the real CLI."""
    work = tmp_path_factory.mktemp("fit")
    proc = run_samadapt(
        "fit", "--config", "recipes/lora/litemedsam.yaml", "--model.base", tiny_base,
        "--data.root", data_root, "--trainer.max_steps", "3", "--data.batch_size", "2",
        "--trainer.default_root_dir", work / "runs", "--trainer.logger", "false",
        "--out", work / "lora",
        cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adapter written to" in proc.stdout
    return work / "lora"


def test_trained_adapter_runs_from_segment_and_matches_the_python_api(
    trained: Path, tiny_base: Path, data_root: Path, tmp_path: Path
) -> None:
    image_path = data_root / "images" / IMAGE
    box = ["100", "120", "300", "330"]
    out = tmp_path / "mask.png"
    proc = run_samadapt(
        "segment", image_path, "--box", *box, "--checkpoint", tiny_base, "--adapter", trained,
        "--precision", "fp32", "-o", out, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "adapter lora" in proc.stdout
    model = samadapt.load_model(tiny_base)
    load_adapter(trained, model, base_sha256=checkpoint_sha256(tiny_base), merge=True)  # as the CLI does
    predictor = Predictor(model, precision="fp32")
    predictor.set_image(read_image(image_path))
    expected = predictor.predict(boxes=[float(v) for v in box]).masks[0, 0]
    np.testing.assert_array_equal(read_mask(out), expected)
    adapted = samadapt.load_model(tiny_base)
    adapter = load_adapter(trained, adapted, base_sha256=None)
    assert any(p.abs().sum() > 0 for n, p in adapter.named_parameters() if ".B." in n)  # training moved B


def test_segment_refuses_bad_adapters_with_one_line(
    trained: Path, tiny_base: Path, data_root: Path, tmp_path: Path
) -> None:
    image = data_root / "images" / IMAGE
    other = tmp_path / "other.pth"
    torch.manual_seed(1)
    samadapt.save_model(samadapt.build("tiny"), other)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter.json").write_text((trained / "adapter.json").read_text())
    (broken / "adapter.safetensors").write_bytes(b"garbage")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "adapter.json").write_text((trained / "adapter.json").read_text().replace('"lora"', '"zzz"'))
    (unknown / "adapter.safetensors").write_bytes((trained / "adapter.safetensors").read_bytes())
    cases = [
        (other, trained, "another base checkpoint"),
        (tiny_base, broken, "not a readable safetensors"),
        (tiny_base, unknown, "unknown adapter type 'zzz'"),
        (None, trained, "trained on a tiny base, not lite_medsam"),
    ]
    for checkpoint, adapter, message in cases:
        out = tmp_path / "mask.png"
        args = ["segment", image, "--box", "100", "120", "300", "330", "--adapter", adapter, "-o", out]
        if checkpoint is not None:
            args += ["--checkpoint", checkpoint]
        proc = run_samadapt(*args, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
        assert not out.exists()


def test_ddp_with_two_cpu_processes_writes_one_adapter(
    tiny_base: Path, data_root: Path, tmp_path: Path
) -> None:
    proc = run_samadapt(
        "fit", "--config", REPO / "recipes/msa/adapter.yaml", "--model.base", tiny_base,
        "--data.root", data_root, "--trainer.max_steps", "2", "--data.batch_size", "1",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.logger", "false", "--trainer.default_root_dir", tmp_path / "runs",
        "--out", tmp_path / "adapter",
        cwd=tmp_path, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter written to") == 1  # rank 0 only
    config = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert config["training"]["world_size"] == 2 and config["training"]["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter.json", "adapter.safetensors"]


def test_resume_from_the_last_checkpoint(tiny_base: Path, data_root: Path, tmp_path: Path) -> None:
    common = [
        "fit", "--config", REPO / "recipes/medsam/decoder.yaml", "--model.base", tiny_base,
        "--data.root", data_root, "--data.batch_size", "2", "--data.max_samples", "4",
        "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "2", "--trainer.max_epochs", "1",
    ]  # fmt: skip
    first = run_samadapt(*common, "--out", tmp_path / "a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = tmp_path / "runs" / "medsam_decoder"  # the recipe's CSV and TensorBoard loggers
    metrics = next(runs.rglob("metrics.csv")).read_text()
    assert "train/loss" in metrics and "val/dice" in metrics
    assert list(runs.rglob("events.out.tfevents.*"))
    last = next(runs.rglob("last.ckpt"))
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(k.startswith("model.mask_decoder.") for k in state)  # trainable part only
    second = run_samadapt(*common[:-1], "2", "--ckpt_path", last, "--out", tmp_path / "b", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    steps = [json.loads((tmp_path / d / "adapter.json").read_text())["training"]["steps"] for d in "ab"]
    assert steps[1] == 2 * steps[0] > 0


def test_fit_without_data_root_is_one_line(tiny_base: Path, tmp_path: Path) -> None:
    proc = run_samadapt(
        "fit", "--config", REPO / "recipes/lora/litemedsam.yaml", "--model.base", tiny_base,
        "--trainer.fast_dev_run=1", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("samadapt fit: error:")
    assert "--data.root" in proc.stderr


def test_bf16_mixed_precision_trains(tiny_base: Path, data_root: Path, tmp_path: Path) -> None:
    proc = run_samadapt(
        "fit", "--config", REPO / "recipes/lora/litemedsam.yaml", "--model.base", tiny_base,
        "--data.root", data_root, "--trainer.fast_dev_run=1", "--trainer.precision", "bf16-mixed",
        "--trainer.accumulate_grad_batches", "2", "--out", tmp_path / "a", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bf16" in proc.stdout + proc.stderr  # Lightning reports the mixed-precision plugin


def test_adapter_runs_on_volume_propagation(trained: Path, tiny_base: Path, tmp_path: Path) -> None:
    from samadapt.domains.medical import read_volume

    volume = REPO / "tests/data/totalsegmentator/example_ct_sm.nii.gz"
    out = tmp_path / "seg.nii.gz"
    args = ["segment", volume, "--box", "44", "27", "104", "81", "--slice", "24", "--checkpoint", tiny_base]
    proc = run_samadapt(*args, "--adapter", trained, "--no-progress", "-o", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "adapter lora" in proc.stdout
    source, result = read_volume(volume), read_volume(out)
    assert result.shape == source.shape and np.allclose(result.affine, source.affine)


def test_validate_test_and_predict_a_trained_adapter(
    trained: Path, tiny_base: Path, data_root: Path, tmp_path: Path
) -> None:
    common = [
        "--config", REPO / "recipes/lora/litemedsam.yaml", "--model.base", tiny_base,
        "--model.init_from", trained, "--data.root", data_root, "--data.batch_size", "2",
        "--trainer.logger", "false", "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
        "--trainer.limit_predict_batches", "2",
    ]  # fmt: skip
    scores = {}
    # validate with another adapter in the config: the saved one, as trained, replaces it (and says so)
    msa = ["--model.adapter.class_path", "samadapt.adapters.msa.MedicalSAMAdapter"]
    for command, extra in (("validate", msa), ("test", [])):
        proc = run_samadapt(command, *common, *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = re.search(rf"{'val' if command == 'validate' else 'test'}/dice\s*│\s*([\d.]+)", proc.stdout)
        assert found, proc.stdout[-2000:]
        scores[command] = float(found.group(1))
        replaced = "its lora adapter" in proc.stderr and "replaces the configured msa" in proc.stderr
        assert replaced == (command == "validate"), proc.stderr[-2000:]
    # the same held-out cases and prompts, and the same (saved) adapter in both
    assert scores["validate"] == pytest.approx(scores["test"])
    proc = run_samadapt("predict", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
