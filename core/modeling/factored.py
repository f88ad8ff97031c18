"""The decoder's image side as a cached matrix plus a low-rank, prompt-dependent part.

Without a mask prompt, every prompt on one image starts the two-way transformer from the same image
tokens ``E`` (N = 64 x 64 rows, C = 256 channels). What a prompt adds to them is small: each
image->token attention adds ``A @ O``, a softmax over the ~7 prompt tokens per head (rank
heads x tokens = 56) times their projected values, and each LayerNorm only rescales rows, recentres
them and multiplies channels by fixed weights. So after any number of blocks the image tokens are

    X = scale * E' + coef^T @ basis + const        (N, C)

with ``E'`` a matrix that depends on the image alone (``E`` recentred and multiplied by the norms'
weights), ``scale`` one number per row, ``coef`` (R, N) and ``basis`` (R, C) prompt-dependent with
R ~ 114 after SAM's two blocks, and ``const`` a row of weights. Every product of ``E'`` with a weight
matrix is computed once per image (:class:`ImageFactors`); per prompt only products with ``coef``
and ``basis`` remain. LayerNorm statistics come out of the same pieces (:meth:`FactoredRows.layer_norm`).

Exact algebra: the same numbers as materialising X, to float rounding. Inference only (no autograd).
Layouts keep N last: per-prompt tensors are (B, R, N), so a softmax over N or over a short token axis
runs on contiguous rows.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

import torch
from torch import nn


class ImageFactors:
    """Products of one image's tokens with the decoder's weights, computed once and kept.

    Args:
        keys: (N, C) the image tokens the transformer starts from (embedding + "no mask" prompt).
        pe: (N, C) the positional encoding added to the image tokens before each attention.
    """

    def __init__(self, keys: torch.Tensor, pe: torch.Tensor) -> None:
        self.pe = pe
        self._memo: dict[Hashable, torch.Tensor] = {("E", ()): keys}

    def get(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor stored under ``key``; ``compute()`` fills it the first time."""
        value = self._memo.get(key)
        if value is None:
            value = compute()
            self._memo[key] = value
        return value

    def matrix(self, stage: tuple) -> torch.Tensor:
        """(N, C) the image matrix E' of ``stage`` (a chain of LayerNorms applied to the tokens)."""
        if ("E", stage) in self._memo:
            return self._memo[("E", stage)]
        *before, norm = stage
        centred = self.centred(tuple(before))
        return self.get(("E", stage), lambda: centred * norm.weight)

    def centred(self, stage: tuple) -> torch.Tensor:
        """(N, C) E' of ``stage`` minus each row's mean."""
        matrix = self.matrix(stage)
        return self.get(("centred", stage), lambda: matrix - matrix.mean(1, keepdim=True))

    def heads(
        self, stage: tuple, weight: torch.Tensor, heads: int, centred: bool = False, name: Hashable = None
    ) -> torch.Tensor:
        """(heads, d, N): (E' or its centred rows) @ weight^T, per head; weight (heads * d, C).

        ``name`` identifies ``weight`` in the cache (default: the tensor itself, for a parameter).
        """
        key = ("heads", stage, weight if name is None else name, centred)
        source = self.centred(stage) if centred else self.matrix(stage)
        return self.get(key, lambda: (weight @ source.T).view(heads, -1, source.shape[0]).contiguous())

    def projection(self, stage: tuple, layer: nn.Linear, heads: int) -> torch.Tensor:
        """A projection of the tokens plus the encoding, per head, for :meth:`FactoredRows.dot_heads`.

        Before any LayerNorm (``stage == ()``, no per-row scale): (heads, d, N), ((E + pe) W^T + b).
        After: (heads, d, 2N), E' W^T beside (pe W^T + b), so one product serves both.
        """

        def compute() -> torch.Tensor:
            matrix, count = self.matrix(stage), self.pe.shape[0]
            if not stage:
                both = torch.addmm(layer.bias.unsqueeze(1), layer.weight, (matrix + self.pe).T)
                return both.view(heads, -1, count).contiguous()
            image = (layer.weight @ matrix.T).view(heads, -1, count)
            fixed = torch.addmm(layer.bias.unsqueeze(1), layer.weight, self.pe.T).view(heads, -1, count)
            return torch.cat([image, fixed], dim=-1)

        return self.get(("projection", stage, layer), compute)


