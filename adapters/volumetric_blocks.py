"""The volumetric encoder of the 3DSAM-adapter (medical.md §4) built on a frozen 2D SAM ViT.

Token layout: (B, g0, g1, g2, D) where (g0, g1) is the in-plane grid of one slice (SAM's rows and
columns) and g2 runs across slices (the last array axis of the volume, as in the reference).

::

    volume (B, 1|3, S0, S1, S2) --trilinear x scale--> (B, C, S0', S1', S2')
    frozen 2D patch embedding per slice (p x p) + trainable depth-wise slice embedding (k slices)
        = one Conv3d with kernel (p, p, k), stride (p, p, k) whose weight is patch (x) slice: exact
    + pooled 2D pos-embed (frozen) + learnable depth embedding
    blocks: x = adapter3d(x); x = x + attn3d(norm1(x)); x = x + mlp(norm2(x))
        attn3d: frozen qkv/proj over cubic windows (shifted on even blocks, Swin mask), decomposed
        relative positions along rows/cols (SAM's tables, frozen) and depth (new, trainable)
    necks after the blocks ending each quarter: Conv3d 1x1 + LN3d + Conv3d 3x3 + LN3d

The trainable pieces live in :class:`EncoderParts` (owned by the adapter); :class:`VolumetricEncoder`
wires them together with the frozen core modules and replaces the model's image encoder.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from samadapt.modeling.common import LayerNorm2d, linear
from samadapt.modeling.image_encoder_vit import Attention, ImageEncoderViT, relative_positions


class LayerNorm3d(LayerNorm2d):
    """LayerNorm over the channel axis of a (B, C, X, Y, Z) tensor (the core's channel LayerNorm)."""


class DepthwiseAdapter3D(nn.Module):
    """3DSAM's spatial adapter: ``x + relu(lin2(relu(dwconv3d(relu(lin1(x))))))``.

    (B, g0, g1, g2, D) -> same; the hidden width is ``D * ratio`` (ViT-B: 384, 601,728 parameters).
    """

    def __init__(self, dim: int, ratio: float = 0.5) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.linear1 = nn.Linear(dim, hidden)
        self.conv = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.linear1(x))
        y = self.conv(y.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # conv on (B, hidden, g0, g1, g2)
        return x + F.relu(self.linear2(F.relu(y)))


def neck_3d(in_chans: int, out_chans: int) -> nn.Sequential:
    """SAM's neck in 3D: Conv3d 1x1 (no bias), LN3d, Conv3d 3x3 (no bias), LN3d."""
    return nn.Sequential(
        nn.Conv3d(in_chans, out_chans, kernel_size=1, bias=False),
        LayerNorm3d(out_chans),
        nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm3d(out_chans),
    )


def neck_indexes(depth: int) -> list[int]:
    """Blocks whose outputs feed the four necks: the ends of each quarter (ViT-B: 2, 5, 8, 11)."""
    return [max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)]


class EncoderParts(nn.Module):
    """Every trainable piece of the volumetric encoder, created from a 2D ViT's shapes.

    Args:
        vit: the 2D encoder whose frozen blocks are reused (its LayerNorms and relative-position
            tables initialise the copies here).
        grid_depth: tokens across slices at the design size (32 for a 128^3 crop at scale 4).
        slice_depth: slices fused by the depth-wise slice embedding (16).
        adapter_ratio: hidden width of the 3D adapters as a fraction of D (0.5).
        neck_chans: channels of the 3D necks (256).
    """

    def __init__(
        self, vit: ImageEncoderViT, grid_depth: int, slice_depth: int, adapter_ratio: float, neck_chans: int
    ) -> None:
        super().__init__()
        dim = int(vit.patch_embed.proj.out_channels)
        self.slice_embed = nn.Conv3d(
            dim, dim, kernel_size=(1, 1, slice_depth), stride=(1, 1, slice_depth), groups=dim
        )
        self.depth_embed = nn.Parameter(torch.ones(1, grid_depth, dim))  # ones as the reference's v2
        self.adapters = nn.ModuleList(DepthwiseAdapter3D(dim, adapter_ratio) for _ in vit.blocks)
        self.norms1 = nn.ModuleList(copy.deepcopy(cast(nn.Module, b.norm1)) for b in vit.blocks)
        self.norms2 = nn.ModuleList(copy.deepcopy(cast(nn.Module, b.norm2)) for b in vit.blocks)
        tables = []
        for block in vit.blocks:
            attn = block.attn
            if not isinstance(attn, Attention) or not attn.use_rel_pos:
                raise ValueError("the volumetric encoder needs SAM ViT blocks with relative positions")
            tables.append(nn.Parameter(0.5 * (attn.rel_pos_h.detach() + attn.rel_pos_w.detach())))
        self.rel_pos_d = nn.ParameterList(tables)  # reference init: the mean of the frozen h/w tables
        self.necks = nn.ModuleList(neck_3d(dim, neck_chans) for _ in range(4))


