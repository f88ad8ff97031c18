"""RsPrompter training targets and metrics: Hungarian matching, mask losses, anchor assignment, mask AP.

Matching follows the reference's ``HungarianAssigner``: cost = 2.0 x classification (minus the matched
class's probability) + 5.0 x sigmoid cross-entropy + 5.0 x Dice between each query's mask and each
object's mask, solved with :func:`scipy.optimize.linear_sum_assignment`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou


def dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise 1 - Dice of Q flattened mask logits (Q, N) against M targets (M, N): (Q, M)."""
    prob = logits.sigmoid()
    inter = prob @ targets.T
    sizes = prob.sum(1)[:, None] + targets.sum(1)[None, :]
    return 1 - (2 * inter + 1) / (sizes + 1)


def bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean sigmoid cross-entropy of (Q, N) logits against (M, N) targets: (Q, M)."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def match_cost(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    classes: torch.Tensor,
    masks: torch.Tensor,
    weights: Sequence[float] = (2.0, 5.0, 5.0),
) -> torch.Tensor:
    """Cost (Q, M) of assigning each of Q queries to each of M objects.

    Args:
        class_logits: (Q, C + 1) (last column: no object). mask_logits: (Q, h, w).
        classes: (M,) class index of each object. masks: (M, h, w) {0, 1} on the same grid.
        weights: classification, sigmoid cross-entropy and Dice weights (reference: 2, 5, 5).
    """
    w_cls, w_bce, w_dice = weights
    prob = class_logits.softmax(-1)[:, classes]  # (Q, M)
    flat_logits = mask_logits.flatten(1).float()  # (Q, h*w)
    flat_masks = masks.flatten(1).float()  # (M, h*w)
    return (
        -w_cls * prob
        + w_bce * bce_cost(flat_logits, flat_masks)
        + w_dice * dice_cost(flat_logits, flat_masks)
    )


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment of a (Q, M) cost: (query indexes, object indexes), each
    (min(Q, M),), sorted by query."""
    from scipy.optimize import linear_sum_assignment  # scipy: imported when training, not at import

    if cost.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    rows, cols = linear_sum_assignment(cost.detach().cpu().float().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def mask_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid cross-entropy, Dice loss) of (P, 1, h, w) logits upsampled to (P, 1, S, S) {0, 1}
    targets; zeros (with a gradient path) when P = 0."""
    if logits.shape[0] == 0:
        zero = logits.sum() * 0.0
        return zero, zero
    if logits.shape[-2:] != targets.shape[-2:]:
        logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    bce = F.binary_cross_entropy_with_logits(logits, targets.float())
    prob = logits.sigmoid().flatten(1)
    truth = targets.float().flatten(1)
    dice = 1 - (2 * (prob * truth).sum(1) + 1) / (prob.sum(1) + truth.sum(1) + 1)
    return bce, dice.mean()


def iou_loss(logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE between (P, 1) IoU predictions and the real IoU of (P, 1, h, w) logits against (P, 1, S, S)
    targets (no gradient through the IoU itself); zero when P = 0."""
    if logits.shape[0] == 0:
        return iou_predictions.sum() * 0.0
    with torch.no_grad():
        if logits.shape[-2:] != targets.shape[-2:]:
            logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        pred, truth = (logits > 0).flatten(1), (targets > 0.5).flatten(1)
        real = (pred & truth).sum(1).float() / (pred | truth).sum(1).float().clamp(min=1)
    return F.mse_loss(iou_predictions[:, 0].float(), real)


def classification_loss(
    logits: torch.Tensor, queries: torch.Tensor, classes: torch.Tensor, no_object_weight: float = 0.1
) -> torch.Tensor:
    """Cross-entropy of (Q, C + 1) class logits: matched ``queries`` (n,) get ``classes`` (n,), the rest
    the no-object class (weight ``no_object_weight``, reference 0.1)."""
    num_classes = logits.shape[1] - 1
    target = torch.full((logits.shape[0],), num_classes, dtype=torch.long, device=logits.device)
    target[queries.to(logits.device)] = classes.to(logits.device)
    weight = torch.ones(num_classes + 1, device=logits.device)
    weight[-1] = no_object_weight
    return F.cross_entropy(logits.float(), target, weight=weight)


def mask_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """Tight (M, 4) x0, y0, x1, y1 boxes (pixel edges, x1/y1 exclusive) of (M, H, W) masks."""
    if masks.shape[0] == 0:
        return masks.new_zeros(0, 4, dtype=torch.float32)
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (M, H), (M, W)
    h_idx = torch.arange(masks.shape[1], device=masks.device)
    w_idx = torch.arange(masks.shape[2], device=masks.device)
    big = max(masks.shape[1], masks.shape[2])
    x0 = torch.where(cols, w_idx, big).amin(1)
    x1 = torch.where(cols, w_idx, -1).amax(1) + 1
    y0 = torch.where(rows, h_idx, big).amin(1)
    y1 = torch.where(rows, h_idx, -1).amax(1) + 1
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def assign_anchors(
    anchors: torch.Tensor, boxes: torch.Tensor, positive: float = 0.5, negative: float = 0.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-IoU assignment of (N, 4) anchors to (M, 4) boxes.

    Returns:
        (object index per anchor (N,): -1 background, -2 ignored; IoU with it (N,)). Each object also
        gets its best anchor, so no object goes without a positive anchor.
    """
    if boxes.shape[0] == 0:
        empty = torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device)
        return empty, anchors.new_zeros(anchors.shape[0])
    iou = box_iou(anchors, boxes)  # (N, M)
    best, which = iou.max(dim=1)
    assigned = torch.where(best >= positive, which, torch.where(best < negative, -1, -2))
    forced = iou.argmax(dim=0)  # (M,) the best anchor of each object
    assigned[forced] = torch.arange(boxes.shape[0], device=anchors.device)
    return assigned, best


class MaskAP:
    """Mask AP through ``torchmetrics.detection.MeanAveragePrecision(iou_type="segm")`` (COCO AP).

    Kept out of the adapter's module tree (its state must not enter adapter checkpoints).
    """

    def __init__(self) -> None:
        self._metric: Any = None
        self._predicted = 0
        self._objects = 0

    @property
    def metric(self) -> Any:
        if self._metric is None:
            from torchmetrics.detection import MeanAveragePrecision

            self._metric = MeanAveragePrecision(iou_type="segm")
        return self._metric

    def update(
        self, predictions: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]
    ) -> None:
        """Per image: predictions ``masks`` (N, H, W) bool, ``scores`` (N,), ``labels`` (N,); targets
        ``masks`` (M, H, W) bool, ``labels`` (M,)."""
        self._predicted += sum(int(p["masks"].shape[0]) for p in predictions)
        self._objects += sum(int(t["masks"].shape[0]) for t in targets)
        self.metric.update(
            [{k: v.detach().cpu() for k, v in p.items()} for p in predictions],
            [{k: v.detach().cpu() for k, v in t.items()} for t in targets],
        )

    def compute(self) -> dict[str, torch.Tensor]:
        """``map``, ``map_50``, ``map_75`` (COCO mask AP in [0, 1]; -1 without any object), then reset.

        No prediction at all against some objects is AP 0 (torchmetrics' COCO backend says -1 there).
        """
        if self._metric is None:
            return {}
        keys = ("map", "map_50", "map_75")
        if self._predicted == 0 and self._objects > 0:
            result = {k: torch.tensor(0.0) for k in keys}
        else:
            result = self._metric.compute()
        self._metric.reset()
        self._predicted = self._objects = 0
        return {k: result[k].float() for k in keys}
