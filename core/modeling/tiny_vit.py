"""TinyViT image encoder as used by MobileSAM (1024 input) and LiteMedSAM (256 input).

Module names follow the MobileSAM/LiteMedSAM code so their checkpoints load with ``strict=True``.
In eval mode every conv+BN pair runs as one convolution with folded weights (same numbers, fewer
passes over memory); in training mode BN runs as usual.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from samadapt.modeling.common import compute_dtype, linear, sam_neck, use_fused_cpu_kernels


class Conv2dBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d; children named ``c`` and ``bn``."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False)
        )
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0.0)
        self.add_module("bn", bn)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Convolution weight and bias with the eval-mode BatchNorm folded in."""
        conv = cast(nn.Conv2d, self.c)
        bn = cast(nn.BatchNorm2d, self.bn)
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (out,)
        return conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale

    def forward(
        self, x: torch.Tensor, gelu: bool = False, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """conv + BN, then optionally ``+ residual`` and GELU, fused into one oneDNN call on CPU."""
        conv = cast(nn.Conv2d, self.c)
        bn = cast(nn.BatchNorm2d, self.bn)
        if self.training or bn.running_var is None:
            y = bn(conv(x))
        else:
            weight, bias = self.folded()
            if use_fused_convolutions(x):
                return _fused_conv(x, weight, bias, conv, gelu, residual)
            y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        if residual is not None:
            y = y + residual
        return F.gelu(y) if gelu else y


def use_fused_convolutions(x: torch.Tensor) -> bool:
    """oneDNN conv + bias (+ add) + GELU fusion: inference on CPU, when this PyTorch build has it."""
    return use_fused_cpu_kernels(x) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _fused_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    conv: nn.Conv2d,
    gelu: bool,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """Fewer passes over memory: the GELU or the residual add run inside the convolution.

    Autocast does not see oneDNN's ops, so the autocast dtype (bf16) is applied here by hand.
    """
    dtype = compute_dtype(x)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)  # type: ignore[arg-type]
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, *args, "gelu" if gelu else "none", [], "none"
        )
    # oneDNN fuses the residual add but not a GELU after it
    out = torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual.to(dtype), weight, bias, *args, "add", None, None, [], None
    )
    return F.gelu(out) if gelu else out