def window_partition_3d(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, G0, G1, G2, C) with every G a multiple of ``window`` -> (B * nWin, window^3, C)."""
    batch, g0, g1, g2, chans = x.shape
    x = x.view(batch, g0 // window, window, g1 // window, window, g2 // window, window, chans)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window**3, chans)


def window_unpartition_3d(windows: torch.Tensor, window: int, grid: Sequence[int]) -> torch.Tensor:
    """(B * nWin, window^3, C) -> (B, G0, G1, G2, C); inverse of :func:`window_partition_3d`."""
    g0, g1, g2 = grid
    n0, n1, n2 = g0 // window, g1 // window, g2 // window
    batch = windows.shape[0] // (n0 * n1 * n2)
    x = windows.view(batch, n0, n1, n2, window, window, window, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, g0, g1, g2, -1)


def shift_mask(grid: Sequence[int], window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Swin's mask for cyclically shifted windows: (nWin, window^3, window^3), 0 or -100."""
    regions = torch.zeros(1, *grid, 1, device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for a in cuts:
        for b in cuts:
            for c in cuts:
                regions[:, a, b, c, :] = count
                count += 1
    labels = window_partition_3d(regions, window)[..., 0]  # (nWin, window^3)
    different = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, -100.0)


def rel_pos_bias_3d(q: torch.Tensor, tables: Sequence[torch.Tensor], window: int) -> torch.Tensor:
    """Decomposed relative positions along the three axes as an additive bias.

    Args:
        q: (B, heads, window^3, hd) unscaled queries of cubic windows.
        tables: (L, hd) tables for axes 0, 1, 2 (resampled to 2 * window - 1 rows).

    Returns:
        (B, heads, window^3, window^3): q . R0[a, a'] + q . R1[b, b'] + q . R2[c, c'].
    """
    batch, heads, tokens, dim = q.shape
    r0, r1, r2 = (relative_positions(window, window, t) for t in tables)  # (w, w, hd) each
    grid = q.reshape(batch, heads, window, window, window, dim)
    b0 = torch.einsum("bnxyzc,xkc->bnxyzk", grid, r0)  # (B, heads, w, w, w, w)
    b1 = torch.einsum("bnxyzc,ykc->bnxyzk", grid, r1)
    b2 = torch.einsum("bnxyzc,zkc->bnxyzk", grid, r2)
    bias = b0[..., :, None, None] + b1[..., None, :, None] + b2[..., None, None, :]  # (..., w, w, w)
    return bias.reshape(batch, heads, tokens, tokens)


