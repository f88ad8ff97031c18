"""Medical SAM Adapter (MSA / Med-SA): bottleneck adapters in every encoder block.

Per block (medical.md §5): a Space-Adapter after the attention (D -> D/4 -> D with GELU, with skip),
an MLP-Adapter beside the MLP on the same normalised input (no skip, scaled by 0.5), and for 3D
input a Depth-Adapter after the frozen attention re-run across slices ("space-depth transpose").
The image encoder stays frozen; the mask decoder trains (``unfreeze``). Training prompts: one
random click on the object, loss Dice + BCE (+ IoU-head MSE, see ``iou_weight``).

Works on SAM's ViT blocks and on TinyViT blocks (space and MLP adapters; TinyViT's windowed
attention has a fixed token grid, so the depth branch is ViT-only).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.adapter import WRAPS_ENCODER, Adapter, AdapterError, register_adapter
from samadapt.adapters.common import box_shift_for, dice_bce_loss, simulate
from samadapt.modeling import PromptBatch, SamModel
from samadapt.modeling.image_encoder_vit import Block
from samadapt.modeling.tiny_vit import TinyViTBlock


class Bottleneck(nn.Module):
    """MSA's adapter: ``fc2(GELU(fc1(x)))`` (D -> ratio*D -> D), plus ``x`` when ``skip``."""

    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.gelu(self.fc1(x)))
        return x + y if self.skip else y


def _factor_pair(n: int) -> tuple[int, int]:
    """The closest factor pair (a, b), a <= b, a * b = n."""
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


class AdaptedAttention(nn.Module):
    """``space(attn(x))``, plus for chunks of ``depth`` consecutive slices ``depth_adapter(attn(x^T))``
    where ``x^T`` attends across the slices at each pixel (MSA's space-depth transpose).

    Input and output as the wrapped attention: (B, H, W, D) for ViT, (B, N, C) for TinyViT.
    """

    def __init__(
        self, attn: nn.Module, space: Bottleneck, depth_adapter: Bottleneck | None, depth: int
    ) -> None:
        super().__init__()
        self.attn = attn
        self.space = space
        self.depth_adapter = depth_adapter
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.space(self.attn(x))
        if self.depth_adapter is None or self.depth <= 1 or x.ndim != 4:
            return out
        frames, height, width, dim = x.shape
        if frames % self.depth:
            raise AdapterError(
                f"MSA depth branch: batch of {frames} slices is not a multiple of {self.depth}"
            )
        volumes = frames // self.depth
        rows, cols = _factor_pair(self.depth)
        # (b*d, h, w, c) -> (b*h*w, d, c) -> (b*h*w, rows, cols, c): a small grid of slices per pixel
        across = x.view(volumes, self.depth, height, width, dim).permute(0, 2, 3, 1, 4)
        across = across.reshape(volumes * height * width, rows, cols, dim)
        across = self.depth_adapter(self.attn(across))
        across = across.reshape(volumes, height, width, self.depth, dim).permute(0, 3, 1, 2, 4)
        return out + across.reshape(frames, height, width, dim)


class ParallelMLP(nn.Module):
    """``mlp(x) + scale * adapter(norm(x))``: MSA's MLP-Adapter beside the frozen MLP.

    ``norm`` is the MLP's own input normalisation where the MLP normalises itself (TinyViT), else
    identity (SAM's ViT block hands the MLP an already normalised input).
    """

    def __init__(self, mlp: nn.Module, adapter: Bottleneck, scale: float, norm: nn.Module | None) -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter
        self.scale = scale
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter_in = self.norm(x) if self.norm is not None else x
        return self.mlp(x) + self.scale * self.adapter(adapter_in)


@register_adapter("msa")
class MedicalSAMAdapter(Adapter):
    """Space, MLP (and optionally depth) bottleneck adapters in every encoder block.

    Args:
        ratio: bottleneck width as a fraction of the block width (0.25).
        mlp_scale: scale of the MLP-Adapter branch (0.5).
        depth_adapter: create the Depth-Adapters too (the reference creates them even in 2D, where they
            receive no gradient; 3 adapters x 12 blocks on ViT-B = 10,651,392 parameters).
        depth: consecutive slices per volume in a batch for the depth branch (1 = 2D, branch unused).
        unfreeze: core parts trained alongside (MSA trains the mask decoder).
        prompt: ``point`` (MSA: one random click) or ``box``.
        box_shift_at_1024: box jitter when ``prompt="box"``.
        iou_weight: IoU-head MSE weight. The reference trains the decoder without it (its IoU head then
            gets no gradient); 1 keeps the IoU predictions meaningful for multimask ranking and keeps
            every trainable parameter in the graph, which DDP requires.
    """

    capabilities = frozenset({WRAPS_ENCODER})

    def __init__(
        self,
        ratio: float = 0.25,
        mlp_scale: float = 0.5,
        depth_adapter: bool = False,
        depth: int = 1,
        unfreeze: list[str] | tuple[str, ...] = ("mask_decoder",),
        prompt: str = "point",
        box_shift_at_1024: int = 20,
        iou_weight: float = 1.0,
    ) -> None:
        super().__init__(
            unfreeze=unfreeze,
            init_args={
                "ratio": ratio,
                "mlp_scale": mlp_scale,
                "depth_adapter": depth_adapter,
                "depth": depth,
                "unfreeze": list(unfreeze),
                "prompt": prompt,
                "box_shift_at_1024": box_shift_at_1024,
                "iou_weight": iou_weight,
            },
        )
        self.iou_weight = iou_weight
        self.ratio, self.mlp_scale = ratio, mlp_scale
        self.use_depth, self.depth = depth_adapter, depth
        self.prompt, self.box_shift_at_1024 = prompt, box_shift_at_1024
        self.space_adapters = nn.ModuleList()
        self.mlp_adapters = nn.ModuleList()
        self.depth_adapters = nn.ModuleList()

    def install(self, model: SamModel) -> None:
        blocks = [m for m in model.image_encoder.modules() if isinstance(m, (Block, TinyViTBlock))]
        if not blocks:
            raise AdapterError(f"{model.variant}: no ViT or TinyViT blocks to adapt")
        device = next(model.parameters()).device
        for block in blocks:
            dim = block.dim
            space = Bottleneck(dim, self.ratio, skip=True).to(device)
            mlp_adapter = Bottleneck(dim, self.ratio, skip=False).to(device)
            depth_adapter = None
            if self.use_depth:
                if isinstance(block, TinyViTBlock):
                    raise AdapterError(
                        "the MSA depth adapter needs ViT blocks (TinyViT's attention grid is fixed)"
                    )
                depth_adapter = Bottleneck(dim, self.ratio, skip=True).to(device)
                self.depth_adapters.append(depth_adapter)
            self.space_adapters.append(space)
            self.mlp_adapters.append(mlp_adapter)
            block.attn = AdaptedAttention(block.attn, space, depth_adapter, self.depth)
            norm = cast(nn.Module, block.mlp.norm) if isinstance(block, TinyViTBlock) else None
            block.mlp = ParallelMLP(block.mlp, mlp_adapter, self.mlp_scale, norm)

    def simulate_prompts(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> PromptBatch:
        shift = box_shift_for(masks.shape[-1], self.box_shift_at_1024)
        return simulate(self.prompt, masks, shift, generator)

    def loss(
        self, logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return dice_bce_loss(logits, iou_predictions, targets, iou_weight=self.iou_weight)
