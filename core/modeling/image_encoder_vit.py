"""SAM's ViT image encoder (ViT-B/L/H), attention through ``scaled_dot_product_attention``.

Module names follow Meta's ``segment_anything`` so official SAM and MedSAM checkpoints load with
``strict=True``. Relative positions enter attention as an additive bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from samadapt.modeling.common import MLPBlock, linear, sam_neck


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, C, H, W) -> (B, H/p, W/p, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample a (L, C) relative-position table to ``length`` rows."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.T[None], size=length, mode="linear")  # (1, C, length)
    return resized[0].T


def relative_positions(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather the relative-position embedding for every (query, key) coordinate pair.

    Args:
        q_size: number of query positions along one axis.
        k_size: number of key positions along the same axis.
        rel_pos: (L, C) table, resampled to 2 * max(q_size, k_size) - 1 rows if needed.

    Returns:
        (q_size, k_size, C)
    """
    table = resize_rel_pos(rel_pos, 2 * max(q_size, k_size) - 1)
    q_coords = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[offsets.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Additive attention bias from MViTv2-style decomposed relative positions.

    Args:
        q: (B, heads, H*W, C) unscaled queries.
        rel_pos_h: (2H-1, C) table along height; rel_pos_w: (2W-1, C) along width.
        size: (H, W) of the query/key grid (self-attention).

    Returns:
        (B, heads, H*W, H*W) bias: bias[(h, w), (h', w')] = q . Rh[h, h'] + q . Rw[w, w'].
    """
    height, width = size
    batch, heads, _, dim = q.shape
    r_h = relative_positions(height, height, rel_pos_h)  # (H, H, C)
    r_w = relative_positions(width, width, rel_pos_w)  # (W, W, C)
    q_grid = q.reshape(batch, heads, height, width, dim)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, r_h)  # (B, heads, H, W, H)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, r_w)  # (B, heads, H, W, W)
    # contiguous operands give a contiguous sum, so the reshape below is a view, not a 4096^2 copy
    bias = bias_h.contiguous()[..., :, None] + bias_w.contiguous()[..., None, :]  # (B, heads, H, W, H, W)
    return bias.reshape(batch, heads, height * width, height * width)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, D) grid, global or inside windows.

    Every block calls ``attn(x)`` with the same signature; windowing (``window_size > 0``) happens in
    here, so an adapter can wrap or replace the whole attention without knowing about windows.

    The fused ``qkv`` projection is laid out ``[q | k | v]``: output row ``part * D + head * hd + j``
    (``part`` 0, 1, 2 for q, k, v) feeds channel ``j`` of ``head``; see :meth:`qkv_rows`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        input_size: tuple[int, int] | None = None,
        window_size: int = 0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required with relative positions")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))

    def qkv_rows(self, part: str) -> torch.Tensor:
        """Output rows of ``qkv`` that compute ``part`` (``q``, ``k`` or ``v``): a contiguous third."""
        dim = self.num_heads * self.head_dim
        start = "qkv".index(part) * dim
        return torch.arange(start, start + dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, D) -> (B, H, W, D); windowed when ``window_size > 0``."""
        if self.window_size > 0:
            return self._forward_windowed(x, self.window_size)
        return linear(self.proj, self.attend(linear(self.qkv, x)))

    def _forward_windowed(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """Attention inside ``window`` x ``window`` windows: (B, H, W, D) -> (B, H, W, D).

        Same result as zero-padding ``x`` to whole windows and attending per window, but the qkv and
        output projections run on the real tokens only: a padded (zero) token's qkv is ``qkv(0)``.
        """
        size = (x.shape[1], x.shape[2])
        qkv = linear(self.qkv, x)  # (B, H, W, 3D)
        pad_value = linear(self.qkv, x.new_zeros(1, x.shape[-1]))[0]  # (3D,) what a zero token maps to
        windows, padded = window_partition(qkv, window, pad_value)
        attended = self.attend(windows)  # (B * nWin, window, window, D)
        return linear(self.proj, window_unpartition(attended, window, padded, size))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Projected (B, H, W, 3D) queries/keys/values -> (B, H, W, D) attention output, before proj."""
        batch, height, width, three_dim = qkv.shape
        dim = three_dim // 3
        # (B, H*W, 3, heads, hd) -> (3, B, heads, H*W, hd)
        qkv = qkv.reshape(batch, height * width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (height, width)).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, H*W, hd)
        return out.transpose(1, 2).reshape(batch, height, width, dim)


def window_partition(
    x: torch.Tensor, window: int, pad_value: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWin, window, window, C), padding H and W to multiples of ``window``.

    The padding is zeros, or ``pad_value`` (C,) when given.
    """
    batch, height, width, channels = x.shape
    pad_h = (window - height % window) % window
    pad_w = (window - width % window) % window
    if pad_h or pad_w:
        if pad_value is None:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        else:
            grown = pad_value.expand(batch, height + pad_h, width + pad_w, channels).clone()
            grown[:, :height, :width] = x
            x = grown
    hp, wp = height + pad_h, width + pad_w
    x = x.view(batch, hp // window, window, wp // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """(B * nWin, window, window, C) -> (B, H, W, C), dropping the padding."""
    hp, wp = padded
    batch = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(batch, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, -1)
    if hp > size[0] or wp > size[1]:
        x = x[:, : size[0], : size[1], :].contiguous()
    return x


class Block(nn.Module):
    """Pre-norm transformer block with windowed (``window_size > 0``) or global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        input_size: tuple[int, int],
        use_rel_pos: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = (window_size, window_size) if window_size > 0 else input_size
        self.dim = dim
        # typed as modules: adapters may replace either with a module of the same call signature
        self.attn: nn.Module = Attention(
            dim, num_heads, use_rel_pos=use_rel_pos, input_size=attn_size, window_size=window_size
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp: nn.Module = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, D) -> (B, H, W, D).

        Extension points: ``attn`` and ``mlp`` are each called once with one tensor, so an adapter
        may replace either with a module of the same signature (a bottleneck after attention, a
        parallel branch beside the MLP).
        """
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """ViT backbone + neck: (B, 3, S, S) -> (B, out_chans, S/16, S/16).

    Args:
        img_size: square input side (1024 for SAM/MedSAM).
        patch_size: patch side (16).
        embed_dim, depth, num_heads, mlp_ratio: ViT numbers (ViT-B: 768, 12, 12, 4).
        out_chans: embedding channels after the neck (256).
        window_size: window side for non-global blocks (14).
        global_attn_indexes: blocks that attend globally (ViT-B: 2, 5, 8, 11).
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        use_rel_pos: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
                use_rel_pos=use_rel_pos,
            )
            for i in range(depth)
        )
        self.neck = sam_neck(embed_dim, out_chans)
        self.activation_checkpointing = False  # recompute blocks in backward to save memory (training)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The absolute position embedding for a (h, w) token grid: (1, h, w, D).

        Bicubically interpolated when the input size differs from the checkpoint's (e.g. ViT-B at
        512 as in SAMed: 64x64 -> 32x32). Relative positions are resampled in the attention.
        """
        if tuple(self.pos_embed.shape[1:3]) == grid:
            return self.pos_embed
        resized = F.interpolate(
            self.pos_embed.permute(0, 3, 1, 2), size=grid, mode="bicubic", align_corners=False
        )  # (1, D, h, w)
        return resized.permute(0, 2, 3, 1)

    def forward_with_features(
        self, x: torch.Tensor, feature_indexes: Sequence[int] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the encoder and keep the outputs of the requested blocks.

        Args:
            x: (B, 3, S, S) preprocessed image; S need not be the checkpoint's size (multiple of 16).
            feature_indexes: block indexes whose outputs to return, each (B, S/16, S/16, D).

        Returns:
            (embedding (B, out_chans, S/16, S/16), [features in the order requested]).
        """
        x = self.patch_embed(x)  # (B, S/16, S/16, D)
        x = x + self.position_embedding((x.shape[1], x.shape[2]))
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        kept: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in feature_indexes:
                kept[i] = x
        embedding = self.neck(x.permute(0, 3, 1, 2))
        return embedding, [kept[i] for i in feature_indexes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]
