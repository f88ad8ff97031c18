"""3DSAM-adapter's point prompt encoder ("visual sampler") and multi-level 3D decoder (medical.md §4).

::

    last neck (P, N, g0, g1, g2) ──┬─ point tokens: the neck sampled at each 3D point (grid_sample)
                                   │  + a label embedding (positive / negative) + 3D Fourier PE
                                   └─ 2 x [global queries (10) ; point tokens] self-attention,
                                      queries read the image, MLP on the global queries,
                                      every image token attends to the global queries
                                   -> prompted neck (P, N, g0, g1, g2)
    decoder: [neck 0, neck 1, neck 2, prompted neck] each 2 x (Conv3d 3^3 + IN + ReLU) to 128 ch,
             x2 trilinear, concatenated with the image at 2g (1 ch) -> Conv3d + IN + ReLU -> Conv3d
             (2 classes) -> trilinear to the input size; the mask logit is class 1 minus class 0.

Differences from the reference, each small: points carry a label embedding (negative clicks mean
"not here"; the reference has no point labels, 512 parameters); the points' positional encoding is
added to their tokens (the reference computes it and never uses it); the tokens-to-image attention,
built but never called in the reference, is applied (same parameters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.adapter import AdapterError
from samadapt.modeling.common import MLPBlock


class TokenAttention(nn.Module):
    """SAM's two-way-transformer attention (q/k/v/out projections, optional internal downsampling)
    through ``scaled_dot_product_attention``; ``key_valid`` (B, Nk) masks padding keys."""

    def __init__(self, dim: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, Nq, C), (B, Nk, C), (B, Nk, C) -> (B, Nq, C)."""

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, inner) -> (B, heads, N, inner / heads)
            return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

        mask = key_valid[:, None, None, :] if key_valid is not None else None
        out = F.scaled_dot_product_attention(
            split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v)), attn_mask=mask
        )
        return self.out_proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1))


class SamplerBlock(nn.Module):
    """One visual-sampler layer (the reference's ``TwoWayAttentionBlock`` with global queries)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, global_tokens: int) -> None:
        super().__init__()
        self.self_attn = TokenAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TokenAttention(dim, heads, downsample=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TokenAttention(dim, heads, downsample=2)
        self.global_query = nn.Parameter(0.1 * torch.randn(1, global_tokens, dim))

    def forward(
        self,
        image: torch.Tensor,
        image_pe: torch.Tensor,
        points: torch.Tensor,
        point_pe: torch.Tensor,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image (P, T, C), image_pe (1, T, C), points and point_pe (P, N, C), valid (P, N) bool
        -> (image (P, T, C), points (P, N, C))."""
        count, tokens = points.shape[0], self.global_query.shape[1]
        queries = torch.cat([self.global_query.expand(count, -1, -1), points + point_pe], dim=1)
        key_valid = torch.cat([valid.new_ones(count, tokens), valid], dim=1)
        queries = self.norm2(queries + self.norm1(self.self_attn(queries, queries, queries, key_valid)))
        queries = queries + self.cross_attn_token_to_image(queries, image + image_pe, image)
        points, global_tokens = queries[:, tokens:], queries[:, :tokens]
        global_tokens = self.norm3(global_tokens + self.mlp(global_tokens))
        image = self.norm4(
            image + self.cross_attn_image_to_token(image + image_pe, global_tokens, global_tokens)
        )
        return image, points


