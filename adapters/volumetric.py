"""3DSAM-adapter (Gong et al. 2023, MedIA 2024) on the samadapt core: a volumetric adapter.

The 2D ViT of a SAM/MedSAM core becomes a 3D encoder (:mod:`samadapt.adapters.volumetric_blocks`):
frozen patch embedding per slice plus a trainable depth-wise slice embedding, SAM's pos-embed pooled
plus a learnable depth embedding, 3D (shifted) window attention with frozen qkv/proj and decomposed
relative positions along rows, columns and depth, a depth-wise-conv 3D adapter per block, trainable
LayerNorms, and four 3D necks. A point "visual sampler" prompts the last neck and a multi-level 3D
decoder turns the four levels into a mask (:mod:`samadapt.adapters.volumetric_heads`). Loss: MONAI
DiceCE (0.5 / 0.5), the reference's two-class softmax without background written as its exact
single-logit sigmoid form. Training prompts: positive voxels from the label and negative ones from
the background (:func:`sample_points_3d`).

Trainable on ViT-B (design, medical.md appendix A: 25,462,400): encoder side 15,209,984, one prompt
encoder 3,164,160 (+ 512 for the point-label embedding added here), decoder 7,088,256.

Frames: volumes are (B, 1 or 3, S0, S1, S2) with slices along the last axis (MONAI's order after
``Orientation``); points are voxel indexes (i, j, k) of the same array, (P, N, 3) in
:class:`PromptBatch.points`, labels (P, N) with 1 positive, 0 negative, -1 padding.
"""

from __future__ import annotations

import torch
from torch import nn

from samadapt.adapter import (
    GENERATES_PROMPTS,
    REPLACES_DECODER,
    WRAPS_ENCODER,
    Adapter,
    AdapterError,
    register_adapter,
)
from samadapt.adapters.volumetric_blocks import EncoderParts, VolumetricEncoder
from samadapt.adapters.volumetric_heads import MLAHead3D, PointPrompts3D, VisualSampler, VolumetricDecoder
from samadapt.modeling import PromptBatch, SamModel
from samadapt.modeling.image_encoder_vit import ImageEncoderViT


