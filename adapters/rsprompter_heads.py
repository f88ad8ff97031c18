"""RsPrompter building blocks: the feature aggregator and the query and anchor prompters.

Shapes use B images, E the core's prompt dimension (256 on official cores), h x w the image-embedding grid
(64 x 64 at 1024, 64 x 64 for LiteMedSAM at 256, 8 x 8 for the tiny test core), Q queries, K prompt tokens
per object, C classes. See :mod:`samadapt.adapters.rsprompter` for the method and where it was simplified.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from samadapt.adapter import AdapterError
from samadapt.modeling.image_encoder_vit import ImageEncoderViT
from samadapt.modeling.tiny_vit import TinyViT


@dataclass(frozen=True)
class LayerSpec:
    """One intermediate encoder output the aggregator reads: its block/stage index and channels."""

    index: int
    chans: int


def default_layers(encoder: nn.Module) -> list[LayerSpec]:
    """Every other ViT block from block 1 (RsPrompter's ``range(1, depth, 2)``: 1, 3, ..., 11 on ViT-B),
    or TinyViT stages 0-3 (LiteMedSAM has four stages, not a dozen blocks)."""
    return layer_specs(encoder, None)


def layer_specs(encoder: nn.Module, indexes: Sequence[int] | None) -> list[LayerSpec]:
    """Channels of the encoder outputs ``indexes`` (None: :func:`default_layers`'s choice).

    Raises:
        AdapterError: an encoder other than ViT/TinyViT, or an index it does not have.
    """
    if isinstance(encoder, ImageEncoderViT):
        depth = len(encoder.blocks)
        dim = int(encoder.patch_embed.proj.out_channels)
        chosen = list(range(1, depth, 2)) or [depth - 1] if indexes is None else [int(i) for i in indexes]
        if any(not 0 <= i < depth for i in chosen):
            raise AdapterError(f"RsPrompter: ViT blocks are 0..{depth - 1}, got {chosen}")
        return [LayerSpec(i, dim) for i in chosen]
    if isinstance(encoder, TinyViT):
        stages = list(encoder.layers)
        chosen = list(range(len(stages))) if indexes is None else [int(i) for i in indexes]
        if any(not 0 <= i < len(stages) for i in chosen):
            raise AdapterError(f"RsPrompter: TinyViT stages are 0..{len(stages) - 1}, got {chosen}")
        specs = []
        for i in chosen:
            merge = getattr(stages[i], "downsample", None)
            if merge is not None:
                chans = int(merge.conv3.c.out_channels)
            else:
                last: Any = cast(nn.ModuleList, stages[i].blocks)[-1]
                chans = int(last.mlp.fc2.out_features)
            specs.append(LayerSpec(i, chans))
        return specs
    raise AdapterError(f"RsPrompter needs a ViT or TinyViT image encoder, not {type(encoder).__name__}")


def as_map(feature: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """ViT (B, h, w, D) or TinyViT (B, tokens, C) -> (B, channels, h', w') resized to ``grid``."""
    if feature.ndim == 4:
        out = feature.permute(0, 3, 1, 2)
    else:
        side = math.isqrt(feature.shape[1])
        out = feature.transpose(1, 2).reshape(feature.shape[0], -1, side, side)
    if tuple(out.shape[-2:]) != grid:
        out = F.interpolate(out, size=grid, mode="bilinear", align_corners=False)
    return out


def _conv(cin: int, cout: int, k: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(groups, cout), nn.ReLU()
    )


class FeatureAggregator(nn.Module):
    """RsPrompter's aggregator: per layer 1x1 + 3x3 down-convolutions to ``hidden`` channels, recurrent
    residual fusion ``s = x + f_i; x = s + conv(s)``, then a fusion head to E channels.

    GroupNorm replaces the reference's BatchNorm (batches of 1-2 tiles are the norm here).

    Shapes: features as the encoder gives them -> (B, E, h, w) on the embedding grid.
    """

    def __init__(self, specs: Sequence[LayerSpec], out_chans: int, hidden: int = 32) -> None:
        super().__init__()
        groups = math.gcd(8, hidden)
        self.down = nn.ModuleList(
            nn.Sequential(_conv(s.chans, hidden, 1, groups), _conv(hidden, hidden, 3, groups)) for s in specs
        )
        self.hidden = nn.ModuleList(_conv(hidden, hidden, 3, groups) for _ in specs[1:])
        out_groups = math.gcd(8, out_chans)
        self.fusion = nn.Sequential(
            _conv(hidden, out_chans, 1, out_groups),
            _conv(out_chans, out_chans, 3, out_groups),
            nn.Conv2d(out_chans, out_chans, 3, padding=1),
        )

    def forward(self, features: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        maps = [down(as_map(f, grid)) for down, f in zip(self.down, features, strict=True)]
        x = maps[0]
        for conv, f in zip(self.hidden, maps[1:], strict=True):
            s = x + f
            x = s + conv(s)
        return self.fusion(x)


def sincos_tokens(raw: torch.Tensor) -> torch.Tensor:
    """RsPrompter's trick: (..., K, 2E) -> (..., K, E) as ``sin(e[..., ::2]) + e[..., 1::2]``."""
    return torch.sin(raw[..., ::2]) + raw[..., 1::2]


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class QueryPrompter(nn.Module):
    """Learned queries over the aggregated map -> class logits and K sparse prompt tokens per query.

    As RsPrompter's ``lightning`` query prompter (``SAMTransformerEDPromptGenNeck``): a transformer
    encoder layer over the aggregated map (with SAM's dense positional encoding), then decoder layers in
    which Q learned queries attend to it; each query gives ``C + 1`` class logits (the last: no object)
    and K prompt tokens (MLP to K x 2E, then :func:`sincos_tokens`).

    Shapes: (B, E, h, w) map, (1, E, h, w) PE -> logits (B, Q, C + 1), tokens (B, Q, K, E).
    """

    def __init__(
        self,
        dim: int,
        num_queries: int,
        num_classes: int,
        tokens: int,
        heads: int = 8,
        encoder_layers: int = 1,
        decoder_layers: int = 4,
    ) -> None:
        super().__init__()
        heads = math.gcd(heads, dim)
        self.tokens, self.dim = tokens, dim
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_pos = nn.Embedding(num_queries, dim)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True)
            for _ in range(encoder_layers)
        )
        self.decoder = nn.ModuleList(
            nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True)
            for _ in range(decoder_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.class_head = _mlp([dim, dim, num_classes + 1])
        self.point_head = _mlp([dim, dim, dim, 2 * dim * tokens])

    def forward(self, fmap: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = fmap.shape[0]
        pos = pe.flatten(2).transpose(1, 2)  # (1, h*w, E)
        memory = fmap.flatten(2).transpose(1, 2)  # (B, h*w, E)
        for layer in self.encoder:
            memory = layer(memory + pos)
        memory = memory + pos
        queries = self.query_feat.weight[None].expand(batch, -1, -1)
        qpos = self.query_pos.weight[None]
        for layer in self.decoder:
            queries = layer(queries + qpos, memory)
        queries = self.norm(queries)  # (B, Q, E)
        logits = self.class_head(queries)
        raw = self.point_head(queries).view(batch, queries.shape[1], self.tokens, 2 * self.dim)
        return logits, sincos_tokens(raw)


def make_anchors(grid: tuple[int, int], stride: float, sizes: Sequence[float], ratios: Sequence[float]):
    """Anchors centred on each cell of an (h, w) grid: (h * w * A, 4) x0, y0, x1, y1 in input pixels,
    cell-major (A = len(sizes) * len(ratios) per cell)."""
    shapes = []
    for size in sizes:
        for ratio in ratios:  # ratio = height / width, area size^2
            w = size / math.sqrt(ratio)
            shapes.append((w, size * math.sqrt(ratio)))
    wh = torch.tensor(shapes)  # (A, 2)
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([xs, ys], dim=-1).reshape(-1, 1, 2).float().add(0.5).mul(stride)  # (h*w, 1, 2)
    return torch.cat([centres - wh / 2, centres + wh / 2], dim=-1).reshape(-1, 4)


def decode_boxes(anchors: torch.Tensor, deltas: torch.Tensor, clip: float) -> torch.Tensor:
    """Faster R-CNN box decoding: (N, 4) anchors + (N, 4) dx, dy, dw, dh -> (N, 4) boxes in [0, clip]."""
    wh = anchors[:, 2:] - anchors[:, :2]
    ctr = anchors[:, :2] + wh / 2
    dwh = deltas[:, 2:].clamp(max=math.log(1000.0 / 16))
    new_ctr, new_wh = ctr + deltas[:, :2] * wh, wh * dwh.exp()
    return torch.cat([new_ctr - new_wh / 2, new_ctr + new_wh / 2], dim=1).clamp(0, clip)


def encode_boxes(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`decode_boxes`: regression targets (N, 4) of ``boxes`` relative to ``anchors``."""
    wh = (anchors[:, 2:] - anchors[:, :2]).clamp(min=1e-3)
    bwh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3)
    dctr = (boxes[:, :2] + bwh / 2 - anchors[:, :2] - wh / 2) / wh
    return torch.cat([dctr, (bwh / wh).log()], dim=1)


class AnchorPrompter(nn.Module):
    """A one-stage anchor head + a RoI prompt head on the aggregated map (simplified RsPrompter-anchor).

    - detection: a 3x3 conv trunk, then per anchor ``C + 1`` class logits (index 0: background) and 4
      box deltas (the RPN and the box head of the reference's Mask R-CNN, folded into one stage on the
      single stride-16 map instead of an FPN);
    - prompts: RoIAlign 14 x 14 of the aggregated map (+ SAM's dense PE, the reference's extra PE) per
      box, then conv 3x3 stride 2, flatten, MLP to K x 2E and :func:`sincos_tokens` (as ``point_emb``).

    Shapes: map (B, E, h, w) -> class logits (B, h*w*A, C + 1), deltas (B, h*w*A, 4);
    :meth:`prompts`: boxes as a list of (R_b, 4) in input pixels -> tokens (sum R_b, K, E).
    """

    def __init__(
        self, dim: int, num_classes: int, tokens: int, anchors_per_cell: int, roi: int = 14, hidden: int = 256
    ) -> None:
        super().__init__()
        groups = math.gcd(8, dim)
        self.tokens, self.dim, self.roi, self.anchors = tokens, dim, roi, anchors_per_cell
        self.trunk = nn.Sequential(_conv(dim, dim, 3, groups), _conv(dim, dim, 3, groups))
        self.cls = nn.Conv2d(dim, anchors_per_cell * (num_classes + 1), 1)
        self.reg = nn.Conv2d(dim, anchors_per_cell * 4, 1)
        nn.init.zeros_(self.reg.weight)
        nn.init.zeros_(cast(torch.Tensor, self.reg.bias))
        self.roi_conv = _conv(dim, dim, 3, groups)[:1]  # conv only; stride set below
        self.roi_conv[0] = nn.Conv2d(dim, dim, 3, stride=2, padding=1)
        self.roi_norm = nn.GroupNorm(groups, dim)
        side = (roi + 1) // 2
        self.point_head = _mlp([dim * side * side, hidden, hidden, 2 * dim * tokens])

    def detect(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.trunk(fmap)
        batch = x.shape[0]
        logits = self.cls(x).permute(0, 2, 3, 1).reshape(batch, -1, self.cls.out_channels // self.anchors)
        deltas = self.reg(x).permute(0, 2, 3, 1).reshape(batch, -1, 4)
        return logits, deltas

    def prompts(self, fmap: torch.Tensor, boxes: list[torch.Tensor], scale: float) -> torch.Tensor:
        """K tokens per box; ``scale`` = grid cells per input pixel (1 / stride)."""
        pooled = roi_align(fmap, boxes, output_size=self.roi, spatial_scale=scale, aligned=True)
        x = F.relu(self.roi_norm(self.roi_conv(pooled)))  # (R, E, roi/2, roi/2)
        raw = self.point_head(x.flatten(1)).view(-1, self.tokens, 2 * self.dim)
        return sincos_tokens(raw)
