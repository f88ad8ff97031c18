"""One builder per variant; the numbers live here and nowhere else.

The variant registry maps a name to its builder and a one-line description: :func:`register_variant`
adds one (a plugin's own architecture, say), :func:`variants` (and the ``VARIANTS`` alias) is a
read-only view of it. ``sam_vit_b`` and ``medsam`` share an architecture (and so a checkpoint
signature) but not a profile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from samadapt.errors import UnknownVariantError
from samadapt.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    SamModel,
    TinyViT,
    TwoWayTransformer,
)
from samadapt.preprocess import LITEMEDSAM_PROFILE, MEDSAM_PROFILE, SAM_PROFILE, PreprocessProfile


def _prompt_and_decoder(
    input_size: int, embed_grid: int = 64, dim: int = 256, mlp_dim: int = 2048, heads: int = 8
) -> tuple[PromptEncoder, MaskDecoder]:
    prompt_encoder = PromptEncoder(
        embed_dim=dim,
        image_embedding_size=(embed_grid, embed_grid),
        input_image_size=(input_size, input_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=heads),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=dim,
    )
    return prompt_encoder, mask_decoder


def _vit(embed_dim: int, depth: int, num_heads: int, global_attn: Sequence[int]) -> ImageEncoderViT:
    return ImageEncoderViT(
        img_size=1024,
        patch_size=16,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        out_chans=256,
        window_size=14,
        global_attn_indexes=tuple(global_attn),
    )


def _sam(encoder: nn.Module, profile: PreprocessProfile, variant: str) -> SamModel:
    prompt_encoder, mask_decoder = _prompt_and_decoder(profile.input_size)
    return SamModel(encoder, prompt_encoder, mask_decoder, profile=profile, variant=variant)


def build_sam_vit_b() -> SamModel:
    """SAM ViT-B (91M encoder), ImageNet profile at 1024."""
    return _sam(_vit(768, 12, 12, (2, 5, 8, 11)), SAM_PROFILE, "sam_vit_b")


def build_sam_vit_l() -> SamModel:
    """SAM ViT-L, ImageNet profile at 1024."""
    return _sam(_vit(1024, 24, 16, (5, 11, 17, 23)), SAM_PROFILE, "sam_vit_l")


def build_sam_vit_h() -> SamModel:
    """SAM ViT-H, ImageNet profile at 1024."""
    return _sam(_vit(1280, 32, 16, (7, 15, 23, 31)), SAM_PROFILE, "sam_vit_h")


def build_medsam() -> SamModel:
    """MedSAM: SAM ViT-B architecture, [0, 1] min-max profile at 1024 (no ImageNet mean/std)."""
    return _sam(_vit(768, 12, 12, (2, 5, 8, 11)), MEDSAM_PROFILE, "medsam")


def _tiny_vit(img_size: int, patch: int, classifier_classes: int) -> TinyViT:
    return TinyViT(
        img_size=img_size,
        patch_kernel=3 if patch == 2 else 1,
        patch_stride=patch,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        mlp_ratio=4.0,
        mbconv_expand_ratio=4.0,
        classifier_classes=classifier_classes,
    )


def build_mobile_sam() -> SamModel:
    """MobileSAM: TinyViT-5M at 1024 (stride-4 patch embed), ImageNet profile."""
    return _sam(_tiny_vit(1024, 2, classifier_classes=1000), SAM_PROFILE, "mobile_sam")


def build_lite_medsam() -> SamModel:
    """LiteMedSAM: TinyViT-5M at 256 (1x1 patch embed), min-max profile, longest side 256 + pad."""
    return _sam(_tiny_vit(256, 1, classifier_classes=0), LITEMEDSAM_PROFILE, "lite_medsam")


def build_tiny() -> SamModel:
    """A tiny random-weight ViT core for tests: 128 input, 32-dim, 2 blocks, 8x8 embedding grid."""
    encoder = ImageEncoderViT(
        img_size=128,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        out_chans=32,
        window_size=4,
        global_attn_indexes=(1,),
    )
    profile = PreprocessProfile("tiny", 128, keep_aspect=True, normalize="minmax")
    prompt_encoder, mask_decoder = _prompt_and_decoder(128, embed_grid=8, dim=32, mlp_dim=64, heads=2)
    return SamModel(encoder, prompt_encoder, mask_decoder, profile=profile, variant="tiny")


@dataclass(frozen=True)
class Variant:
    """A registry entry: the builder (random weights) and a line for ``samadapt info``."""

    name: str
    builder: Callable[[], SamModel]
    description: str


_registry: dict[str, Variant] = {}

#: Read-only view of the registry (the same object :func:`variants` returns); kept for compatibility.
VARIANTS: Mapping[str, Variant] = MappingProxyType(_registry)


def register_variant(
    name: str, builder: Callable[[], SamModel], description: str, *, replace: bool = False
) -> Variant:
    """Make ``build(name)`` and checkpoint detection know a variant.

    Args:
        name: the variant's name (``--variant NAME``); a model built by ``builder`` should carry it
            as ``model.variant``.
        builder: returns the model with random weights; called under ``torch.device("meta")`` to
            learn the checkpoint signature, so it must not read weights from disk.
        description: one line for ``samadapt info``.
        replace: allow replacing an existing entry of the same name.

    Returns:
        The registered entry.

    Raises:
        ValueError: ``name`` is already registered and ``replace`` is False, or ``name`` is empty.
        TypeError: ``builder`` is not callable.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a variant name must be a non-empty string, got {name!r}")
    if not callable(builder):
        raise TypeError(f"the builder of variant {name!r} must be callable, got {type(builder).__name__}")
    if name in _registry and not replace:
        raise ValueError(f"variant {name!r} is already registered; pass replace=True to replace it")
    entry = Variant(name, builder, description)
    _registry[name] = entry
    return entry


def variants() -> Mapping[str, Variant]:
    """The registered variants by name, in registration order (a read-only view that stays current)."""
    return VARIANTS


def get_variant(name: str) -> Variant:
    """The registry entry of ``name``.

    Raises:
        UnknownVariantError: no variant of that name is registered.
    """
    try:
        return _registry[name]
    except (KeyError, TypeError):
        raise UnknownVariantError(f"unknown variant {name!r}; choose from {', '.join(_registry)}") from None


def build(variant: str) -> SamModel:
    """Build a registered variant with random weights.

    Raises:
        UnknownVariantError: ``variant`` is not registered.
    """
    return get_variant(variant).builder()


for _name, _builder, _description in (
    ("lite_medsam", build_lite_medsam, "LiteMedSAM: TinyViT at 256, min-max [0,1], pad (default)"),
    ("medsam", build_medsam, "MedSAM: ViT-B at 1024, min-max [0,1], no mean/std"),
    ("sam_vit_b", build_sam_vit_b, "SAM ViT-B at 1024, ImageNet mean/std"),
    ("sam_vit_l", build_sam_vit_l, "SAM ViT-L at 1024, ImageNet mean/std"),
    ("sam_vit_h", build_sam_vit_h, "SAM ViT-H at 1024, ImageNet mean/std"),
    ("mobile_sam", build_mobile_sam, "MobileSAM: TinyViT at 1024, ImageNet mean/std"),
    ("tiny", build_tiny, "tiny random-weight core for tests"),
):
    register_variant(_name, _builder, _description)
del _name, _builder, _description