class VolumetricBlock(nn.Module):
    """One 3D block: trainable adapter, norms and depth table around SAM's frozen attention and MLP.

    Args:
        attn: the 2D block's :class:`Attention` (qkv, proj, rel_pos_h/w are used, frozen).
        mlp: the 2D block's MLP (frozen).
        adapter, norm1, norm2, rel_pos_d: trainable pieces from :class:`EncoderParts`.
        window: cubic window side (8). shift: cyclic shift (window // 2 on even blocks, else 0).
        window_chunk: windows attended at once (bounds the (chunk, heads, w^3, w^3) bias).
    """

    def __init__(
        self,
        attn: Attention,
        mlp: nn.Module,
        adapter: DepthwiseAdapter3D,
        norm1: nn.Module,
        norm2: nn.Module,
        rel_pos_d: nn.Parameter,
        window: int,
        shift: int,
        window_chunk: int = 64,
    ) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.adapter = adapter
        self.norm1 = norm1
        self.norm2 = norm2
        self.rel_pos_d = rel_pos_d
        self.window = window
        self.shift = shift
        self.window_chunk = window_chunk
        self._masks: dict[tuple, torch.Tensor] = {}  # shift masks by (grid, window, shift, device)

    def _shift_mask(self, grid: Sequence[int], window: int, shift: int, device: torch.device) -> torch.Tensor:
        key = (tuple(grid), window, shift, str(device))
        if key not in self._masks:
            self._masks = {key: shift_mask(grid, window, shift, device)}  # keep only the latest
        return self._masks[key]

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, g0, g1, g2, D) normalised tokens -> (B, g0, g1, g2, D) windowed attention output."""
        grid = x.shape[1:4]
        window = min(self.window, max(grid))
        shift = self.shift if all(g > window for g in grid) else 0
        pads = [(window - g % window) % window for g in grid]
        if any(pads):
            x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))  # zero tokens, as SAM pads
        padded = x.shape[1:4]
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift, -shift), dims=(1, 2, 3))
        windows = window_partition_3d(x, window)  # (B * nWin, w^3, D)
        mask = self._shift_mask(padded, window, shift, x.device) if shift else None  # (nWin, w^3, w^3)
        wins_per_volume = windows.shape[0] // x.shape[0]
        attn = self.attn
        heads, head_dim = attn.num_heads, attn.head_dim
        tables = (attn.rel_pos_h, attn.rel_pos_w, self.rel_pos_d)
        outputs = []
        for start in range(0, windows.shape[0], self.window_chunk):
            chunk = windows[start : start + self.window_chunk]
            count, tokens, dim = chunk.shape
            qkv = linear(attn.qkv, chunk).reshape(count, tokens, 3, heads, head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (count, heads, w^3, hd) each
            bias = rel_pos_bias_3d(q, tables, window)
            if mask is not None:
                index = torch.arange(start, start + count, device=x.device) % wins_per_volume
                bias = bias + mask[index][:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
            outputs.append(out.transpose(1, 2).reshape(count, tokens, dim))
        x = window_unpartition_3d(linear(attn.proj, torch.cat(outputs)), window, padded)
        if shift:
            x = torch.roll(x, shifts=(shift, shift, shift), dims=(1, 2, 3))
        if any(pads):
            x = x[:, : grid[0], : grid[1], : grid[2]].contiguous()
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, g0, g1, g2, D) -> same."""
        x = self.adapter(x)
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VolumetricEncoder(nn.Module):
    """The model's image encoder after the volumetric adapter attaches.

    Args:
        vit: the frozen 2D ViT (patch embedding, pos-embed, attention and MLP weights are reused).
        parts: the adapter's trainable pieces.
        scale: trilinear upsampling of the volume before the patch embedding (4: 128^3 -> 512^3).
        window: cubic attention window (8); blocks with an even index shift by ``window // 2``.
        window_chunk: windows attended at once.

    Input (B, 1 or 3, S0, S1, S2) volumes (one channel is repeated, as the reference does, by
    summing the patch weights over their input channels: same result, a third of the work).
    Output of :meth:`forward_with_features`: the last neck (B, N, g0, g1, g2) and, as features,
    [neck 0, neck 1, neck 2 (each (B, N, g0, g1, g2)), the first input channel resized to
    (B, 1, 2 g0, 2 g1, 2 g2)]: what the 3D decoder aggregates.
    """

    def __init__(
        self, vit: ImageEncoderViT, parts: EncoderParts, scale: float, window: int, window_chunk: int = 64
    ) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.pos_embed = vit.pos_embed
        self.parts = parts
        self.scale = scale
        self.blocks = nn.ModuleList(
            VolumetricBlock(
                cast(Attention, block.attn),
                cast(nn.Module, block.mlp),
                cast(DepthwiseAdapter3D, parts.adapters[i]),
                parts.norms1[i],
                parts.norms2[i],
                parts.rel_pos_d[i],
                window=window,
                shift=window // 2 if i % 2 == 0 else 0,
                window_chunk=window_chunk,
            )
            for i, block in enumerate(vit.blocks)
        )
        self.neck_indexes = neck_indexes(len(self.blocks))
        self.activation_checkpointing = False

    @property
    def patch_size(self) -> int:
        return int(self.patch_embed.proj.stride[0])

    @property
    def slice_depth(self) -> int:
        return int(self.parts.slice_embed.stride[2])

    def voxels_per_token(self) -> tuple[float, float, float]:
        """Input voxels covered by one token along each axis (4, 4, 4 for ViT-B at scale 4)."""
        return (self.patch_size / self.scale, self.patch_size / self.scale, self.slice_depth / self.scale)

    def embed(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, S0, S1, S2) -> tokens (B, g0, g1, g2, D) with positions added.

        The frozen patch embedding P (D, C, p, p) applied to every slice followed by the depth-wise
        slice embedding w (D, 1, 1, 1, k) is the single Conv3d with kernel P[..., None] * w and bias
        b_P * sum(w) + b_w, stride (p, p, k).
        """
        proj = self.patch_embed.proj
        weight = proj.weight.detach()  # (D, 3, p, p), frozen
        chans = volume.shape[1]
        if chans == 1:
            weight = weight.sum(dim=1, keepdim=True)  # a grey volume repeated to 3 channels
        elif chans != weight.shape[1]:
            raise ValueError(f"volumes must have 1 or {weight.shape[1]} channels, got {chans}")
        if self.scale != 1:
            volume = F.interpolate(volume, scale_factor=self.scale, mode="trilinear")
        side = volume.shape[2:]
        if side[0] % self.patch_size or side[1] % self.patch_size or side[2] % self.slice_depth:
            raise ValueError(
                f"a {tuple(side)} volume after x{self.scale} upsampling does not split into "
                f"{self.patch_size}x{self.patch_size}x{self.slice_depth} token cells"
            )
        slice_w = self.parts.slice_embed.weight  # (D, 1, 1, 1, k)
        kernel = weight[..., None] * slice_w.reshape(slice_w.shape[0], 1, 1, 1, -1)  # (D, C, p, p, k)
        bias = None
        if proj.bias is not None:
            bias = proj.bias.detach() * slice_w.flatten(1).sum(1)
        slice_b = self.parts.slice_embed.bias
        if slice_b is not None:
            bias = slice_b if bias is None else bias + slice_b
        stride = (self.patch_size, self.patch_size, self.slice_depth)
        x = F.conv3d(volume, kernel.to(volume.dtype), bias, stride=stride)  # (B, D, g0, g1, g2)
        x = x.permute(0, 2, 3, 4, 1)  # (B, g0, g1, g2, D)
        return x + self.position_embedding(tuple(x.shape[1:4]))

    def position_embedding(self, grid: tuple[int, ...]) -> torch.Tensor:
        """(1, g0, g1, g2, D): SAM's pos-embed pooled to (g0, g1) (the reference's 2x average pool
        when the sizes allow, else bicubic) plus the depth embedding (resampled if g2 differs)."""
        pos = self.pos_embed.permute(0, 3, 1, 2)  # (1, D, P, P)
        side = pos.shape[-1]
        if (grid[0], grid[1]) != (side, side):
            factor = side // grid[0]
            if factor * grid[0] == side and factor * grid[1] == side:
                pos = F.avg_pool2d(pos, kernel_size=factor)
            else:
                pos = F.interpolate(pos, size=grid[:2], mode="bicubic", align_corners=False)
        depth: torch.Tensor = self.parts.depth_embed  # (1, Gd, D)
        if depth.shape[1] != grid[2]:
            depth = F.interpolate(depth.transpose(1, 2), size=grid[2], mode="linear").transpose(1, 2)
        return pos.permute(0, 2, 3, 1)[:, :, :, None, :] + depth[:, None, None, :, :]

    def forward_with_features(
        self, x: torch.Tensor, feature_indexes: Sequence[int] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C, S0, S1, S2) -> (last neck, [neck 0, neck 1, neck 2, small image]); see the class.

        ``feature_indexes`` is accepted for the core's encoder protocol and ignored: the 3D decoder
        always takes the same four features.
        """
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing:
            tokens = torch.utils.checkpoint.checkpoint(self.embed, x, use_reentrant=False)
        else:
            tokens = self.embed(x)
        necks: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            if checkpointing:
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
            for k, index in enumerate(self.neck_indexes):
                if index == i:
                    necks.append(self.parts.necks[k](tokens.permute(0, 4, 1, 2, 3)))
        grid = necks[-1].shape[2:]
        small = F.interpolate(x[:, :1], size=tuple(2 * g for g in grid), mode="trilinear")
        return necks[-1], [*necks[:3], small]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]
