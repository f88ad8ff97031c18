"""Load SAM-family checkpoints safely (``weights_only=True``), unwrap them and identify the variant."""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch

from samadapt.builders import Variant, get_variant, variants
from samadapt.errors import CheckpointError
from samadapt.modeling import SamModel
from samadapt.preprocess import PreprocessProfile

_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
_PREFIXES = ("module.", "model.", "sam.", "_orig_mod.")
METADATA_KEY = "samadapt"


def _read(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path.name} is not a readable safetensors file ({exc})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol chatter; our error says what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = found.group(1) if found else "a Python object"
            raise CheckpointError(
                f"{path.name} is not a plain state dict: it pickles {what}, "
                "which weights_only loading refuses"
            ) from None
        raise CheckpointError(
            f"{path.name} is not a readable PyTorch checkpoint (corrupt or truncated)"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{path.name} is not a readable PyTorch checkpoint (corrupt or truncated: {type(exc).__name__})"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path.name} could not be loaded: {type(exc).__name__}: {exc}") from None


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the model state dict inside common wrappers.

    Accepts a bare state dict, ``{"model": ...}``, Lightning's ``{"state_dict": ...}`` and DDP/compile
    prefixes (``module.``, ``model.``, ``_orig_mod.``).

    Returns:
        (state dict, samadapt metadata or {}).
    """
    metadata: dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get(METADATA_KEY), Mapping):
        metadata = dict(obj[METADATA_KEY])
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} does not contain a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{source} does not contain a state dict of tensors")
    return _strip_prefixes(tensors), metadata


@cache
def _signature(entry: Variant) -> frozenset[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a registry entry's model (built on the meta device: no memory).

    Keyed by the entry itself, not its name: a variant registered again with ``replace=True`` is a
    new entry and gets its own signature.
    """
    with torch.device("meta"):
        model = entry.builder()
    return frozenset((k, tuple(v.shape)) for k, v in model.state_dict().items())


def matching_variants(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered variants whose parameter names and shapes equal the state dict's (several for ViT-B)."""
    signature = frozenset((k, tuple(v.shape)) for k, v in state.items())
    return [name for name, entry in variants().items() if _signature(entry) == signature]


def describe_architecture(state: Mapping[str, torch.Tensor]) -> str:
    """A short human name for what a state dict looks like, for error messages."""
    vit = state.get("image_encoder.patch_embed.proj.weight")
    if vit is not None:
        return {768: "ViT-B (SAM/MedSAM)", 1024: "ViT-L", 1280: "ViT-H"}.get(vit.shape[0], "ViT")
    tiny = state.get("image_encoder.patch_embed.seq.0.c.weight")
    if tiny is not None:
        return "TinyViT at 256 (LiteMedSAM)" if tiny.shape[-1] == 1 else "TinyViT at 1024 (MobileSAM)"
    if not any(k.startswith("mask_decoder.") for k in state):
        return "not a SAM model"
    return "an unknown SAM variant"


def load_model(path: str | Path, variant: str | None = None) -> SamModel:
    """Load a checkpoint into the matching architecture with ``strict=True``.

    Args:
        path: ``.pth``/``.pt``/``.ckpt`` (loaded with ``weights_only=True``) or ``.safetensors``.
        variant: expected variant; None detects it (ViT-B defaults to ``medsam`` if the file name
            says so, else ``sam_vit_b``).

    Raises:
        CheckpointError: missing, corrupt, not a state dict, or not the requested variant.
        UnknownVariantError: ``variant`` is not registered.
    """
    path = Path(path)
    if variant is not None:
        get_variant(variant)  # an unknown name fails before the file is read
    state, metadata = unwrap_state_dict(_read(path), source=path.name)
    candidates = matching_variants(state)
    meta_variant = metadata.get("variant")
    if not candidates:
        raise CheckpointError(
            f"{path.name} does not match any known variant (it looks like {describe_architecture(state)})"
        )
    if variant is None:
        if meta_variant in candidates:
            variant = str(meta_variant)
        elif "medsam" in candidates and "medsam" in path.name.lower():
            variant = "medsam"
        else:
            variant = "sam_vit_b" if "sam_vit_b" in candidates else candidates[0]  # first registered
    elif variant not in candidates:
        raise CheckpointError(
            f"{path.name} is a {describe_architecture(state)} checkpoint, not {variant} "
            f"(matches: {', '.join(candidates)})"
        )
    model = get_variant(variant).builder()
    model.load_state_dict(state, strict=True)
    if isinstance(metadata.get("profile"), Mapping):
        model.profile = PreprocessProfile.from_dict(dict(metadata["profile"]))
    return model.eval()


def save_model(model: SamModel, path: str | Path) -> None:
    """Save a full model with its variant and profile (atomic: temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(
            {
                "model": model.state_dict(),
                METADATA_KEY: {"variant": model.variant, "profile": model.profile.to_dict()},
            },
            tmp,
        )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
