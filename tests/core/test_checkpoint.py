"""Checkpoint loading: wrappers, variant detection, and one clear error for each bad file."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from samadapt import CheckpointError, build, load_model, save_model
from samadapt.checkpoint import matching_variants, unwrap_state_dict
from samadapt.weights import LITEMEDSAM_SHA256, sha256_of, verified_default_checkpoint


class NotAStateDict:
    def __init__(self) -> None:
        self.weights = [1, 2, 3]


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build("tiny").state_dict()


def test_default_checkpoint_is_the_bundled_litemedsam() -> None:
    path = verified_default_checkpoint()
    assert path.name == "lite_medsam.pth"
    assert sha256_of(path) == LITEMEDSAM_SHA256
    model = load_model(path)
    assert model.variant == "lite_medsam"
    assert model.profile.name == "litemedsam" and model.profile.input_size == 256
    assert not model.training


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"model": s},
        lambda s: {"state_dict": {f"model.{k}": v for k, v in s.items()}, "epoch": 3},
        lambda s: {f"module.{k}": v for k, v in s.items()},
    ],
    ids=["bare", "model-key", "lightning", "ddp-prefix"],
)
def test_wrappers_unwrap_to_the_same_weights(tmp_path: Path, tiny_state, wrap) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(tiny_state), path)
    model = load_model(path)
    assert model.variant == "tiny"
    for key, value in model.state_dict().items():
        assert torch.equal(value, tiny_state[key]), key


def test_save_model_records_variant_and_profile(tmp_path: Path, tiny_state) -> None:
    model = build("tiny")
    model.load_state_dict(tiny_state)
    path = tmp_path / "saved.pth"
    save_model(model, path)
    raw = torch.load(path, weights_only=True)
    assert raw["samadapt"]["variant"] == "tiny"
    assert raw["samadapt"]["profile"]["input_size"] == 128
    assert load_model(path).profile == model.profile
    assert not list(tmp_path.glob(".*tmp"))


def test_safetensors_loads(tmp_path: Path, tiny_state) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    assert load_model(path).variant == "tiny"


def test_vit_b_signature_is_ambiguous_between_sam_and_medsam() -> None:
    with torch.device("meta"):
        state = build("sam_vit_b").state_dict()
    assert set(matching_variants(state)) == {"medsam", "sam_vit_b"}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b"\x00garbage" * 100), "not a readable PyTorch checkpoint"),
        (lambda p: torch.save(NotAStateDict(), p), "not a plain state dict: it pickles .*NotAStateDict"),
        (lambda p: p.write_bytes(pickle.dumps({"a": 1})), "not a"),
        (lambda p: torch.save([torch.zeros(1)], p), "does not contain a state dict"),
        (lambda p: torch.save({"foo.weight": torch.zeros(2)}, p), "does not match any known variant"),
    ],
    ids=["missing", "corrupt", "pickled-object", "plain-pickle", "list", "unknown-keys"],
)
def test_bad_checkpoints_raise_one_clear_error(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.pth"
    make(path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    data = verified_default_checkpoint().read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(path)


def test_checkpoint_of_another_variant_is_refused(tmp_path: Path, tiny_state) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(tiny_state, path)
    with pytest.raises(CheckpointError, match="not lite_medsam"):
        load_model(path, variant="lite_medsam")


def test_unwrap_rejects_non_tensor_mappings() -> None:
    with pytest.raises(CheckpointError):
        unwrap_state_dict({"model": {"a": 1}})
