"""The SAM core: an image encoder, a prompt encoder and a mask decoder, injected by a builder.

The core is split where adapters plug in:

- ``encode``: images -> :class:`EncoderOutput` (embedding, the intermediate features the decoder or a
  prompt generator asked for through :attr:`SamModel.feature_indexes`, and the preprocessed image
  when :attr:`SamModel.keep_image` is set);
- ``embed_prompts``: points / boxes / mask logits -> (sparse, dense) prompt embeddings; a
  ``prompt_generator`` (AutoSAM, RsPrompter) produces them from the encoder output instead;
- ``decode_embeddings``: (image embedding, features, sparse, dense) -> mask logits and IoU; the
  ``mask_decoder`` may be replaced by any module with the same call signature (DeSAM, a 3D decoder).

``forward_batch`` chains them for training: B images, P prompts with the image index of each, all
tensors, differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, cast

import torch
from torch import nn

from samadapt.errors import InputError
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
    """Image embedding plus what adapters asked the encoder to keep.

    Attributes:
        embedding: (B, 256, h, w) (h = w = 64 for the official checkpoints).
        features: outputs of the requested encoder blocks/stages, in request order (ViT: each
            (B, h, w, D); TinyViT: each (B, tokens, C)).
        image: the (B, 3, S, S) preprocessed encoder input, kept when the model's ``keep_image`` is
            set (an image-conditioned prompt generator needs it), else None.
    """

    embedding: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)
    image: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> EncoderOutput:
        """The rows ``index`` (P,) of every tensor: one row per prompt, for decoding."""
        image = self.image[index] if self.image is not None else None
        return EncoderOutput(self.embedding[index], [f[index] for f in self.features], image)


@dataclass
class PromptBatch:
    """Prompts for P objects spread over B images, in the encoder's input frame (pixels of S x S).

    Attributes:
        points: (P, N, 2) x, y or None. point_labels: (P, N): 1 foreground, 0 background, -1 padding.
        boxes: (P, 4) x0, y0, x1, y1 or None.
        masks: (P, 1, 4h, 4w) low-res mask logits or None.
        image_index: (P,) long, the image each prompt belongs to; None means prompt i is on image i.
        classes: (P,) long, the class each prompt asks a multi-class prompt generator for (only
            with an empty batch and a generator returning per-class embeddings); None: every class.
    """

    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    image_index: torch.Tensor | None = None
    classes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.points is None) != (self.point_labels is None):
            raise InputError("points and point_labels go together")

    @property
    def size(self) -> int | None:
        """P, or None when the batch holds no prompt tensor at all."""
        for tensor in (self.points, self.boxes, self.masks, self.image_index, self.classes):
            if tensor is not None:
                return int(tensor.shape[0])
        return None

    @property
    def is_empty(self) -> bool:
        """No points, boxes or masks: a prompt generator (if any) provides the prompts."""
        return self.points is None and self.boxes is None and self.masks is None

    def indexes(self, num_images: int, device: torch.device) -> torch.Tensor:
        """(P,) image index of each prompt."""
        if self.image_index is not None:
            return self.image_index.to(device=device, dtype=torch.long)
        count = self.size if self.size is not None else num_images
        return torch.arange(count, device=device)


class PromptGenerator(Protocol):
    """Produces prompt embeddings from the encoder output (AutoSAM dense, RsPrompter sparse)."""

    def __call__(self, encoded: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (sparse (B, N, 256), dense (B, 256, h, w)) for the B images in ``encoded``; a multi-class
        generator returns (B, C, N, 256) and (B, C, 256, h, w), one embedding per class."""
        ...


