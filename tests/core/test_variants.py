"""The variant registry: read-only views, registration, duplicates, and samadapt errors for unknown names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import samadapt
from samadapt import (
    VARIANTS,
    SamadaptError,
    SamModel,
    UnknownVariantError,
    build,
    load_model,
    register_variant,
    save_model,
    variants,
)
from samadapt.builders import _registry, build_tiny
from samadapt.checkpoint import matching_variants
from samadapt.cli import main

BUILTIN = ("lite_medsam", "medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "mobile_sam", "tiny")


def _wide_tiny() -> SamModel:
    """``tiny`` with a wider MLP in its mask decoder's IoU head: another checkpoint signature."""
    model = build_tiny()
    model.variant = "tiny_wide"
    head = model.mask_decoder.iou_prediction_head
    head.layers[-1] = torch.nn.Linear(head.layers[-1].in_features, head.layers[-1].out_features + 1)
    return model


@pytest.fixture()
def registered() -> Iterator[str]:
    """Registers ``tiny_wide`` for one test and removes it afterwards (the registry is process-wide)."""
    register_variant("tiny_wide", _wide_tiny, "tiny with a wider IoU head (test only)")
    yield "tiny_wide"
    _registry.pop("tiny_wide", None)


def test_builtins_are_registered_in_order() -> None:
    assert tuple(variants()) == BUILTIN
    assert variants() is VARIANTS is samadapt.VARIANTS
    assert variants()["tiny"].description


def test_unknown_variant_is_a_samadapt_error_not_a_key_error() -> None:
    with pytest.raises(UnknownVariantError, match=r"unknown variant 'nope'; choose from lite_medsam, medsam"):
        build("nope")
    assert issubclass(UnknownVariantError, SamadaptError)
    assert not issubclass(UnknownVariantError, KeyError)


def test_load_model_refuses_an_unknown_variant(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(build("tiny").state_dict(), path)
    with pytest.raises(UnknownVariantError, match="unknown variant 'nope'"):
        load_model(path, variant="nope")


def test_cli_reports_an_unknown_variant_in_one_line(tmp_path: Path, capsys) -> None:
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (32, 32)).save(image)
    code = main(["segment", str(image), "--box", "1", "1", "9", "9", "--variant", "nope", "-o", "m.png"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "unknown variant 'nope'" in err and len(err.splitlines()) == 1


def test_the_registry_views_cannot_be_mutated() -> None:
    with pytest.raises(TypeError):
        VARIANTS["x"] = VARIANTS["tiny"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del variants()["tiny"]  # type: ignore[attr-defined]
    assert not hasattr(variants(), "pop") and not hasattr(variants(), "update")


def test_a_registered_variant_is_buildable_and_detected(registered: str, tmp_path: Path) -> None:
    assert registered in variants() and registered in VARIANTS  # the old view follows the registry
    torch.manual_seed(0)
    model = build(registered)
    assert model.variant == registered
    state = model.state_dict()
    assert matching_variants(state) == [registered]
    assert matching_variants(build("tiny").state_dict()) == ["tiny"]
    path = tmp_path / "wide.pth"
    torch.save(state, path)  # a bare state dict: detected from its signature alone
    loaded = load_model(path)
    assert loaded.variant == registered
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    save_model(loaded, tmp_path / "saved.pth")
    assert load_model(tmp_path / "saved.pth", variant=registered).variant == registered


def test_duplicates_are_refused_unless_replaced(registered: str) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_variant("tiny", build_tiny, "again")
    with pytest.raises(ValueError, match="already registered"):
        register_variant(registered, _wide_tiny, "again")
    assert variants()[registered].description == "tiny with a wider IoU head (test only)"
    register_variant(registered, build_tiny, "now the plain tiny architecture", replace=True)
    assert variants()[registered].description == "now the plain tiny architecture"
    # the cached checkpoint signature follows the replacement
    assert matching_variants(build("tiny").state_dict()) == ["tiny", registered]
    with pytest.raises(ValueError, match="non-empty"):
        register_variant("", build_tiny, "no name")
    with pytest.raises(TypeError, match="callable"):
        register_variant("broken", "not a builder", "x")  # type: ignore[arg-type]
    assert "broken" not in variants()
