"""LoRA on SAM through ``peft``: on the encoder's fused ``qkv`` (all of q, k, v), or on q and v only
as SAMed, optionally on the mask decoder's attention too; mergeable into the base weights.

The encoder attentions are found structurally (modules with a ``qkv`` Linear and a ``qkv_rows``
layout method: SAM's ViT ``[q|k|v]``, TinyViT per head), never by name patterns. For q/v-only LoRA
each fused ``qkv`` is split into ``q``/``k``/``v`` Linears that reproduce its output rows exactly
(:class:`SplitQKV`), peft adapts ``q`` and ``v``, and :meth:`LoRA.merge` folds everything back into
one plain Linear.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from samadapt.adapter import WRAPS_ENCODER, Adapter, AdapterError, register_adapter
from samadapt.adapters.common import box_shift_for, dice_bce_loss, simulate
from samadapt.modeling import PromptBatch, SamModel

TARGETS = ("qkv", "qv")
_ADAPTER_NAME = "default"


def _peft():
    try:
        import peft
        from peft.tuners.lora import LoraLayer
    except ImportError:
        from samadapt.errors import MissingDependencyError

        raise MissingDependencyError('LoRA needs peft: pip install "samadapt[train]"') from None
    return peft, LoraLayer


class SplitQKV(nn.Module):
    """A fused qkv Linear as three Linears ``q``, ``k``, ``v`` with the same output, row for row.

    Args:
        fused: Linear(D, 3D') whose output rows ``rows[part]`` compute ``part``.
        rows: output-row indexes of q, k and v in the fused layout.
    """

    order: torch.Tensor
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear

    def __init__(self, fused: nn.Linear, rows: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.in_features, self.out_features = fused.in_features, fused.out_features
        for part in "qkv":
            index = rows[part]
            layer = nn.Linear(
                fused.in_features,
                len(index),
                bias=fused.bias is not None,
                device=fused.weight.device,
                dtype=fused.weight.dtype,
            )
            with torch.no_grad():
                layer.weight.copy_(fused.weight[index.to(fused.weight.device)])
                if fused.bias is not None:
                    layer.bias.copy_(fused.bias[index.to(fused.weight.device)])
            setattr(self, part, layer)
        concatenated = torch.cat([rows["q"], rows["k"], rows["v"]])  # fused row of each output column
        order = torch.argsort(concatenated).to(fused.weight.device)
        self.register_buffer("order", order, persistent=False)
        self.identity_order = bool(torch.equal(torch.argsort(concatenated), torch.arange(len(concatenated))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., 3D') in the fused layout."""
        out = torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)
        if self.identity_order:
            return out  # SAM's ViT: [q|k|v] is already the fused order
        return out.index_select(-1, self.order)

    def fused(self) -> nn.Linear:
        """The equivalent single Linear (after any LoRA has been merged into q and v)."""
        parts = [cast(nn.Linear, getattr(self, p)) for p in "qkv"]
        weight = torch.cat([p.weight for p in parts])[self.order]
        layer = nn.Linear(self.in_features, self.out_features, bias=parts[0].bias is not None)
        layer.to(weight.device, weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if parts[0].bias is not None:
                layer.bias.copy_(torch.cat([cast(torch.Tensor, p.bias) for p in parts])[self.order])
        return layer


def encoder_attentions(model: SamModel) -> list[tuple[str, nn.Module]]:
    """(name in the image encoder, module) of every attention with a fused qkv and a known layout."""
    return [
        (name, module)
        for name, module in model.image_encoder.named_modules()
        if isinstance(getattr(module, "qkv", None), nn.Linear) and hasattr(module, "qkv_rows")
    ]


def decoder_attentions(model: SamModel) -> list[tuple[str, nn.Module]]:
    """(name in the mask decoder, module) of every attention with separate q/k/v projections."""
    return [
        (name, module)
        for name, module in model.mask_decoder.named_modules()
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj"))
    ]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


@register_adapter("lora")
class LoRA(Adapter):
    """Low-rank adaptation of the encoder attention (and optionally the decoder attention).

    Args:
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling alpha / r); None means alpha = r (scaling 1, as SAMed).
        dropout: dropout on the LoRA input.
        targets: ``qkv`` (one LoRA over the fused q, k, v projection) or ``qv`` (q and v only, SAMed).
        decoder_attention: also put LoRA on q and v of the mask decoder's attentions (SAMed_s).
        unfreeze: core parts trained in full alongside (none by default; SAMed trains the prompt
            encoder and the mask decoder).
        prompt: training prompt kind, ``box`` or ``point``.
        box_shift_at_1024: box jitter as in MedSAM (pixels at 1024).
        iou_weight: IoU-head MSE weight (as LiteMedSAM).
    """

    capabilities = frozenset({WRAPS_ENCODER})

    def __init__(
        self,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        targets: str = "qkv",
        decoder_attention: bool = False,
        unfreeze: list[str] | tuple[str, ...] = (),
        prompt: str = "box",
        box_shift_at_1024: int = 20,
        iou_weight: float = 0.0,
    ) -> None:
        if targets not in TARGETS:
            raise AdapterError(f"LoRA targets must be one of {', '.join(TARGETS)}, got {targets!r}")
        if rank < 1:
            raise AdapterError(f"LoRA rank must be >= 1, got {rank}")
        super().__init__(
            unfreeze=unfreeze,
            init_args={
                "rank": rank,
                "alpha": alpha,
                "dropout": dropout,
                "targets": targets,
                "decoder_attention": decoder_attention,
                "unfreeze": list(unfreeze),
                "prompt": prompt,
                "box_shift_at_1024": box_shift_at_1024,
                "iou_weight": iou_weight,
            },
        )
        self.rank, self.alpha, self.dropout = rank, float(alpha if alpha is not None else rank), dropout
        self.targets, self.decoder_attention = targets, decoder_attention
        self.prompt, self.box_shift_at_1024, self.iou_weight = prompt, box_shift_at_1024, iou_weight
        self.layers = nn.ModuleList()  # per adapted Linear: ModuleDict(A=..., B=...) owned here
        self.merged = False

    # ------------------------------------------------------------------ wiring
    def install(self, model: SamModel) -> None:
        peft, lora_layer_type = _peft()
        attentions = encoder_attentions(model)
        if not attentions:
            raise AdapterError(f"{model.variant}: no encoder attention with a fused qkv to adapt")
        encoder_targets = []
        for name, attn in cast(list[tuple[str, Any]], attentions):
            if self.targets == "qv":
                rows = {part: attn.qkv_rows(part) for part in "qkv"}
                attn.qkv = SplitQKV(cast(nn.Linear, attn.qkv), rows)
                encoder_targets += [f"{name}.qkv.q", f"{name}.qkv.v"]
            else:
                encoder_targets.append(f"{name}.qkv")
        self._inject(peft, model.image_encoder, encoder_targets)
        if self.decoder_attention:
            targets = [f"{n}.{p}" for n, _ in decoder_attentions(model) for p in ("q_proj", "v_proj")]
            self._inject(peft, model.mask_decoder, targets)
        for module in model.modules():
            if isinstance(module, lora_layer_type):
                pair = {"A": module.lora_A[_ADAPTER_NAME], "B": module.lora_B[_ADAPTER_NAME]}
                self.layers.append(nn.ModuleDict(pair))

    def _inject(self, peft, root: nn.Module, names: list[str]) -> None:
        """peft's LoRA layers on exactly these Linears of ``root`` (full names, matched exactly)."""
        trainable = {id(p): p.requires_grad for p in root.parameters()}
        config = peft.LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=names, bias="none"
        )
        peft.inject_adapter_in_model(config, root, adapter_name=_ADAPTER_NAME)
        for p in root.parameters():  # peft freezes everything it did not create; the task decides that
            if id(p) in trainable:
                p.requires_grad_(trainable[id(p)])

    def merge(self, model: SamModel) -> bool:
        """Fold every LoRA update into its base Linear and restore SAM's plain fused ``qkv``."""
        if self.merged:
            return True
        _, lora_layer_type = _peft()
        for root in (model.image_encoder, model.mask_decoder):
            for name, module in list(root.named_modules()):
                if isinstance(module, lora_layer_type):
                    module.merge(adapter_names=[_ADAPTER_NAME])
                    _replace(root, name, module.get_base_layer())
            for name, module in list(root.named_modules()):
                if isinstance(module, SplitQKV):
                    _replace(root, name, module.fused())
        self.merged = True
        return True

    # ------------------------------------------------------------------ training
    def simulate_prompts(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> PromptBatch:
        shift = box_shift_for(masks.shape[-1], self.box_shift_at_1024)
        return simulate(self.prompt, masks, shift, generator)

    def loss(
        self, logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return dice_bce_loss(logits, iou_predictions, targets, iou_weight=self.iou_weight)