class SamModel(nn.Module):
    """Segment Anything: ``image_encoder``, ``prompt_encoder``, ``mask_decoder`` (official key names).

    Args:
        image_encoder: ViT or TinyViT; must offer ``forward_with_features(x, indexes)``.
        prompt_encoder, mask_decoder: SAM's. A replacement decoder is called as
            ``mask_decoder(image_embeddings=, image_pe=, sparse_prompt_embeddings=,
            dense_prompt_embeddings=, multimask_output=, features=)``.
        profile: preprocessing the weights expect.
        variant: registry name of the architecture (``lite_medsam``, ``sam_vit_b``...).

    Attributes adapters set when they attach:
        feature_indexes: encoder blocks/stages whose outputs ``encode`` keeps (and the predictor
            caches) for the decoder or the prompt generator.
        keep_image: keep the preprocessed image in :class:`EncoderOutput`.
        prompt_generator: a module producing prompt embeddings from the encoder output, used when a
            call brings no prompt; None for plain SAM.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder | nn.Module,
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
        self.feature_indexes: tuple[int, ...] = ()
        self.keep_image = False
        self.prompt_generator: nn.Module | None = None

    @property
    def input_size(self) -> int:
        return self.profile.input_size

    def set_input_size(self, size: int) -> None:
        """Run a ViT core at another square input size than its checkpoint's (e.g. 512 as SAMed).

        The absolute position embedding is interpolated at every forward and the global blocks'
        relative positions are resampled, so the checkpoint still loads strictly. The profile, the
        prompt frame and the embedding grid follow. TinyViT cores have fixed stage resolutions and
        are refused.
        """
        patch = getattr(getattr(self.image_encoder, "patch_embed", None), "proj", None)
        if not isinstance(patch, nn.Conv2d):
            raise InputError(f"{self.variant}: only ViT cores can change their input size")
        stride = int(patch.stride[0])
        if size <= 0 or size % stride:
            raise InputError(f"input size must be a positive multiple of {stride}, got {size}")
        grid = size // stride
        self.profile = replace(self.profile, input_size=size)
        self.prompt_encoder.input_image_size = (size, size)
        self.prompt_encoder.image_embedding_size = (grid, grid)
        self.prompt_encoder.mask_input_size = (4 * grid, 4 * grid)

    def require_features(self, indexes: Sequence[int]) -> None:
        """Ask ``encode`` to keep these encoder blocks/stages too (adapters call this when attaching)."""
        self.feature_indexes = tuple(sorted(set(self.feature_indexes) | {int(i) for i in indexes}))

    # ------------------------------------------------------------------ the three stages
    def encode(self, images: torch.Tensor, feature_indexes: Sequence[int] | None = None) -> EncoderOutput:
        """(B, 3, S, S) preprocessed images -> embedding (B, 256, h, w) and requested features.

        ``feature_indexes`` defaults to :attr:`feature_indexes` (what the attached adapters need).
        """
        indexes = self.feature_indexes if feature_indexes is None else tuple(feature_indexes)
        encoder = cast(FeatureEncoder, self.image_encoder)
        embedding, features = encoder.forward_with_features(images, indexes)
        return EncoderOutput(embedding, features, images if self.keep_image else None)

    def embed_prompts(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the encoder frame -> (sparse (P, N, 256), dense (P, 256, h, w))."""
        return self.prompt_encoder(points=points, boxes=boxes, masks=masks)

    def decode_embeddings(
        self,
        image_embeddings: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        *,
        multimask_output: bool = False,
        features: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 or P, 256, h, w) embeddings + prompt embeddings -> (logits (P, K, 4h, 4w), IoU (P, K))."""
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            features=list(features),
        )

    # ------------------------------------------------------------------ conveniences
    def decode(
        self,
        image_embeddings: torch.Tensor,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
        features: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt the decoder on precomputed embeddings (coordinates in the encoder frame).

        Args:
            image_embeddings: (1 or B, 256, 64, 64).
            points: ((B, N, 2) xy, (B, N) labels) or None. boxes: (B, 4) xyxy or None.
            mask_input: (B, 1, 256, 256) logits or None.
            features: the encoder features the decoder asked for (same batch rows as the embedding).

        Returns:
            (low-res logits (B, K, 256, 256), IoU predictions (B, K)).
        """
        sparse, dense = self.embed_prompts(points, boxes, mask_input)
        return self.decode_embeddings(
            image_embeddings, sparse, dense, multimask_output=multimask_output, features=features
        )

    def decode_prompts(
        self, encoded: EncoderOutput, prompts: PromptBatch, *, multimask_output: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode P prompts against the B encoded images they point into.

        An empty :class:`PromptBatch` (no points, boxes or masks) uses the ``prompt_generator``;
        without one it decodes SAM's "no prompt" embedding. A multi-class generator decodes the class
        ``prompts.classes`` of each prompt, or, without ``classes``, every class of each prompt's
        image (P x C masks, class-major within each prompt).

        Returns:
            (logits (P, K, 4h, 4w), IoU (P, K)); K = 3 with ``multimask_output`` else 1.
        """
        if encoded.embedding.shape[0] == 1 and prompts.image_index is None:
            prompts = replace(prompts, image_index=torch.zeros(prompts.size or 1, dtype=torch.long))
        index = prompts.indexes(encoded.embedding.shape[0], encoded.embedding.device)
        generated = None
        if prompts.is_empty and self.prompt_generator is not None:
            generated = self.prompt_generator(encoded)  # per image
            if generated[1].dim() == 5 and prompts.classes is None:  # every class of each image
                count = generated[1].shape[1]
                classes = torch.arange(count, device=index.device).repeat(index.shape[0])
                prompts = replace(prompts, classes=classes)
                index = index.repeat_interleave(count)
        # one image: decoders broadcast its embedding and features over the prompts (no copies here)
        per_prompt = encoded if encoded.embedding.shape[0] == 1 else encoded.select(index)
        if generated is not None:
            sparse, dense = generated
            if dense.dim() == 5:  # (B, C, ...): pick each prompt's class
                assert prompts.classes is not None
                classes = prompts.classes.to(device=index.device, dtype=torch.long)
                sparse, dense = sparse[index, classes], dense[index, classes]
            else:
                sparse, dense = sparse[index], dense[index]
        else:
            points = None
            if prompts.points is not None and prompts.point_labels is not None:
                points = (prompts.points, prompts.point_labels)
            sparse, dense = self.embed_prompts(points, prompts.boxes, prompts.masks)
            if sparse.shape[0] != index.shape[0]:  # no prompt tensor: one "no prompt" per image
                sparse = sparse.expand(index.shape[0], -1, -1)
                dense = dense.expand(index.shape[0], -1, -1, -1)
        return self.decode_embeddings(
            per_prompt.embedding,
            sparse,
            dense,
            multimask_output=multimask_output,
            features=per_prompt.features,
        )

    def forward_batch(
        self, images: torch.Tensor, prompts: PromptBatch, *, multimask_output: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward: encode B images once, decode P prompts; differentiable end to end.

        Args:
            images: (B, 3, S, S) preprocessed.
            prompts: P prompts with ``image_index`` (P,) into the B images.

        Returns:
            (logits (P, K, 4h, 4w), IoU (P, K)).
        """
        return self.decode_prompts(self.encode(images), prompts, multimask_output=multimask_output)

    def forward(
        self,
        images: torch.Tensor,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and decode in one differentiable pass, one prompt per image; see :meth:`decode`."""
        coords, labels = points if points is not None else (None, None)
        batch = PromptBatch(coords, labels, boxes, mask_input)
        return self.forward_batch(images, batch, multimask_output=multimask_output)
