"""SAM's prompt encoder: points, boxes and low-res masks -> sparse and dense prompt embeddings."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from samadapt.modeling.common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates."""

    positional_encoding_gaussian_matrix: torch.Tensor

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1], (..., 2) -> (..., 2 * num_pos_feats)."""
        gaussian = self.positional_encoding_gaussian_matrix
        coords = (2 * coords - 1) @ gaussian.to(coords.dtype)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense encoding of an (H, W) grid of cell centres: (C, H, W)."""
        height, width = size
        gaussian = self.positional_encoding_gaussian_matrix
        grid = torch.ones((height, width), device=gaussian.device, dtype=gaussian.dtype)
        y_embed = (grid.cumsum(dim=0) - 0.5) / height
        x_embed = (grid.cumsum(dim=1) - 0.5) / width
        pe = self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1))
        return pe.permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates (B, N, 2) in an (H, W) input frame -> (B, N, C)."""
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self._pe_encoding(coords.to(torch.float))


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Args:
        embed_dim: prompt embedding channels (256).
        image_embedding_size: (H, W) of the image embedding (64, 64).
        input_image_size: (H, W) of the padded encoder input (1024 or 256).
        mask_in_chans: hidden channels of the mask-input downscaler (16).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.num_point_embeddings = 4  # positive point, negative point, 2 box corners
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        self._dense_pe: torch.Tensor | None = None
        self._dense_pe_key: tuple | None = None

    def _point_weight(self, index: int) -> torch.Tensor:
        """(1, C) embedding of point kind ``index``: 0 negative, 1 positive, 2/3 box corners."""
        return cast(nn.Embedding, self.point_embeddings[index]).weight

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: (1, C, H, W).

        Cached at inference (it depends only on the grid size and the fixed Gaussian matrix); with
        autograd on it is recomputed, so nothing stale or detached enters a training graph.
        """
        if torch.is_grad_enabled():
            return self.pe_layer(self.image_embedding_size).unsqueeze(0)
        gaussian = self.pe_layer.positional_encoding_gaussian_matrix
        key = (self.image_embedding_size, gaussian.device, gaussian.dtype, gaussian._version, id(gaussian))
        if self._dense_pe_key != key:
            self._dense_pe = self.pe_layer(self.image_embedding_size).unsqueeze(0)
            self._dense_pe_key = key
        assert self._dense_pe is not None
        return self._dense_pe

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """points (B, N, 2), labels (B, N) with 1 = fg, 0 = bg, -1 = padding -> (B, N(+1), C)."""
        points = points + 0.5  # pixel centre
        if pad:
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight.expand_as(embedding), embedding)
        embedding = embedding + torch.where(labels == 0, self._point_weight(0), 0.0)
        return embedding + torch.where(labels == 1, self._point_weight(1), 0.0)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes (B, 4) or (B, 1, 4) as x0, y0, x1, y1 -> (B, 2, C)."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        embedding[:, 0, :] += self._point_weight(2)[0]
        embedding[:, 1, :] += self._point_weight(3)[0]
        return embedding

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """masks (B, 1, 4H, 4W) logits -> (B, C, H, W)."""
        return self.mask_downscaling(masks)

    def _batch_size(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed any combination of prompts.

        Returns:
            sparse (B, N, C) for points and box corners; dense (B, C, H, W) from the mask input or the
            learned no-mask embedding.
        """
        batch = self._batch_size(points, boxes, masks)
        weight = self._point_weight(0)
        sparse = torch.empty((batch, 0, self.embed_dim), device=weight.device, dtype=weight.dtype)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            height, width = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, height, width)
        return sparse, dense