class PatchEmbed(nn.Module):
    """Two conv+BN layers: stride-2 3x3 (MobileSAM, /4) or 1x1 (LiteMedSAM, /1)."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, kernel_size, stride, pad),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, kernel_size, stride, pad),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, _, second = self.seq
        return second(first(x, gelu=True))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> 3x3 depthwise -> 1x1 project, residual, GELU. (B,C,H,W)."""

    def __init__(self, chans: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(chans * expand_ratio)
        self.conv1 = Conv2dBN(chans, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, chans, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # act1..act3 are GELUs applied inside the convolutions (fused on CPU at inference)
        y = self.conv2(self.conv1(x, gelu=True), gelu=True)
        return self.conv3(y, gelu=True, residual=x)


class PatchMerging(nn.Module):
    """(B, C, H, W) or (B, H*W, C) -> (B, H'*W', C_out); stride 1 for the last stage's widths."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, out_dim: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim)
        stride = 1 if out_dim in (320, 448, 576) else 2
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            height, width = self.input_resolution
            x = x.view(x.shape[0], height, width, -1).permute(0, 3, 1, 2)  # (B, C, H, W)
        x = self.conv1(x, gelu=True)  # self.act is the GELU, applied inside the convolution
        x = self.conv2(x, gelu=True)
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)  # (B, H'*W', C_out)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks then patch merging."""

    def __init__(
        self, dim: int, input_resolution: tuple[int, int], depth: int, out_dim: int, expand_ratio: float
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(input_resolution, dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class TinyAttention(nn.Module):
    """Window attention with a learned per-offset bias table (LeViT style). (B, N, C) -> (B, N, C).

    Blocks call ``attn(x)`` on the whole (B, H*W, C) token grid; the split into ``window_size``
    windows happens in here, so an adapter can wrap the attention without knowing about windows.
    The attention normalises its own input (``norm``), as in TinyViT.

    The fused ``qkv`` projection is laid out per head: output row ``head * (2 kd + vd) + offset``
    with ``offset`` in ``[0, kd)`` for q, ``[kd, 2 kd)`` for k and ``[2 kd, 2 kd + vd)`` for v; see
    :meth:`qkv_rows`.
    """

    attention_bias_idxs: torch.Tensor

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        resolution: tuple[int, int],
        input_resolution: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.window_size = resolution[0]
        self.input_resolution = input_resolution or resolution
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = key_dim  # attn_ratio = 1
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.value_dim))
        self.proj = nn.Linear(num_heads * self.value_dim, dim)
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(len(points), len(points)), False
        )

    def qkv_rows(self, part: str) -> torch.Tensor:
        """Output rows of ``qkv`` that compute ``part`` (``q``, ``k`` or ``v``), interleaved per head."""
        per_head = 2 * self.key_dim + self.value_dim
        start, width = {"q": (0, self.key_dim), "k": (self.key_dim, self.key_dim)}.get(
            part, (2 * self.key_dim, self.value_dim)
        )
        offsets = torch.arange(start, start + width)
        return (torch.arange(self.num_heads)[:, None] * per_head + offsets).flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H*W, C) tokens of the ``input_resolution`` grid -> (B, H*W, C)."""
        height, width = self.input_resolution
        win = self.window_size
        if height == win and width == win:
            return self.attend(x)
        batch, tokens, chans = x.shape
        grid = x.view(batch, height, width, chans)
        pad_b, pad_r = (win - height % win) % win, (win - width % win) % win
        if pad_b or pad_r:
            grid = F.pad(grid, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = height + pad_b, width + pad_r
        nh, nw = ph // win, pw // win
        # (B, nh, win, nw, win, C) -> (B*nh*nw, win*win, C)
        windows = grid.view(batch, nh, win, nw, win, chans).transpose(2, 3).reshape(-1, win * win, chans)
        windows = self.attend(windows)
        grid = windows.view(batch, nh, nw, win, win, chans).transpose(2, 3).reshape(batch, ph, pw, chans)
        if pad_b or pad_r:
            grid = grid[:, :height, :width]
        return grid.reshape(batch, tokens, chans)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Attention inside windows: (B * nWin, win * win, C) -> (B * nWin, win * win, C)."""
        batch, tokens, _ = x.shape
        qkv = linear(self.qkv, self.norm(x)).view(batch, tokens, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # (B, heads, N, d)
        # (1, heads, N, N): a 4D mask lets SDPA take its fused CPU kernel (a 3D one falls back to math)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return linear(self.proj, out.transpose(1, 2).reshape(batch, tokens, -1))


class TinyMlp(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.fc2, linear(self.fc1, self.norm(x), "gelu"))  # self.act: the fused GELU


class TinyViTBlock(nn.Module):
    """Window attention -> depthwise 3x3 conv -> MLP over a (B, H*W, C) token grid."""

    def __init__(
        self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.dim = dim
        # typed as modules: adapters may replace either with a module of the same call signature
        self.attn: nn.Module = TinyAttention(
            dim, dim // num_heads, num_heads, (window_size, window_size), input_resolution=input_resolution
        )
        self.mlp: nn.Module = TinyMlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H*W, C) -> (B, H*W, C).

        Extension points: ``attn`` and ``mlp`` are each called once with the (B, H*W, C) tokens (both
        normalise their own input), so an adapter may wrap either with a module of the same signature.
        """
        height, width = self.input_resolution
        batch, tokens, chans = x.shape
        x = x + self.attn(x)
        x = self.local_conv(x.transpose(1, 2).reshape(batch, chans, height, width))
        x = x.view(batch, chans, tokens).transpose(1, 2)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks, then patch merging except in the last stage."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        out_dim: int | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, input_resolution, num_heads, window_size, mlp_ratio) for _ in range(depth)
        )
        self.downsample = PatchMerging(input_resolution, dim, out_dim) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT-5M backbone + SAM neck: (B, 3, S, S) -> (B, 256, 64, 64).

    Args:
        img_size: input side (1024 for MobileSAM, 256 for LiteMedSAM).
        patch_kernel, patch_stride: patch-embed convs (3/2 for MobileSAM; 1/1 for LiteMedSAM).
        embed_dims, depths, num_heads, window_sizes: per-stage numbers.
        classifier_classes: MobileSAM checkpoints carry an unused ImageNet head (``norm_head``,
            ``head``); set 1000 to load them strictly, 0 for none.
    """

    def __init__(
        self,
        *,
        img_size: int = 256,
        in_chans: int = 3,
        patch_kernel: int = 1,
        patch_stride: int = 1,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        out_chans: int = 256,
        classifier_classes: int = 0,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_kernel, patch_stride)
        res = img_size // (patch_stride * patch_stride)
        self.layers = nn.ModuleList()
        num_stages = len(depths)
        for i in range(num_stages):
            scale = 2 ** (i - 1 if i == 3 else i)
            resolution = (res // scale, res // scale)
            out_dim = embed_dims[min(i + 1, num_stages - 1)]
            layer: nn.Module
            if i == 0:
                layer = ConvLayer(embed_dims[0], resolution, depths[0], out_dim, mbconv_expand_ratio)
            else:
                layer = BasicLayer(
                    embed_dims[i],
                    resolution,
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    out_dim if i < num_stages - 1 else None,
                )
            self.layers.append(layer)
        self.out_resolution = res // 2 ** (num_stages - 2)
        if classifier_classes:
            self.norm_head = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], classifier_classes)
        self.neck = sam_neck(embed_dims[-1], out_chans)
        self.activation_checkpointing = False  # recompute stages in backward to save memory (training)

    def forward_with_features(
        self, x: torch.Tensor, feature_indexes: Sequence[int] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the encoder and keep the outputs of the requested stages (each (B, tokens, C)).

        Args:
            x: (B, 3, S, S) preprocessed image.
            feature_indexes: stage indexes (0..3) whose outputs to return.
        """
        x = self.patch_embed(x)
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        kept: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if i in feature_indexes:
                kept[i] = x
        side = self.out_resolution
        x = x.view(x.shape[0], side, side, -1).permute(0, 3, 1, 2)  # (B, C, 64, 64)
        return self.neck(x), [kept[i] for i in feature_indexes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]
