"""SAM's two-way transformer: tokens attend to the image and the image attends back to the tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.modeling.common import MLPBlock, linear, use_fused_cpu_kernels
from samadapt.modeling.factored import FactoredRows


class Attention(nn.Module):
    """Multi-head attention with optional channel downsampling of q/k/v (SDPA inside)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C / heads)."""
        batch, tokens, chans = x.shape
        return x.reshape(batch, tokens, self.num_heads, chans // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C)."""
        if self._factorizable(q):
            heads_q, heads_k = self.num_heads * q.shape[1], self.num_heads * k.shape[1]
            if k.shape[1] > q.shape[1] and heads_q < self.internal_dim:
                return self._few_queries(q, k, v)
            if q.shape[1] > k.shape[1] and heads_k < self.internal_dim:
                return self._few_keys(q, k, v)
        # ``linear`` runs a plain nn.Linear through oneDNN at CPU inference; a wrapped one (LoRA) as is
        out = F.scaled_dot_product_attention(
            self._split(linear(self.q_proj, q)),
            self._split(linear(self.k_proj, k)),
            self._split(linear(self.v_proj, v)),
        )
        batch, heads, tokens, head_dim = out.shape
        return linear(self.out_proj, out.transpose(1, 2).reshape(batch, tokens, heads * head_dim))

    # The decoder's cross attentions pair the 4096 image tokens with about 7 prompt tokens. At CPU
    # inference the projections of the many tokens are folded into the few: the same attention (equal
    # up to float rounding) with a third of the multiply-adds. Never with autograd, a tracer, an
    # adapter's wrapped projection or the fused-kernel switch off (the plain path above runs then).
    def _factorizable(self, q: torch.Tensor) -> bool:
        projections = (self.q_proj, self.k_proj, self.v_proj, self.out_proj)
        return use_fused_cpu_kernels(q) and all(
            type(p) is nn.Linear and p.bias is not None for p in projections
        )

    def _head_weights(self, layer: nn.Linear) -> torch.Tensor:
        """(internal, C) projection weight -> (heads, head_dim, C)."""
        return layer.weight.view(self.num_heads, -1, layer.weight.shape[-1])

    def _few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Few queries, many keys (tokens -> image): the keys and values are never projected.

        Per head h, ``q_h k_proj_h(x)^T = (q_h W_kh) x^T + q_h b_kh``; the last term is the same for every
        key, so softmax drops it. ``softmax @ v_proj_h(x) = (softmax @ x) W_vh^T + b_vh`` since each
        softmax row sums to 1. q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C).
        """
        batch, queries, _ = q.shape
        heads = self.num_heads
        head_dim = self.internal_dim // heads
        q_heads = linear(self.q_proj, q).view(batch, queries, heads, head_dim).transpose(1, 2)
        folded = (q_heads * head_dim**-0.5) @ self._head_weights(self.k_proj)  # (B, H, Nq, C)
        scores = folded.reshape(batch, heads * queries, -1) @ k.transpose(1, 2)  # (B, H*Nq, Nk)
        mixed = (scores.softmax(dim=-1) @ v).view(batch, heads, queries, -1)  # (B, H, Nq, C)
        values = mixed @ self._head_weights(self.v_proj).transpose(1, 2)  # (B, H, Nq, head_dim)
        assert self.v_proj.bias is not None
        values = values + self.v_proj.bias.view(heads, 1, head_dim)
        return linear(self.out_proj, values.transpose(1, 2).reshape(batch, queries, self.internal_dim))

    def _few_keys(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Many queries, few keys (image -> tokens): the queries and outputs are never projected.

        Per head h, ``q_proj_h(x) k_h^T = x (W_qh^T k_h^T) + b_qh k_h^T``, and the output projection of
        ``softmax_h @ v_h`` is ``softmax_h @ (v_h W_oh^T)``, summed over heads, plus ``b_o``.
        q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C).
        """
        batch, queries, chans = q.shape
        keys = k.shape[1]
        heads = self.num_heads
        head_dim = self.internal_dim // heads
        k_heads = linear(self.k_proj, k).view(batch, keys, heads, head_dim).transpose(1, 2)
        v_heads = linear(self.v_proj, v).view(batch, keys, heads, head_dim).transpose(1, 2)
        k_heads = k_heads * head_dim**-0.5  # (B, H, Nk, head_dim)
        assert self.q_proj.bias is not None
        folded = (k_heads @ self._head_weights(self.q_proj)).reshape(batch, heads * keys, chans)
        offset = (k_heads @ self.q_proj.bias.view(heads, head_dim, 1)).reshape(batch, heads * keys, 1)
        # scores transposed, (B, H*Nk, Nq): softmax over a short middle axis is ~20x faster on the CPU
        # than over a short last one
        scores = torch.baddbmm(offset, folded, q.transpose(1, 2))
        weights = scores.view(batch, heads, keys, queries).softmax(dim=2).view(batch, heads * keys, queries)
        return self._mix_heads(weights, v_heads)

    def _mix_heads(self, weights: torch.Tensor, v_heads: torch.Tensor) -> torch.Tensor:
        """Output projection of many queries over few values, per head, then summed.

        weights (B, H*Nk, Nq): each head's softmax over its Nk keys (axis 1); v_heads (B, H, Nk, hd).
        Returns (B, Nq, C).
        """
        batch, heads, keys, head_dim = v_heads.shape
        chans = self.out_proj.weight.shape[0]
        out_weight = self.out_proj.weight.view(chans, heads, head_dim).permute(1, 2, 0)  # (H, hd, C)
        assert self.out_proj.bias is not None
        # each head's softmax rows sum to 1, so bias / H on every row of every head adds up to the bias
        # (and the big product needs no bias broadcast into its output first)
        outputs = v_heads @ out_weight + self.out_proj.bias / heads  # (B, H, Nk, C)
        return weights.transpose(1, 2) @ outputs.view(batch, heads * keys, chans)  # (B, Nq, C)

    def project_heads(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens through ``layer`` (q/k/v_proj) -> (B, heads, N, head_dim)."""
        batch, tokens, _ = x.shape
        return linear(layer, x).view(batch, tokens, self.num_heads, -1).transpose(1, 2)

    def attend_factored(self, q: torch.Tensor, image: FactoredRows) -> torch.Tensor:
        """Tokens q (B, T, C) attend to factored image tokens (keys with the encoding) -> (B, T, C)."""
        batch, tokens, _ = q.shape
        head_dim = self.internal_dim // self.num_heads
        q_heads = self.project_heads(self.q_proj, q) * head_dim**-0.5  # (B, H, T, d)
        scores = image.dot_heads(self.k_proj, q_heads.transpose(2, 3))  # (B, H, T, N)
        out = image.weighted_heads(self.v_proj, scores.softmax(dim=-1))  # (B, H, T, d)
        return linear(self.out_proj, out.transpose(1, 2).reshape(batch, tokens, self.internal_dim))

    def update_factored(self, image: FactoredRows, k: torch.Tensor, v: torch.Tensor) -> FactoredRows:
        """Factored image tokens attend to the tokens k, v (B, T, C): image + this attention's output."""
        batch, tokens, _ = k.shape
        head_dim = self.internal_dim // self.num_heads
        k_heads = self.project_heads(self.k_proj, k) * head_dim**-0.5  # (B, H, T, d)
        scores = image.dot_heads(self.q_proj, k_heads.transpose(2, 3))  # (B, H, T, N)
        # softmax over each head's few tokens: a middle axis, contiguous rows of N
        weights = scores.softmax(dim=2).view(batch, self.num_heads * tokens, -1)
        return image.add(weights, self.project_heads(self.v_proj, v), self.out_proj)


class TwoWayAttentionBlock(nn.Module):
    """Self-attention on tokens, tokens->image, MLP on tokens, image->tokens."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module],
        attention_downsample_rate: int,
        skip_first_layer_pe: bool,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, Nt, C) tokens; keys (B, HW, C) image; *_pe their positional encodings."""
        queries = self._attend_tokens(queries, query_pe)
        k = keys + key_pe  # (B, HW, C): the keys do not change until norm4, so one sum serves both
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        attended = self.cross_attn_image_to_token(k, queries + query_pe, queries)
        return queries, self.norm4(keys + attended)

    def forward_factored(
        self, queries: torch.Tensor, image: FactoredRows, query_pe: torch.Tensor
    ) -> tuple[torch.Tensor, FactoredRows]:
        """:meth:`forward` on factored image tokens (see :mod:`samadapt.modeling.factored`)."""
        queries = self._attend_tokens(queries, query_pe)
        attended = self.cross_attn_token_to_image.attend_factored(queries + query_pe, image)
        queries = self.norm2(queries + attended)
        queries = self.norm3(queries + self.mlp(queries))
        image = self.cross_attn_image_to_token.update_factored(image, queries + query_pe, queries)
        return queries, image.layer_norm(self.norm4)

    def _attend_tokens(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        """Self-attention on the tokens, then norm1."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        return self.norm1(queries)

    def can_factor(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_factored` applies: plain attentions and norms, CPU inference."""
        attentions = (self.cross_attn_token_to_image, self.cross_attn_image_to_token)
        return all(type(a) is Attention and a._factorizable(x) for a in attentions) and _affine(self.norm4)


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks and a final token->image attention.

    Args:
        depth: number of blocks (2). embedding_dim: channels (256). num_heads: heads (8).
        mlp_dim: token MLP width (2048).
    """

    def __init__(
        self,
        *,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate, i == 0
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding, image_pe (B, C, H, W); point_embedding (B, Nt, C).

        Returns:
            (tokens (B, Nt, C), image (B, H*W, C)).
        """
        keys = image_embedding.flatten(2).permute(0, 2, 1)  # (B, HW, C)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys

    def forward_factored(
        self, image: FactoredRows, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, FactoredRows]:
        """:meth:`forward` on factored image tokens: an image prompted many times pays for its side once.

        image: the image tokens (see :mod:`samadapt.modeling.factored`); point_embedding (B, Nt, C).
        Returns (tokens (B, Nt, C), the image tokens after the last block, still factored).
        """
        queries = point_embedding
        for layer in self.layers:
            assert isinstance(layer, TwoWayAttentionBlock)
            queries, image = layer.forward_factored(queries, image, point_embedding)
        attended = self.final_attn_token_to_image.attend_factored(queries + point_embedding, image)
        return self.norm_final_attn(queries + attended), image

    def can_factor(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_factored` applies to ``x``: CPU inference, every block plain."""
        final = self.final_attn_token_to_image
        return (
            all(type(layer) is TwoWayAttentionBlock and layer.can_factor(x) for layer in self.layers)
            and type(final) is Attention
            and final._factorizable(x)
        )


def _affine(norm: nn.Module) -> bool:
    """A plain LayerNorm over the last axis with a weight and a bias."""
    return type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None
