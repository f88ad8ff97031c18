"""RsPrompter-anchor: anchor boxes with classes on the aggregated encoder features -> one prompt set per box.

Simplified against the reference's Mask R-CNN-based prompter; the method, what is shared with the query
variant and every simplification are described in :mod:`samadapt.adapters.rsprompter`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from samadapt.adapter import AdapterError, register_adapter
from samadapt.adapters.rsprompter import RsPrompterBase, _Generator
from samadapt.adapters.rsprompter_heads import (
    AnchorPrompter,
    FeatureAggregator,
    decode_boxes,
    encode_boxes,
    make_anchors,
)
from samadapt.adapters.rsprompter_matching import assign_anchors, iou_loss, mask_boxes_xyxy, mask_losses
from samadapt.modeling import EncoderOutput, SamModel


@register_adapter("rsprompter_anchor")
class RsPrompterAnchor(RsPrompterBase):
    """RsPrompter-anchor (simplified, see the module docstring): anchor boxes with classes -> prompt sets.

    Args:
        num_classes: C object classes.
        tokens: K learned prompt tokens per box (reference: 5).
        layers, hidden: the aggregator (as :class:`RsPrompterQuery`).
        anchor_scales: anchor sides in grid cells (x the encoder stride: LiteMedSAM 4 px, ViT 16 px).
        anchor_ratios: height / width ratios (reference 0.5, 1, 2).
        box_prompt: give each box to SAM as a box prompt besides the K tokens (False: the reference).
        rois_per_image: training RoIs (ground-truth boxes first, then positive proposals).
        anchor_samples: anchors per image in the detection loss (reference RPN: 256, half positive).
        nms_threshold, max_detections, score_threshold: inference (reference 0.5, 100, 0.05).
        iou_weight: as :class:`RsPrompterQuery`.
        unfreeze: core roles trained too (default the mask decoder).
    """

    def __init__(
        self,
        num_classes: int = 1,
        tokens: int = 5,
        layers: list[int] | None = None,
        hidden: int = 32,
        anchor_scales: list[float] | None = None,
        anchor_ratios: list[float] | None = None,
        box_prompt: bool = True,
        rois_per_image: int = 16,
        anchor_samples: int = 256,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        score_threshold: float = 0.3,
        iou_weight: float = 1.0,
        unfreeze: list[str] | None = None,
    ) -> None:
        scales = [2.0, 4.0, 8.0, 16.0] if anchor_scales is None else [float(s) for s in anchor_scales]
        ratios = [0.5, 1.0, 2.0] if anchor_ratios is None else [float(r) for r in anchor_ratios]
        if tokens < 1 or rois_per_image < 1 or anchor_samples < 2 or not scales or not ratios:
            raise ValueError(
                "tokens, rois_per_image >= 1, anchor_samples >= 2, anchor scales and ratios needed"
            )
        roles = ["mask_decoder"] if unfreeze is None else list(unfreeze)
        args = {
            "num_classes": num_classes, "tokens": tokens, "layers": layers, "hidden": hidden,
            "anchor_scales": scales, "anchor_ratios": ratios, "box_prompt": box_prompt,
            "rois_per_image": rois_per_image, "anchor_samples": anchor_samples,
            "nms_threshold": nms_threshold, "max_detections": max_detections,
            "score_threshold": score_threshold, "iou_weight": iou_weight, "unfreeze": roles,
        }  # fmt: skip
        super().__init__(num_classes=num_classes, layers=layers, unfreeze=roles, init_args=args)
        self.tokens, self.hidden, self.scales, self.ratios = tokens, hidden, scales, ratios
        self.box_prompt, self.rois_per_image, self.anchor_samples = box_prompt, rois_per_image, anchor_samples
        self.nms_threshold, self.max_detections, self.score_threshold = (
            nms_threshold,
            max_detections,
            score_threshold,
        )
        self.iou_weight = iou_weight
        self._anchors: tuple[tuple[int, int, int], torch.Tensor] | None = None

    def install(self, model: SamModel) -> None:
        """Create the aggregator and the anchor prompter (no ``model.prompt_generator``: the number of
        prompt sets depends on the image; use :meth:`predict_instances`)."""
        specs = self._specs(model)
        dim = model.prompt_encoder.embed_dim
        head = AnchorPrompter(dim, self.num_classes, self.tokens, len(self.scales) * len(self.ratios))
        generator = _Generator(
            model, [s.index for s in specs], FeatureAggregator(specs, dim, self.hidden), head
        )
        self.generator = generator.to(next(model.parameters()).device)

    def _head(self) -> AnchorPrompter:
        head = self._gen().head
        assert isinstance(head, AnchorPrompter)
        return head

    def anchors(self, grid: tuple[int, int], size: int, device: torch.device) -> torch.Tensor:
        """(h * w * A, 4) anchors of an (h, w) grid over an S-pixel input, cached."""
        key = (grid[0], grid[1], size)
        if self._anchors is None or self._anchors[0] != key or self._anchors[1].device != device:
            stride = size / grid[1]
            sizes = [s * stride for s in self.scales]
            self._anchors = (key, make_anchors(grid, stride, sizes, self.ratios).to(device))
        return self._anchors[1]

    def _features(self, model: SamModel, encoded: EncoderOutput, size: int):
        fmap = self._gen().aggregate(encoded)
        logits, deltas = self._head().detect(fmap)
        anchors = self.anchors((fmap.shape[-2], fmap.shape[-1]), size, fmap.device)
        prompt_map = fmap + model.prompt_encoder.get_dense_pe().to(fmap.dtype)  # the reference's extra PE
        return prompt_map, logits, deltas, anchors

    def _prompt_sets(
        self, model: SamModel, prompt_map: torch.Tensor, boxes: list[torch.Tensor], size: int
    ) -> torch.Tensor:
        """(sum R, K [+ 2], E) prompt tokens for per-image boxes (R_b, 4) in input pixels."""
        tokens = self._head().prompts(
            prompt_map, [b.to(prompt_map.dtype) for b in boxes], prompt_map.shape[-1] / size
        )
        if self.box_prompt:
            sparse, _ = model.embed_prompts(boxes=torch.cat(boxes).to(tokens.dtype))
            tokens = torch.cat([tokens, sparse.to(tokens.dtype)], dim=1)
        return tokens

    def forward_encoded(
        self,
        model: SamModel,
        encoded: EncoderOutput,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detection targets for the anchors; masks for the training RoIs (ground-truth boxes + positive
        proposals): logits (R, 1, 4h, 4w), IoU (R, 1), targets (R, 1, S, S)."""
        images = batch["image"]
        size = images.shape[-1]
        instances = self._instances(batch)
        prompt_map, cls_logits, deltas, anchors = self._features(model, encoded, size)
        det_cls, det_box, rois, roi_targets, roi_images = [], [], [], [], []
        for b, (masks, classes) in enumerate(instances):
            gt_boxes = mask_boxes_xyxy(masks).to(anchors.device)
            assigned, _ = assign_anchors(anchors, gt_boxes)
            pos = torch.nonzero(assigned >= 0)[:, 0]
            neg = torch.nonzero(assigned == -1)[:, 0]
            half = self.anchor_samples // 2
            pos = pos[torch.randperm(len(pos), generator=generator)[:half].to(pos.device)]
            neg = neg[
                torch.randperm(len(neg), generator=generator)[: self.anchor_samples - len(pos)].to(neg.device)
            ]
            picked = torch.cat([pos, neg])
            target = torch.zeros(len(picked), dtype=torch.long, device=cls_logits.device)
            target[: len(pos)] = classes[assigned[pos].to(classes.device)].to(target.device) + 1
            det_cls.append(F.cross_entropy(cls_logits[b, picked].float(), target))
            if len(pos):
                goal = encode_boxes(anchors[pos], gt_boxes[assigned[pos]])
                det_box.append(
                    F.smooth_l1_loss(deltas[b, pos].float(), goal, beta=1 / 9, reduction="sum") / len(pos)
                )
            with torch.no_grad():
                proposals = decode_boxes(anchors[pos], deltas[b, pos].float(), float(size))
            budget = max(self.rois_per_image - len(gt_boxes), 0)
            order = torch.randperm(len(pos), generator=generator)[:budget].to(pos.device)
            boxes = torch.cat([gt_boxes, proposals[order]])[: self.rois_per_image]
            objects = torch.cat([torch.arange(len(gt_boxes), device=pos.device), assigned[pos][order]])
            objects = objects[: self.rois_per_image]
            rois.append(boxes)
            roi_targets.append(masks[objects.to(masks.device)].float())
            roi_images.append(torch.full((len(boxes),), b, dtype=torch.long, device=images.device))
        sparse = self._prompt_sets(model, prompt_map, rois, size)
        logits, iou = self._decode(model, encoded, torch.cat(roi_images), sparse)
        zero = cls_logits.sum() * 0.0
        box_loss = torch.stack(det_box).mean() if det_box else zero
        self._stash: Any = (torch.stack(det_cls).mean(), box_loss)  # read by loss
        if not self.training:
            self._keep_for_ap(
                self._postprocess(model, encoded, prompt_map, cls_logits, deltas, anchors, size, 0.0),
                instances,
            )
        return logits, iou, torch.cat(roi_targets)[:, None]

    def loss(
        self, logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """anchor class CE + box smooth-L1 + mask BCE + Dice on the RoIs' masks."""
        stash, self._stash = self._stash, None
        if stash is None:
            raise AdapterError("RsPrompter loss needs training_forward first")
        cls, box = stash
        bce, dice = mask_losses(logits, targets)
        iou = iou_loss(logits, iou_predictions, targets)
        total = cls + box + bce + dice + self.iou_weight * iou
        return {
            "loss": total,
            "class": cls.detach(),
            "box": box.detach(),
            "bce": bce.detach(),
            "dice_loss": dice.detach(),
            "iou_mse": iou.detach(),
        }

    def _postprocess(
        self,
        model: SamModel,
        encoded: EncoderOutput,
        prompt_map: torch.Tensor,
        cls_logits: torch.Tensor,
        deltas: torch.Tensor,
        anchors: torch.Tensor,
        size: int,
        threshold: float,
    ) -> list[dict[str, torch.Tensor]]:
        boxes_per_image, scores_per_image, labels_per_image = [], [], []
        probs = cls_logits.float().softmax(-1)[..., 1:]  # (B, N, C)
        for b in range(cls_logits.shape[0]):
            score, label = probs[b].max(-1)
            top = score.topk(min(1000, len(score))).indices
            top = top[score[top] > threshold]
            boxes = decode_boxes(anchors[top], deltas[b, top].float(), float(size))
            wide = (boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)
            top, boxes = top[wide], boxes[wide]
            keep = batched_nms(boxes, score[top], label[top], self.nms_threshold)[: self.max_detections]
            boxes_per_image.append(boxes[keep])
            scores_per_image.append(score[top][keep])
            labels_per_image.append(label[top][keep])
        out = []
        if sum(len(b) for b in boxes_per_image):
            sparse = self._prompt_sets(model, prompt_map, boxes_per_image, size)
            index = torch.cat(
                [torch.full((len(bx),), b, dtype=torch.long) for b, bx in enumerate(boxes_per_image)]
            )
            logits, _ = self._decode(model, encoded, index.to(sparse.device), sparse)
            full = (
                F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
                > 0
            )
        else:
            full = torch.zeros(0, size, size, dtype=torch.bool, device=cls_logits.device)
        start = 0
        for b, boxes in enumerate(boxes_per_image):
            masks = full[start : start + len(boxes)]
            start += len(boxes)
            out.append({"masks": masks, "scores": scores_per_image[b], "labels": labels_per_image[b]})
        return out

    def _predict(self, model: SamModel, encoded: EncoderOutput, size: int) -> list[dict[str, torch.Tensor]]:
        prompt_map, cls_logits, deltas, anchors = self._features(model, encoded, size)
        return self._postprocess(
            model, encoded, prompt_map, cls_logits, deltas, anchors, size, self.score_threshold
        )


__all__ = ["RsPrompterAnchor"]
