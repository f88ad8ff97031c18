"""The SAM core: an image encoder, a prompt encoder and a mask decoder, injected by a builder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
from torch import nn

from samadapt.modeling.mask_decoder import MaskDecoder
from samadapt.modeling.prompt_encoder import PromptEncoder
from samadapt.preprocess import PreprocessProfile


class FeatureEncoder(Protocol):
    """What the core needs from an image encoder (ViT, TinyViT, or an adapter's replacement)."""

    def forward_with_features(
        self, x: torch.Tensor, feature_indexes: Sequence[int] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]: ...


@dataclass
class EncoderOutput:
    """Image embedding plus any intermediate encoder features that were asked for.

    Attributes:
        embedding: (B, 256, 64, 64).
        features: outputs of the requested encoder blocks/stages, in request order.
    """

    embedding: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)


class SamModel(nn.Module):
    """Segment Anything: ``image_encoder``, ``prompt_encoder``, ``mask_decoder`` (official key names).

    Args:
        image_encoder: ViT or TinyViT; must offer ``forward_with_features(x, indexes)``.
        prompt_encoder, mask_decoder: SAM's.
        profile: preprocessing the weights expect.
        variant: registry name of the architecture (``lite_medsam``, ``sam_vit_b``...).
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        *,
        profile: PreprocessProfile,
        variant: str,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.profile = profile
        self.variant = variant

    @property
    def input_size(self) -> int:
        return self.profile.input_size

    def encode(self, images: torch.Tensor, feature_indexes: Sequence[int] = ()) -> EncoderOutput:
        """(B, 3, S, S) preprocessed images -> embedding (B, 256, 64, 64) and requested features."""
        encoder = cast(FeatureEncoder, self.image_encoder)
        embedding, features = encoder.forward_with_features(images, feature_indexes)
        return EncoderOutput(embedding, features)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt the decoder on precomputed embeddings (coordinates in the encoder frame).

        Args:
            image_embeddings: (1 or B, 256, 64, 64).
            points: ((B, N, 2) xy, (B, N) labels) or None. boxes: (B, 4) xyxy or None.
            mask_input: (B, 1, 256, 256) logits or None.

        Returns:
            (low-res logits (B, K, 256, 256), IoU predictions (B, K)).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def forward(
        self,
        images: torch.Tensor,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and decode in one differentiable pass (training); see :meth:`decode`."""
        embedding = self.encode(images).embedding
        return self.decode(
            embedding, points=points, boxes=boxes, mask_input=mask_input, multimask_output=multimask_output
        )
