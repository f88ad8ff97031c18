"""SAM's mask decoder: two-way transformer + upscaling + hypernetwork heads + IoU head."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.modeling.common import (
    MLP,
    LayerNorm2d,
    all_parameters,
    linear_weights,
    use_fused_cpu_kernels,
)
from samadapt.modeling.factored import FactoredRows, ImageFactors
from samadapt.modeling.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts masks and their IoU from image and prompt embeddings.

    Args:
        transformer_dim: channels (256). transformer: the two-way transformer.
        num_multimask_outputs: masks in multimask mode (3); one more token serves single-mask mode.
        iou_head_depth, iou_head_hidden_dim: IoU MLP (3, 256).
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )
        # (the embedding it was computed for, what else it depends on, its image side's products)
        self._factors: tuple[weakref.ref[torch.Tensor], tuple, ImageFactors | None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_factors"] = None  # an inference cache (and a weak reference): never pickled or copied
        return state

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        features: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks.

        Args:
            image_embeddings: (1 or B, C, H, W); repeated to the prompt batch when it is 1.
            image_pe: (1, C, H, W).
            sparse_prompt_embeddings: (B, N, C). dense_prompt_embeddings: (B, C, H, W).
            multimask_output: return the 3 multimask outputs instead of the single-mask one.
            features: intermediate encoder features; SAM's decoder does not use them (the argument
                is part of the decoder call signature so replacements such as DeSAM's can).

        Returns:
            (low-res mask logits (B, K, 4H, 4W), IoU predictions (B, K)); K = 3 or 1.
        """
        selected = slice(1, None) if multimask_output else slice(0, 1)
        if torch.is_grad_enabled():
            # training: every mask head stays in the graph (zero gradients for the unselected ones), so
            # DDP sees all trainable parameters used; inference decodes only the selected heads
            masks, iou_pred = self.predict_masks(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
            )
            return masks[:, selected], iou_pred[:, selected]
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, selected
        )
        return masks, iou_pred[:, selected]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        mask_tokens: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, K, 4H, 4W) of the mask tokens ``mask_tokens`` (all by default) and IoU (B, all)."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.shape[0], -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings.to(output_tokens.dtype)], dim=1)
        batch = tokens.shape[0]
        pos_src = image_pe.expand(batch, -1, -1, -1)  # a view: the same encoding for every prompt
        chans, height, width = image_embeddings.shape[1:]
        factors = self._image_factors(image_embeddings, image_pe, dense_prompt_embeddings)
        image: FactoredRows | None = None
        if factors is not None:
            assert isinstance(self.transformer, TwoWayTransformer)  # see _image_factors
            hs, image = self.transformer.forward_factored(FactoredRows.start(factors, batch), tokens)
        else:
            src = image_embeddings
            if src.shape[0] != batch:
                src = torch.repeat_interleave(src, batch, dim=0)
            src = src + dense_prompt_embeddings
            hs, keys = self.transformer(src, pos_src, tokens)  # keys: (B, H*W, C)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in = torch.stack(
            [
                self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                for i in range(self.num_mask_tokens)[mask_tokens]
            ],
            dim=1,
        )  # (B, K, C/8)
        if image is not None:
            first = self.output_upscaling[0]
            assert isinstance(first, nn.ConvTranspose2d)  # see _fast_upscaling
            upscaled = image.linear(*_as_linear(first), name=first)  # (B, HW, 4 * C/4)
            masks = self._upscale_rest(upscaled, hyper_in, height, width)
        elif self._fast_upscaling(keys):
            masks = self._upscale_tokens(keys, hyper_in, height, width)
        else:
            upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(batch, chans, height, width))
            b, c, h, w = upscaled.shape  # (B, C/8, 4H, 4W)
            masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)

    def _image_factors(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> ImageFactors | None:
        """The image side's cached products for this image, from its second prompt on.

        Interactive use prompts one cached embedding many times; without a mask prompt every prompt
        starts from the same image tokens, so the transformer runs factored
        (:mod:`samadapt.modeling.factored`): the products of the image tokens with the weights are
        computed once and kept (for the last image only, through a weak reference to its embedding),
        and each prompt pays only for its low-rank part. The first prompt on an image runs the plain
        path, so an image prompted once (a slice during volume propagation) pays nothing extra.
        CPU inference only (:meth:`TwoWayTransformer.can_factor`), one image, SAM's upscaling, and a
        dense prompt that is the same everywhere (the learned "no mask" embedding).
        """
        transformer = self.transformer
        if (
            image_embeddings.shape[0] != 1
            or image_pe.shape[0] != 1
            or dense.stride(2) != 0
            or dense.stride(3) != 0
            or (dense.shape[0] > 1 and dense.stride(0) != 0)
            or not isinstance(transformer, TwoWayTransformer)
            or not transformer.can_factor(image_embeddings)
            or not self._fast_upscaling(image_embeddings)
        ):
            return None
        dense_vector = dense[:1, :, :1, :1]
        weights = [*all_parameters(transformer), *all_parameters(self.output_upscaling[0])]
        depends = (
            *((t.data_ptr(), tuple(t.shape), _version(t)) for t in (image_pe, dense_vector, *weights)),
            (_version(image_embeddings), image_embeddings.device),
        )
        cached = self._factors
        if cached is None or cached[0]() is not image_embeddings or cached[1] != depends:
            self._factors = (weakref.ref(image_embeddings), depends, None)  # first prompt: plain path
            return None
        factors = cached[2]
        if factors is None:
            keys = (image_embeddings + dense_vector)[0].flatten(1).T.contiguous()  # (HW, C)
            factors = ImageFactors(keys, image_pe[0].flatten(1).T.contiguous())
            self._factors = (cached[0], depends, factors)
        return factors

    # At CPU inference the upscaling runs on the transformer's (B, H*W, C) tokens as it comes out:
    # each 2x2 stride-2 transposed convolution is one matrix product (oneDNN, the GELU fused in) whose
    # output rows are the 4 sub-pixels, LayerNorm2d is a LayerNorm over the last axis, and only the K
    # requested masks are rearranged into image order. Same numbers to float rounding, no NCHW copies.
    def _fast_upscaling(self, keys: torch.Tensor) -> bool:
        layers = list(self.output_upscaling)
        kinds = (nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d, nn.GELU)
        if not use_fused_cpu_kernels(keys) or len(layers) != 5:
            return False
        if any(type(layer) is not kind for layer, kind in zip(layers, kinds, strict=True)):
            return False
        if any(getattr(layer, "approximate", "none") != "none" for layer in layers):
            return False
        return all(_is_2x2_upsampler(layer) for layer in (layers[0], layers[3]))

    def _upscale_tokens(
        self, keys: torch.Tensor, hyper_in: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """keys (B, H*W, C), hyper_in (B, K, C/8) -> mask logits (B, K, 4H, 4W)."""
        first = self.output_upscaling[0]  # kinds checked by _fast_upscaling
        assert isinstance(first, nn.ConvTranspose2d)
        return self._upscale_rest(linear_weights(keys, *_as_linear(first)), hyper_in, height, width)

    def _upscale_rest(
        self, upscaled: torch.Tensor, hyper_in: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """The first transposed convolution's output (B, H*W, 4 * C/4), hyper_in (B, K, C/8) -> logits."""
        _, norm, _, second, _ = self.output_upscaling  # kinds checked by _fast_upscaling
        assert isinstance(second, nn.ConvTranspose2d) and isinstance(norm, LayerNorm2d)
        batch, masks = upscaled.shape[0], hyper_in.shape[1]
        x = upscaled.reshape(batch, height * width * 4, -1)  # (B, 4HW, C/4)
        x = F.gelu(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
        x = linear_weights(x, *_as_linear(second), "gelu").view(batch, height * width * 16, -1)
        logits = x @ hyper_in.transpose(1, 2)  # (B, 16HW, K); rows: h, w, kh1, kw1, kh2, kw2
        # (B, H, W, kh1, kw1, kh2, kw2, K) -> (B, K, H, kh1, kh2, W, kw1, kw2): row 4h + 2 kh1 + kh2
        logits = logits.view(batch, height, width, 2, 2, 2, 2, masks).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return logits.reshape(batch, masks, 4 * height, 4 * width)


def _version(tensor: torch.Tensor) -> int:
    """The in-place version counter of ``tensor`` (-1 for inference tensors, which have none)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return -1


def _is_2x2_upsampler(layer: nn.Module) -> bool:
    """A ConvTranspose2d with kernel 2, stride 2, no padding, groups or dilation, and a bias."""
    return (
        isinstance(layer, nn.ConvTranspose2d)
        and layer.kernel_size == (2, 2)
        and layer.stride == (2, 2)
        and layer.padding == (0, 0)
        and layer.output_padding == (0, 0)
        and layer.dilation == (1, 1)
        and layer.groups == 1
        and layer.bias is not None
    )


def _as_linear(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2 stride-2 transposed convolution as a linear layer: weight (4 * C_out, C_in), bias (4 * C_out,).

    Output row ``(kh * 2 + kw) * C_out + c`` is channel ``c`` of sub-pixel ``(kh, kw)``.
    """
    weight = conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.weight.shape[0])  # (kh, kw, out) x in
    assert conv.bias is not None
    return weight, conv.bias.repeat(4)