def _pick(pool: torch.Tensor, count: int, generator: torch.Generator | None) -> tuple[torch.Tensor, bool]:
    """``count`` flat indexes drawn with replacement from the True entries of ``pool`` (V,);
    (indexes, whether the pool had any)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long), True
    weights = pool.float().cpu()
    if weights.sum() == 0:
        return torch.zeros(count, dtype=torch.long), False
    return torch.multinomial(weights, count, replacement=True, generator=generator), True


def sample_points_3d(
    masks: torch.Tensor,
    positive: int,
    negative: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training clicks from (P, 1, S0, S1, S2) {0, 1} masks: ``positive`` voxels on the object (label 1)
    then ``negative`` voxels off it (label 0), drawn uniformly with replacement. A pool that is empty
    (no object, or no background) gives padding points (label -1) that the prompt encoder ignores.

    Returns:
        points (P, positive + negative, 3) voxel indexes (i, j, k) as floats; labels (P, N).
    """
    count = masks.shape[0]
    shape = masks.shape[2:]
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1])
    all_points, all_labels = [], []
    for p in range(count):
        flat = masks[p, 0].reshape(-1) > 0.5
        picks, labels = [], []
        for pool, wanted, label in ((flat, positive, 1.0), (~flat, negative, 0.0)):
            index, found = _pick(pool, wanted, generator)
            picks.append(index)
            labels.append(torch.full((wanted,), label if found else -1.0))
        index = torch.cat(picks)
        coords = torch.stack([index // strides[0], (index // strides[1]) % shape[1], index % shape[2]], dim=1)
        all_points.append(coords.float())
        all_labels.append(torch.cat(labels))
    device = masks.device
    return torch.stack(all_points).to(device), torch.stack(all_labels).to(device)


@register_adapter("volumetric")
class VolumetricAdapter(Adapter):
    """The 3DSAM-adapter on a SAM ViT core (SAM ViT-B/L/H, MedSAM, or the tiny test core).

    Args:
        scale: trilinear upsampling of the input crop before the patch embedding (4: a 128^3 crop
            becomes 512^3, 32^3 tokens of 4^3 voxels each, as the reference).
        slice_depth: slices fused by the depth-wise slice embedding (None: the patch size, 16).
        grid_depth: length of the learnable depth embedding (32 at the design size; resampled for
            other crop depths).
        window: cubic attention window in tokens (8); even blocks shift by window // 2.
        adapter_ratio: hidden width of the 3D adapters as a fraction of the ViT width (0.5).
        neck_chans: channels of the 3D necks and of the prompt encoder (256).
        head_chans: channels of the decoder's level heads (128).
        prompt_heads, prompt_mlp_dim, prompt_depth, global_tokens: the visual sampler (8, 2048, 2, 10).
        positive_points, negative_points: training clicks per volume: the counts are drawn uniformly
            from 1..positive_points and 0..negative_points for each batch when ``random_counts``,
            else fixed (the reference: 10 positive, 20 from the crop).
        random_counts: vary the click counts so that one click at inference is in distribution.
        window_chunk: windows attended at once (memory bound at inference; no effect on results).
        spacing, clip, mean, std: how the training volumes were prepared (voxel size in mm, intensity
            window, z-score statistics; None: the volume's own). Not used by the model itself: recorded
            in ``adapter.json`` so that inference prepares a new volume the same way. Keep them equal
            to the data module's settings (the recipes do).
    """

    capabilities = frozenset({WRAPS_ENCODER, GENERATES_PROMPTS, REPLACES_DECODER})

    def __init__(
        self,
        scale: float = 4.0,
        slice_depth: int | None = None,
        grid_depth: int = 32,
        window: int = 8,
        adapter_ratio: float = 0.5,
        neck_chans: int = 256,
        head_chans: int = 128,
        prompt_heads: int = 8,
        prompt_mlp_dim: int = 2048,
        prompt_depth: int = 2,
        global_tokens: int = 10,
        positive_points: int = 10,
        negative_points: int = 20,
        random_counts: bool = True,
        window_chunk: int = 64,
        spacing: list[float] | tuple[float, float, float] | None = (1.0, 1.0, 1.0),
        clip: list[float] | tuple[float, float] | None = (-175.0, 250.0),
        mean: float | None = None,
        std: float | None = None,
    ) -> None:
        if scale <= 0 or window < 1 or positive_points < 1 or negative_points < 0:
            raise ValueError(
                "scale > 0, window >= 1, positive_points >= 1 and negative_points >= 0 are required"
            )
        super().__init__(
            unfreeze=(),
            init_args={
                "scale": scale,
                "slice_depth": slice_depth,
                "grid_depth": grid_depth,
                "window": window,
                "adapter_ratio": adapter_ratio,
                "neck_chans": neck_chans,
                "head_chans": head_chans,
                "prompt_heads": prompt_heads,
                "prompt_mlp_dim": prompt_mlp_dim,
                "prompt_depth": prompt_depth,
                "global_tokens": global_tokens,
                "positive_points": positive_points,
                "negative_points": negative_points,
                "random_counts": random_counts,
                "window_chunk": window_chunk,
                "spacing": None if spacing is None else [float(v) for v in spacing],
                "clip": None if clip is None else [float(v) for v in clip],
                "mean": mean,
                "std": std,
            },
        )
        self.scale, self.slice_depth, self.grid_depth = scale, slice_depth, grid_depth
        self.window, self.adapter_ratio, self.window_chunk = window, adapter_ratio, window_chunk
        self.neck_chans, self.head_chans = neck_chans, head_chans
        self.prompt_args = (prompt_heads, prompt_mlp_dim, prompt_depth, global_tokens)
        self.positive_points, self.negative_points = positive_points, negative_points
        self.random_counts = random_counts
        self.spacing = None if spacing is None else tuple(float(v) for v in spacing)
        self.clip = None if clip is None else tuple(float(v) for v in clip)
        self.mean, self.std = mean, std
        self.encoder: EncoderParts | None = None
        self.prompt_encoder: VisualSampler | None = None
        self.decoder: MLAHead3D | None = None

    def install(self, model: SamModel) -> None:
        vit = model.image_encoder
        if not isinstance(vit, ImageEncoderViT):
            raise AdapterError(
                f"the volumetric adapter needs a SAM ViT image encoder; {model.variant} has "
                f"{type(vit).__name__}"
            )
        device = vit.pos_embed.device
        patch = int(vit.patch_embed.proj.stride[0])
        slice_depth = self.slice_depth or patch
        self.encoder = EncoderParts(vit, self.grid_depth, slice_depth, self.adapter_ratio, self.neck_chans)
        heads, mlp_dim, depth, tokens = self.prompt_args
        self.prompt_encoder = VisualSampler(self.neck_chans, heads, mlp_dim, depth, tokens)
        self.decoder = MLAHead3D(self.neck_chans, self.head_chans, num_classes=2)
        self.to(device)
        encoder = VolumetricEncoder(vit, self.encoder, self.scale, self.window, self.window_chunk)
        # frozen 2D parts the 3D model no longer calls (the 2D neck and norms, SAM's prompt encoder and
        # decoder) leave the model: they neither count nor travel
        model.image_encoder = encoder
        model.prompt_encoder = PointPrompts3D().to(device)  # type: ignore[assignment]
        model.mask_decoder = VolumetricDecoder(self.prompt_encoder, self.decoder, encoder.voxels_per_token())

    def volumetric_encoder(self, model: SamModel) -> VolumetricEncoder:
        """The attached model's 3D encoder."""
        encoder = model.image_encoder
        if not isinstance(encoder, VolumetricEncoder):
            raise AdapterError("this model has no volumetric encoder (attach the adapter first)")
        return encoder

    def patch_size(self, model: SamModel) -> tuple[int, int, int]:
        """The input patch (S0, S1, S2) the depth embedding was made for (128^3 by default)."""
        encoder = self.volumetric_encoder(model)
        per_token = encoder.voxels_per_token()
        grid = self.grid_depth
        return (round(grid * per_token[0]), round(grid * per_token[1]), round(grid * per_token[2]))

    def simulate_prompts(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> PromptBatch:
        """3D clicks for (P, 1, S0, S1, S2) masks: see :func:`sample_points_3d` and the class args."""
        positive, negative = self.positive_points, self.negative_points
        if self.random_counts:
            positive = int(torch.randint(1, positive + 1, (1,), generator=generator))
            negative = int(torch.randint(0, negative + 1, (1,), generator=generator))
        points, labels = sample_points_3d(masks, positive, negative, generator)
        return PromptBatch(points=points, point_labels=labels)

    def loss(
        self, logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """MONAI DiceCE (lambda 0.5 / 0.5) on (P, 1, S0, S1, S2) logits against {0, 1} targets.

        With ``sigmoid=True`` on the logit difference this equals the reference's
        ``DiceCELoss(softmax=True, to_onehot_y=True, include_background=False)`` on two classes.
        """
        from monai.losses import DiceCELoss

        if logits.shape != targets.shape:
            raise AdapterError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
        term = DiceCELoss(sigmoid=True, lambda_dice=0.5, lambda_ce=0.5)(logits.float(), targets.float())
        return {"dice_ce": term.detach(), "loss": term}

    def extra_repr(self) -> str:
        return f"scale={self.scale}, window={self.window}"


def trainable_groups(adapter: VolumetricAdapter) -> dict[str, int]:
    """Trainable parameter counts by design group (encoder side, prompt encoder, decoder)."""

    def count(module: nn.Module | None) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    return {
        "encoder": count(adapter.encoder),
        "prompt_encoder": count(adapter.prompt_encoder),
        "decoder": count(adapter.decoder),
    }