def normalised(points: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(P, N, 3) voxel indexes in a (S0, S1, S2) crop -> voxel centres in [0, 1]^3, same order."""
    extent = torch.tensor([float(s) for s in size], device=points.device)
    return (points.float() + 0.5) / extent


class VisualSampler(nn.Module):
    """The 3D point prompt encoder: prompts the last neck with points (P, N, 3) and labels (P, N).

    Labels: 1 positive, 0 negative, -1 padding (ignored). Returns the prompted map (P, C, g0, g1, g2).
    """

    positional_encoding_gaussian_matrix: torch.Tensor

    def __init__(
        self, dim: int = 256, heads: int = 8, mlp_dim: int = 2048, depth: int = 2, global_tokens: int = 10
    ):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, dim // 2))
        self.label_embed = nn.Embedding(2, dim)
        self.layers = nn.ModuleList(SamplerBlock(dim, heads, mlp_dim, global_tokens) for _ in range(depth))

    def encode_positions(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 3) coordinates in [0, 1] -> (..., C) random Fourier features (SAM's, in 3D)."""
        projected = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        projected = 2 * math.pi * projected
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def grid_pe(self, grid: Sequence[int], device: torch.device) -> torch.Tensor:
        """(g0 * g1 * g2, C) encoding of the token centres, row-major over (g0, g1, g2)."""
        axes = [(torch.arange(g, device=device, dtype=torch.float32) + 0.5) / g for g in grid]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (g0, g1, g2, 3)
        return self.encode_positions(coords).reshape(-1, self.dim)

    @property
    def dim(self) -> int:
        return int(self.label_embed.weight.shape[1])

    def forward(
        self, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, size: Sequence[int]
    ) -> torch.Tensor:
        """embedding (1 or P, C, g0, g1, g2); points (P, N, 3) voxels of the (S0, S1, S2) input."""
        count = points.shape[0]
        if embedding.shape[0] != count:
            embedding = embedding.expand(count, -1, -1, -1, -1)
        grid = embedding.shape[2:]
        coords = normalised(points, size)  # (P, N, 3) in [0, 1]
        # grid_sample's last coordinate axis is (x, y, z) = (g2, g1, g0), in [-1, 1]
        sample_at = (2 * coords.flip(-1) - 1).to(embedding.dtype)[:, None, None]  # (P, 1, 1, N, 3)
        sampled = F.grid_sample(embedding, sample_at, align_corners=False)  # (P, C, 1, 1, N)
        point_tokens = sampled[:, :, 0, 0].transpose(1, 2)  # (P, N, C)
        valid = labels >= 0
        point_tokens = point_tokens + self.label_embed(labels.clamp(0, 1).long()) * valid[..., None]
        point_pe = self.encode_positions(coords).to(embedding.dtype)
        image = embedding.flatten(2).transpose(1, 2)  # (P, T, C), T = g0 * g1 * g2
        image_pe = self.grid_pe(grid, embedding.device).to(embedding.dtype)[None]  # (1, T, C)
        for layer in self.layers:
            image, point_tokens = layer(image, image_pe, point_tokens, point_pe, valid)
        return image.transpose(1, 2).reshape(count, -1, *grid)


def _conv_block(in_chans: int, out_chans: int) -> list[nn.Module]:
    return [nn.Conv3d(in_chans, out_chans, 3, padding=1, bias=False), nn.InstanceNorm3d(out_chans), nn.ReLU()]


class MLAHead3D(nn.Module):
    """The reference's ``VIT_MLAHead_h``: multi-level aggregation with 3D convolutions (7,088,256
    parameters at 256 -> 128 channels; convolutions without bias, InstanceNorm without affine)."""

    def __init__(self, in_chans: int = 256, head_chans: int = 128, num_classes: int = 2) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(*_conv_block(in_chans, head_chans), *_conv_block(head_chans, head_chans))
            for _ in range(4)
        )
        self.cls = nn.Sequential(
            *_conv_block(4 * head_chans + 1, head_chans),
            nn.Conv3d(head_chans, num_classes, 3, padding=1, bias=False),
        )

    def forward(self, maps: Sequence[torch.Tensor], image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """maps: 4 x (P, C, g0, g1, g2); image (P, 1, 2 g0, 2 g1, 2 g2) -> (P, classes, S0, S1, S2)."""
        upsampled = [
            F.interpolate(head(m), size=image.shape[2:], mode="trilinear", align_corners=True)
            for head, m in zip(self.heads, maps, strict=True)
        ]
        x = self.cls(torch.cat([*upsampled, image.to(upsampled[0].dtype)], dim=1))
        return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=True)


class PointPrompts3D(nn.Module):
    """Stands in for SAM's prompt encoder: passes 3D points through to the decoder.

    ``sparse`` is (P, N, 4): voxel (i, j, k) and the label; ``dense`` is an empty (P, 0). Boxes and
    mask prompts are refused (the volumetric adapter is prompted with 3D points).
    """

    def __init__(self) -> None:
        super().__init__()
        self.anchor: torch.Tensor
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows the model's device

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if boxes is not None or masks is not None:
            raise AdapterError("the volumetric adapter takes 3D points only (no boxes or mask prompts)")
        if points is None:
            sparse = self.anchor.new_zeros(1, 0, 4)
        else:
            coords, labels = points
            if coords.shape[-1] != 3:
                raise AdapterError(
                    f"the volumetric adapter needs (P, N, 3) points, got {tuple(coords.shape)}"
                )
            sparse = torch.cat([coords.float(), labels.float()[..., None]], dim=-1)
        return sparse, sparse.new_zeros(sparse.shape[0], 0)

    def get_dense_pe(self) -> torch.Tensor:
        return self.anchor


class VolumetricDecoder(nn.Module):
    """The model's mask decoder after the volumetric adapter attaches: sampler + MLA head.

    Called as SAM's decoder (``image_embeddings`` (1 or P, C, g0, g1, g2), sparse (P, N, 4) from
    :class:`PointPrompts3D`, features from the volumetric encoder); returns logits
    (P, 1, S0, S1, S2) (class 1 minus class 0 of the two-class head, so ``> 0`` is the mask and
    sigmoid is the softmax foreground probability) and a (P, 1) zero IoU (the design has no IoU head).
    """

    def __init__(self, sampler: VisualSampler, head: MLAHead3D, voxels_per_token: Sequence[float]) -> None:
        super().__init__()
        self.sampler = sampler
        self.head = head
        self.voxels_per_token = tuple(float(v) for v in voxels_per_token)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
        features: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if len(features) != 4:
            raise AdapterError(
                f"the 3D decoder needs the volumetric encoder's 4 features, got {len(features)}"
            )
        grid = image_embeddings.shape[2:]
        size = [round(g * v) for g, v in zip(grid, self.voxels_per_token, strict=True)]
        points, labels = sparse_prompt_embeddings[..., :3], sparse_prompt_embeddings[..., 3]
        prompted = self.sampler(image_embeddings, points, labels, size)
        count = prompted.shape[0]
        maps = [f.expand(count, *f.shape[1:]) if f.shape[0] != count else f for f in features]
        logits = self.head([*maps[:3], prompted], maps[3], size)  # (P, 2, S0, S1, S2)
        return logits[:, 1:] - logits[:, :1], logits.new_zeros(count, 1)
