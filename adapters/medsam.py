"""MedSAM fine-tuning: no new modules; the image encoder and/or mask decoder are trained with boxes.

``MedSAMFineTune()`` is MedSAM's recipe (image encoder + mask decoder, prompt encoder frozen);
``MedSAMFineTune(train_image_encoder=False)`` trains the mask decoder only. Boxes come from the
target mask, each side pushed outward by a random 0-20 px at 1024 (0-5 px at 256). Loss: Dice +
BCE; ``iou_weight=1`` adds LiteMedSAM's IoU-head MSE.
"""

from __future__ import annotations

import torch

from samadapt.adapter import FINE_TUNES_CORE, Adapter, register_adapter
from samadapt.adapters.common import box_shift_for, dice_bce_loss, simulate
from samadapt.modeling import PromptBatch, SamModel


@register_adapter("medsam")
class MedSAMFineTune(Adapter):
    """Full or decoder-only fine-tuning of the core, MedSAM style.

    Args:
        train_image_encoder: also train the image encoder (MedSAM); False trains the decoder only.
        box_shift_at_1024: largest outward push of each box side, in pixels of a 1024 frame.
        iou_weight: weight of the IoU-head MSE term (LiteMedSAM uses 1; MedSAM 0).
        prompt: ``box`` (MedSAM) or ``point`` (one random click on the object).
    """

    capabilities = frozenset({FINE_TUNES_CORE})

    def __init__(
        self,
        train_image_encoder: bool = True,
        box_shift_at_1024: int = 20,
        iou_weight: float = 0.0,
        prompt: str = "box",
    ) -> None:
        roles = ("image_encoder", "mask_decoder") if train_image_encoder else ("mask_decoder",)
        super().__init__(
            unfreeze=roles,
            init_args={
                "train_image_encoder": train_image_encoder,
                "box_shift_at_1024": box_shift_at_1024,
                "iou_weight": iou_weight,
                "prompt": prompt,
            },
        )
        self.box_shift_at_1024 = box_shift_at_1024
        self.iou_weight = iou_weight
        self.prompt = prompt

    def install(self, model: SamModel) -> None:
        """Nothing to wire: MedSAM changes no module, it trains existing ones."""

    def simulate_prompts(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> PromptBatch:
        shift = box_shift_for(masks.shape[-1], self.box_shift_at_1024)
        return simulate(self.prompt, masks, shift, generator)

    def loss(
        self, logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return dice_bce_loss(logits, iou_predictions, targets, iou_weight=self.iou_weight)
