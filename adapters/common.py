"""Prompt simulation and losses shared by the adapters (each adapter chooses its own)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from samadapt.modeling import PromptBatch

PROMPT_KINDS = ("box", "point")


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of (P, 1, S, S) masks: (P, 4) x0, y0, x1, y1 with inclusive max pixel indexes.

    An empty mask gets the whole frame.
    """
    present = masks[:, 0] > 0.5  # (P, S, S)
    size = present.shape[-1]
    rows, cols = present.any(dim=2), present.any(dim=1)  # (P, S) each
    index = torch.arange(size, device=masks.device)
    big = torch.full_like(index, size)
    x0 = torch.where(cols, index, big).amin(dim=1)
    y0 = torch.where(rows, index, big).amin(dim=1)
    x1 = torch.where(cols, index, -1).amax(dim=1)
    y1 = torch.where(rows, index, -1).amax(dim=1)
    empty = ~cols.any(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[empty] = torch.tensor([0.0, 0.0, size - 1.0, size - 1.0], device=masks.device)
    return boxes


def jittered_boxes(
    masks: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """MedSAM's training boxes: each side of the tight box pushed outward by U{0..max_shift} pixels.

    Args:
        masks: (P, 1, S, S) targets in the encoder frame.
        max_shift: the largest push in pixels of that frame (MedSAM: 20 at 1024, LiteMedSAM: 5 at 256).

    Returns:
        (P, 4) boxes clipped to the frame.
    """
    boxes = mask_boxes(masks)
    size = masks.shape[-1]
    if max_shift > 0:
        shift = torch.randint(0, max_shift + 1, boxes.shape, generator=generator).to(boxes)
        boxes = boxes + shift * torch.tensor([-1.0, -1.0, 1.0, 1.0], device=boxes.device)
    return boxes.clamp(0, size - 1)


def random_points(
    masks: torch.Tensor, generator: torch.Generator | None = None, foreground: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random click per mask: (P, 1, 2) x, y and (P, 1) labels.

    Args:
        masks: (P, 1, S, S) targets.
        foreground: (P,) bool; where False the click is drawn from the background (label 0) instead.
            Default: every click on the object (label 1).
    """
    count, _, _, width = masks.shape
    flat = masks[:, 0].reshape(count, -1) > 0.5  # (P, S*S)
    want = torch.ones(count, dtype=torch.bool, device=masks.device) if foreground is None else foreground
    pool = torch.where(want[:, None], flat, ~flat)
    pool = torch.where(pool.any(dim=1, keepdim=True), pool, torch.ones_like(pool))  # empty: anywhere
    noise = torch.rand(pool.shape, generator=generator).to(masks.device)
    pick = torch.where(pool, noise, -1.0).argmax(dim=1)  # uniform over the pool
    xs, ys = (pick % width).float(), torch.div(pick, width, rounding_mode="floor").float()
    labels = want.float()
    return torch.stack([xs, ys], dim=1)[:, None, :], labels[:, None]


def simulate(
    kind: str, masks: torch.Tensor, box_shift: int, generator: torch.Generator | None = None
) -> PromptBatch:
    """Training prompts of one kind (``box`` or ``point``) for (P, 1, S, S) masks, one per mask."""
    if kind == "box":
        return PromptBatch(boxes=jittered_boxes(masks, box_shift, generator))
    if kind == "point":
        points, labels = random_points(masks, generator)
        return PromptBatch(points=points, point_labels=labels)
    raise ValueError(f"unknown prompt kind {kind!r}; choose from {', '.join(PROMPT_KINDS)}")


def box_shift_for(size: int, shift_at_1024: int = 20) -> int:
    """MedSAM's 20 px at 1024 scaled to an S-pixel encoder frame (5 at 256)."""
    return round(shift_at_1024 * size / 1024)


def upsample_logits(logits: torch.Tensor, size: int) -> torch.Tensor:
    """(P, K, h, w) low-res logits -> (P, K, size, size), bilinear (identity when already there)."""
    if logits.shape[-1] == size and logits.shape[-2] == size:
        return logits
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of thresholded logits against {0, 1} targets, both (P, 1, S, S): (P, 1), no gradient."""
    with torch.no_grad():
        pred = logits > 0
        truth = targets > 0.5
        inter = (pred & truth).flatten(1).sum(1).float()
        union = (pred | truth).flatten(1).sum(1).float()
        return (inter / union.clamp(min=1.0))[:, None]


def dice_bce_loss(
    logits: torch.Tensor,
    iou_predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    iou_weight: float = 0.0,
    pos_weight: float | None = None,
) -> dict[str, torch.Tensor]:
    """MedSAM's loss: MONAI Dice (sigmoid, squared) + BCE, on logits upsampled to the target size;
    LiteMedSAM adds ``iou_weight`` x MSE between the IoU head and the mask's real IoU.

    Args:
        logits: (P, 1, h, w). iou_predictions: (P, 1). targets: (P, 1, S, S) in {0, 1}.
        pos_weight: BCE positive weight (MSA's 2D loss uses 2).
    """
    from monai.losses import DiceLoss

    full = upsample_logits(logits, targets.shape[-1])
    dice = DiceLoss(sigmoid=True, squared_pred=True, reduction="mean")(full, targets)
    weight = None if pos_weight is None else torch.tensor(pos_weight, device=full.device)
    bce = F.binary_cross_entropy_with_logits(full, targets, pos_weight=weight)
    terms = {"dice": dice, "bce": bce}
    total = dice + bce
    if iou_weight:
        iou_mse = F.mse_loss(iou_predictions.float(), mask_iou(full, targets))
        terms["iou_mse"] = iou_mse
        total = total + iou_weight * iou_mse
    terms["loss"] = total
    return terms
