"""SAM's mask decoder: two-way transformer + upscaling + hypernetwork heads + IoU head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from samadapt.modeling.common import MLP, LayerNorm2d


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
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens: (B, num_mask_tokens, 4H, 4W) logits and (B, num_mask_tokens) IoU."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.shape[0], -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings.to(output_tokens.dtype)], dim=1)
        batch = tokens.shape[0]
        src = image_embeddings
        if src.shape[0] != batch:
            src = torch.repeat_interleave(src, batch, dim=0)
        src = src + dense_prompt_embeddings
        pos_src = image_pe.expand(batch, -1, -1, -1)  # a view: the same encoding for every prompt
        chans, height, width = src.shape[1:]
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        src = src.transpose(1, 2).reshape(batch, chans, height, width)
        upscaled = self.output_upscaling(src)  # (B, C/8, 4H, 4W)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, K, C/8)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