@dataclass(frozen=True)
class Factor:
    """A block of basis rows: per head, ``values[:, h] @ weight[h*d:(h+1)*d]``.

    values: (B, heads, T, d) prompt-dependent; weight: (heads * d, C) derived from the weights alone
    (an out projection, recentred and scaled by every LayerNorm since); key: names ``weight`` in the
    image's cache (the layers it came from), the same for every prompt.
    """

    values: torch.Tensor
    weight: torch.Tensor
    key: tuple

    def rows(self) -> torch.Tensor:
        """(B, heads * T, C) the basis rows."""
        batch, heads, tokens, dim = self.values.shape
        weight = self.weight.view(heads, 1, dim, -1)
        return (self.values.transpose(0, 1) @ weight).transpose(0, 1).reshape(batch, heads * tokens, -1)


@dataclass(frozen=True)
class FactoredRows:
    """Image tokens X = scale * E'(stage) + coef^T @ basis + const, for B prompts.

    Attributes:
        factors: the image's cached products. stage: which E' (a tuple of LayerNorms).
        scale: (B, 1, N) or None for 1. coef: (B, R, N). basis: (B, R, C).
        blocks: the :class:`Factor` of each run of basis rows, in order (their rows add up to R).
        const: (C,) a row shared by every token.
    """

    factors: ImageFactors
    stage: tuple
    scale: torch.Tensor | None
    coef: torch.Tensor
    basis: torch.Tensor
    blocks: tuple[Factor, ...]
    const: torch.Tensor

    @classmethod
    def start(cls, factors: ImageFactors, batch: int) -> FactoredRows:
        """The image tokens themselves, for ``batch`` prompts."""
        keys = factors.matrix(())
        count, chans = keys.shape
        return cls(
            factors=factors,
            stage=(),
            scale=None,
            coef=keys.new_zeros(batch, 0, count),
            basis=keys.new_zeros(batch, 0, chans),
            blocks=(),
            const=keys.new_zeros(chans),
        )

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.scale is None else x * self.scale

    def dot_heads(self, layer: nn.Linear, queries: torch.Tensor) -> torch.Tensor:
        """Scores of every token against per-head vectors: ((X + pe) W^T + b) . queries, per head.

        queries: (B, heads, d, T). Returns (B, heads, T, N).
        """
        batch, heads, dim, tokens = queries.shape
        count = self.coef.shape[-1]
        by_head = queries.permute(1, 3, 0, 2).reshape(heads, tokens * batch, dim)  # rows (t, b)
        image = by_head @ self.factors.projection(self.stage, layer, heads)  # (H, T*B, N or 2N)
        image = image.view(heads, tokens, batch, -1)
        if self.scale is not None:  # E' part scaled per row, plus the encoding's part
            scale = self.scale.view(1, 1, batch, count)
            image = torch.addcmul(image[..., count:], image[..., :count], scale)
        scores = image.permute(2, 0, 1, 3).reshape(batch, -1, count)
        # basis and const through the projection, then against the queries: (B, R + 1, H*T)
        rows = torch.cat([self.basis, self.const.expand(batch, 1, -1)], dim=1) @ layer.weight.T
        small = (rows.view(batch, -1, heads, dim).transpose(1, 2) @ queries).transpose(1, 2)
        small = small.reshape(batch, -1, heads * tokens)
        scores = torch.baddbmm(scores, small[:, :-1].transpose(1, 2), self.coef)
        return scores.add_(small[:, -1:].transpose(1, 2)).view(batch, heads, tokens, count)

    def weighted_heads(self, layer: nn.Linear, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sums of the projected tokens, per head: sum_n weights[n] (X W^T + b)[n].

        weights: (B, heads, T, N). Returns (B, heads, T, d).
        """
        batch, heads, tokens, count = weights.shape
        flat = weights.reshape(batch, heads * tokens, count)
        scaled = self._scaled(flat)
        by_head = scaled.view(batch, heads, tokens, count).transpose(0, 1).reshape(heads, -1, count)
        image = by_head @ self.factors.heads(self.stage, layer.weight, heads).transpose(1, 2)
        out = image.view(heads, batch, tokens, -1).transpose(0, 1)  # (B, H, T, d)
        rows = self.basis @ layer.weight.T  # (B, R, H*d)
        mixed = (flat @ self.coef.transpose(1, 2)) @ rows  # (B, H*T, H*d)
        mixed = mixed.view(batch, heads, tokens, heads, -1).diagonal(dim1=1, dim2=3)  # (B, T, d, H)
        fixed = self.const @ layer.weight.T + layer.bias  # (H*d,)
        totals = flat.sum(-1, keepdim=True)  # (B, H*T, 1): 1 for a softmax
        fixed = totals.view(batch, heads, tokens, 1) * fixed.view(heads, 1, -1)
        return out + mixed.permute(0, 3, 1, 2) + fixed

    def add(self, coef: torch.Tensor, values: torch.Tensor, out: nn.Linear) -> FactoredRows:
        """X + coef^T @ (values through ``out`` per head) + out's bias.

        coef: (B, heads * T, N) attention weights; values: (B, heads, T, d) with d * heads = out's input.
        """
        block = Factor(values, out.weight.T, (out,))
        return replace(
            self,
            coef=torch.cat([self.coef, coef], dim=1),
            basis=torch.cat([self.basis, block.rows()], dim=1),
            blocks=(*self.blocks, block),
            const=self.const + out.bias,
        )

    def layer_norm(self, norm: nn.LayerNorm) -> FactoredRows:
        """LayerNorm over channels, from row statistics of the pieces (never materialising X)."""
        factors, stage = self.factors, self.stage
        batch, rank, count = self.coef.shape
        chans = self.basis.shape[-1]
        basis = self.basis - self.basis.mean(-1, keepdim=True)
        const = self.const - self.const.mean()
        centred = factors.centred(stage)  # (N, C); its rows sum to 0, so E' . v = centred . v
        # the centred row's sum of squares, (B, 1, N), term by term:
        # scale^2 |E'|^2 + 2 scale (E'.const + coef.cross) + coef.(gram coef + 2 basis.const) + |const|^2
        energy = factors.get(("energy", stage), lambda: centred.pow(2).sum(1))
        const_key = ("const", stage, tuple(b.key for b in self.blocks))
        image_const = factors.get(const_key, lambda: centred @ const)  # (N,): const is weights only
        total = self._scaled(self._scaled(energy.view(1, 1, count)) + 2 * image_const)
        gram = basis @ basis.transpose(1, 2)  # (B, R, R)
        linear_part = torch.baddbmm(2 * (basis @ const).unsqueeze(-1), gram, self.coef)  # (B, R, N)
        start = 0
        for block in self.blocks:
            cross = self._image_cross(block)  # (B, rows, N)
            rows = linear_part[:, start : start + cross.shape[1]]
            if self.scale is None:
                rows.add_(cross, alpha=2)
            else:
                rows.addcmul_(cross, self.scale, value=2)
            start += cross.shape[1]
        total = total + linear_part.mul_(self.coef).sum(1, keepdim=True) + const.dot(const)
        inv_std = torch.rsqrt(total.clamp_min(0) / chans + norm.eps)  # (B, 1, N)
        coef = self.coef.new_empty(batch, rank + 1, count)
        torch.mul(self.coef, inv_std, out=coef[:, :rank])
        coef[:, rank:] = inv_std
        scale = inv_std if self.scale is None else inv_std * self.scale
        ones = torch.ones_like(basis[:, :1, :1]).unsqueeze(1)  # (B, 1, 1, 1): one head, token, channel
        const_block = Factor(ones, (const * norm.weight)[None], ("const", *stage, norm))
        blocks = tuple(
            Factor(b.values, (b.weight - b.weight.mean(1, keepdim=True)) * norm.weight, (*b.key, norm))
            for b in self.blocks
        )
        return FactoredRows(
            factors=factors,
            stage=(*stage, norm),
            scale=scale,
            coef=coef,
            basis=torch.cat([basis, const.expand(basis.shape[0], 1, -1)], dim=1) * norm.weight,
            blocks=(*blocks, const_block),
            const=norm.bias,
        )

    def _image_cross(self, block: Factor) -> torch.Tensor:
        """(B, rows, N): each row of centred E' dotted with each basis row of ``block``."""
        batch, heads, tokens, dim = block.values.shape
        projected = self.factors.heads(self.stage, block.weight, heads, True, block.key)  # (H, d, N)
        by_head = block.values.transpose(0, 1).reshape(heads, batch * tokens, dim)
        crossed = (by_head @ projected).view(heads, batch, tokens, -1).transpose(0, 1)
        return crossed.reshape(batch, heads * tokens, -1)

    def linear(self, weight: torch.Tensor, bias: torch.Tensor, name: Hashable) -> torch.Tensor:
        """(B, N, P): X @ weight^T + bias materialised (weight (P, C), ``name`` its cache key).

        Without the positional encoding.
        """
        matrix = self.factors.matrix(self.stage)
        image = self.factors.get(("linear", self.stage, name), lambda: matrix @ weight.T)
        batch = self.coef.shape[0]
        rows = self.basis @ weight.T  # (B, R, P)
        out = torch.baddbmm(self.const @ weight.T + bias, self.coef.transpose(1, 2), rows)
        if self.scale is None:
            return out.add_(image)
        return out.addcmul_(self.scale.transpose(1, 2), image.expand(batch, -1, -1))
