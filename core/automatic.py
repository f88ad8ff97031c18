"""Automatic mask generation ("segment everything") for any core or adapter.

The algorithm is segment-anything's ``SamAutomaticMaskGenerator`` (same parameters, same filters, same
order of operations, so the same kept masks), written for speed:

1. a regular grid of ``points_per_side`` x ``points_per_side`` foreground points over the image (and
   over each crop of the optional crop layers, ``crop_n_layers``);
2. the points are decoded ``points_per_batch`` at a time in ONE decoder call per batch
   (:meth:`SamModel.decode_prompts` broadcasts the single image embedding over the prompts), with
   multimask output: K (3 for SAM) candidate masks per point;
3. candidates whose predicted IoU is at most ``pred_iou_thresh`` are dropped on the low-res logits,
   before any upsampling; only the survivors are upsampled to the image size to compute the stability
   score (IoU of the masks thresholded at +-``stability_score_offset``), their box, and the
   crop-edge test;
4. box NMS (``torchvision.ops.batched_nms``) per crop by predicted IoU, then across crops preferring
   smaller crops;
5. optionally, holes and islands under ``min_mask_region_area`` pixels are removed (8-connected, with
   ``scipy.ndimage``) and NMS runs again preferring masks that did not change.

Unlike the reference, masks are never RLE-encoded: the kept candidates wait as low-res logits
(one (256, 256) plane each) and only the masks that survive NMS are upsampled once more to boolean
tensors. Nothing here imports adapters or domains: the generator works with whatever model the
:class:`~samadapt.predictor.Predictor` holds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.errors import InputError
from samadapt.modeling import PromptBatch, SamModel
from samadapt.predictor import ImageEmbedding, Predictor
from samadapt.preprocess import postprocess_logits

__all__ = [
    "AutomaticMaskGenerator",
    "AutomaticMasks",
    "MaskRecord",
    "crop_boxes",
    "masks_to_boxes",
    "point_grid",
    "remove_small_regions",
]

# upsampled float32 logits held at once while scoring candidates (bytes)
_CHUNK_BYTES = 1 << 28


# ---------------------------------------------------------------------------------------- geometry
def point_grid(points_per_side: int) -> np.ndarray:
    """(n * n, 2) x, y in [0, 1]: cell centres of an n x n grid, x varying fastest."""
    if points_per_side < 1:
        raise InputError(f"points_per_side must be at least 1, got {points_per_side}")
    offset = 1.0 / (2 * points_per_side)
    side = np.linspace(offset, 1.0 - offset, points_per_side)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def crop_boxes(size: tuple[int, int], n_layers: int, overlap_ratio: float) -> list[tuple[list[int], int]]:
    """The crops of an (H, W) image: [(x0, y0, x1, y1), layer]; layer 0 is the whole image.

    Layer i >= 1 tiles the image with 2^i x 2^i overlapping crops (overlap ``overlap_ratio`` of the short
    side, halved at each layer), as segment-anything does.
    """
    height, width = size
    boxes = [([0, 0, width, height], 0)]
    short = min(height, width)
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short * (2 / per_side))
        crop_w = math.ceil((overlap * (per_side - 1) + width) / per_side)
        crop_h = math.ceil((overlap * (per_side - 1) + height) / per_side)
        x0s = [int((crop_w - overlap) * i) for i in range(per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0 in x0s:
            for y0 in y0s:
                boxes.append(([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)], layer))
    return boxes


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) float x0, y0, x1, y1 of the first and last pixels; empty masks 0, 0, 0, 0."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, device=masks.device)
    height, width = masks.shape[-2:]
    rows = masks.any(dim=-1)  # (N, H)
    cols = masks.any(dim=-2)  # (N, W)
    top = rows.int().argmax(dim=-1)
    bottom = height - 1 - rows.flip(-1).int().argmax(dim=-1)
    left = cols.int().argmax(dim=-1)
    right = width - 1 - cols.flip(-1).int().argmax(dim=-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1).float()
    return boxes * rows.any(dim=-1, keepdim=True)


def _near_crop_edge(boxes: torch.Tensor, crop: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
    """(N,) True where an uncropped xyxy box lies within 20 px of an inner crop edge (not an image edge)."""
    crop_t = torch.as_tensor(crop, dtype=torch.float32, device=boxes.device)
    image_t = torch.tensor([0, 0, size[1], size[0]], dtype=torch.float32, device=boxes.device)
    shifted = boxes + crop_t[[0, 1, 0, 1]]
    near_crop = (shifted - crop_t).abs() <= 20.0
    near_image = (shifted - image_t).abs() <= 20.0
    return (near_crop & ~near_image).any(dim=1)


def remove_small_regions(mask: np.ndarray, min_area: int, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) under ``min_area`` pixels.

    8-connected components of the (H, W) bool ``mask`` (holes: of its complement, so a small background
    region touching the border counts as a hole). When every island is small the largest one stays.

    Returns:
        (the new mask, whether it changed).
    """
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = ~mask if holes else mask
    labels, count = ndimage.label(working, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    small = sizes < min_area
    if not small.any():
        return mask, False
    if holes:
        fill = np.concatenate([[True], small])  # the mask itself (label 0) plus the small holes
    else:
        fill = np.concatenate([[False], ~small])
        if not fill.any():
            fill[int(sizes.argmax()) + 1] = True
    return fill[labels], True


# ---------------------------------------------------------------------------------------- results
@dataclass
class MaskRecord:
    """One generated mask.

    Attributes:
        label: its value in :meth:`AutomaticMasks.label_map` (1-based, records order).
        area: pixels of the whole mask (some may be hidden under smaller masks in the label map).
        bbox: x, y, width, height (XYWH, as segment-anything: width = x1 - x0 of the edge pixels).
        predicted_iou: the decoder's IoU prediction (the score).
        stability_score: IoU of the mask thresholded at +offset and at -offset.
        point: the grid point (x, y pixels) that prompted it.
        crop_box: XYWH of the crop it came from.
    """

    label: int
    area: int
    bbox: list[int]
    predicted_iou: float
    stability_score: float
    point: list[float]
    crop_box: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AutomaticMasks:
    """The generator's output for one image.

    Attributes:
        masks: (N, H, W) bool tensor, in records order: largest area first.
        records: one :class:`MaskRecord` per mask.
        size: (H, W) of the image.
        decoder_calls: decoder calls made (one per batch of points per crop).
    """

    masks: torch.Tensor
    records: list[MaskRecord]
    size: tuple[int, int]
    decoder_calls: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def label_map(self) -> np.ndarray:
        """(H, W) int32 instance map: 0 background, record i has label i + 1.

        Masks are painted largest first, so a smaller mask lying on a larger one stays visible (its
        pixels take the smaller mask's label).
        """
        labels = torch.zeros(self.size, dtype=torch.int32)
        for n in range(self.masks.shape[0]):
            labels[self.masks[n].cpu()] = n + 1
        return labels.numpy()

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "settings": self.settings,
            "masks": [r.to_dict() for r in self.records],
        }

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


@dataclass
class _Candidates:
    """Masks kept so far: low-res logits (N, 1, s, s) and per-mask tensors (all on one device)."""

    logits: torch.Tensor
    iou: torch.Tensor  # (N,)
    stability: torch.Tensor  # (N,)
    boxes: torch.Tensor  # (N, 4) xyxy in the full image
    points: torch.Tensor  # (N, 2) xy in the full image
    crop: torch.Tensor  # (N,) index into the crop list

    @staticmethod
    def cat(parts: Sequence[_Candidates]) -> _Candidates:
        return _Candidates(*(torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS))

    def take(self, index: torch.Tensor) -> _Candidates:
        return _Candidates(*(getattr(self, f)[index] for f in _FIELDS))


_FIELDS = ("logits", "iou", "stability", "boxes", "points", "crop")


# ---------------------------------------------------------------------------------------- generator
class AutomaticMaskGenerator:
    """Segment everything in an image with a grid of point prompts.

    Args:
        predictor_or_model: a :class:`Predictor` or a :class:`SamModel` (any core, any adapter attached;
            a model gets a predictor on ``device`` at ``precision``).
        points_per_side: grid side; the grid has points_per_side^2 points per crop.
        points_per_batch: points decoded per decoder call.
        pred_iou_thresh: keep masks whose predicted IoU is above this (0: no filter).
        stability_score_thresh: keep masks whose stability score is at least this (0: no filter).
        stability_score_offset: logit offset of the stability score.
        box_nms_thresh: box IoU above which NMS drops the lower-scored mask (within a crop).
        crop_n_layers: extra crop layers (layer i: 2^i x 2^i crops); 0: the whole image only.
        crop_nms_thresh: box NMS threshold across crops.
        crop_overlap_ratio: crop overlap as a fraction of the short side (layer 1).
        crop_n_points_downscale_factor: layer i uses points_per_side / factor^i points per side.
        min_mask_region_area: fill holes and drop islands smaller than this (pixels; 0: off).
        multimask_output: K = 3 candidates per point (SAM); False decodes the single-mask token only
            (for models whose multimask tokens were never trained, as LiteMedSAM's).
        device, precision: for a predictor built from a model (see :class:`Predictor`).
    """

    def __init__(
        self,
        predictor_or_model: Predictor | SamModel,
        points_per_side: int = 32,
        points_per_batch: int = 256,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        min_mask_region_area: int = 0,
        multimask_output: bool = True,
        *,
        device: str | torch.device | None = "cpu",
        precision: str = "auto",
    ) -> None:
        if isinstance(predictor_or_model, Predictor):
            self.predictor = predictor_or_model
        else:
            self.predictor = Predictor(predictor_or_model, device=device, precision=precision)
        if points_per_batch < 1:
            raise InputError(f"points_per_batch must be at least 1, got {points_per_batch}")
        if crop_n_layers < 0 or min_mask_region_area < 0:
            raise InputError("crop_n_layers and min_mask_region_area must be 0 or more")
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.multimask_output = multimask_output
        self.grids = [
            point_grid(max(1, points_per_side // crop_n_points_downscale_factor**layer))
            for layer in range(crop_n_layers + 1)
        ]
        self.decoder_calls = 0

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "points_per_side": self.points_per_side,
            "pred_iou_thresh": self.pred_iou_thresh,
            "stability_score_thresh": self.stability_score_thresh,
            "stability_score_offset": self.stability_score_offset,
            "box_nms_thresh": self.box_nms_thresh,
            "crop_n_layers": self.crop_n_layers,
            "min_mask_region_area": self.min_mask_region_area,
            "multimask_output": self.multimask_output,
        }

    # ------------------------------------------------------------------ public
    def generate(self, image: np.ndarray, embedding: ImageEmbedding | None = None) -> AutomaticMasks:
        """All masks of one (H, W) or (H, W, C) image.

        Args:
            image: gray/RGB, any dtype the predictor accepts.
            embedding: the image's embedding when already computed (e.g. volume slices embedded in
                batches); only without crop layers.
        """
        from torchvision.ops import batched_nms

        size = (int(np.shape(image)[0]), int(np.shape(image)[1]))
        if embedding is not None and self.crop_n_layers:
            raise InputError("a precomputed embedding only serves crop_n_layers=0")
        crops = crop_boxes(size, self.crop_n_layers, self.crop_overlap_ratio)
        calls_before = self.decoder_calls
        parts: list[_Candidates] = []
        sizes: list[tuple[tuple[int, int], tuple[int, int]]] = []  # (crop size, resized size)
        for n, (box, layer) in enumerate(crops):
            x0, y0, x1, y1 = box
            emb = embedding if embedding is not None else self.predictor.embed([image[y0:y1, x0:x1]])[0]
            sizes.append((emb.original_size, emb.resized_size))
            parts.append(self._process_crop(emb, n, box, layer, size))
        found = _Candidates.cat(parts)
        if len(crops) > 1 and found.iou.numel():
            areas = torch.tensor([(b[2] - b[0]) * (b[3] - b[1]) for b, _ in crops], dtype=torch.float32)
            scores = 1.0 / areas.to(found.crop.device)[found.crop]
            keep = batched_nms(found.boxes, scores, torch.zeros_like(found.crop), self.crop_nms_thresh)
            found = found.take(keep)
        masks = self._full_masks(found, crops, sizes, size)
        boxes = found.boxes
        if self.min_mask_region_area > 0 and masks.shape[0]:
            found, masks, boxes = self._remove_small_regions(found, masks)
        return self._result(found, masks, boxes, crops, size, self.decoder_calls - calls_before)

    # ------------------------------------------------------------------ steps
    def _decode(self, emb: ImageEmbedding, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, 2) points in the encoder frame -> (logits (P, K, s, s), IoU (P, K)), one decoder call."""
        self.decoder_calls += 1
        prompts = PromptBatch(points=points[:, None, :], point_labels=torch.ones_like(points[:, :1]))
        encoded = emb.encoder_output()
        return self.predictor.model.decode_prompts(encoded, prompts, multimask_output=self.multimask_output)

    def _process_crop(
        self, emb: ImageEmbedding, index: int, box: list[int], layer: int, size: tuple[int, int]
    ) -> _Candidates:
        """Decode the grid of one crop and keep the masks passing the IoU, stability and edge filters."""
        from torchvision.ops import batched_nms

        device = self.predictor.device
        profile = self.predictor.profile
        crop_h, crop_w = emb.original_size
        pixels = self.grids[layer] * np.array([[crop_w, crop_h]])
        frame = torch.as_tensor(
            profile.coords_to_input(pixels, (crop_h, crop_w)), dtype=torch.float32, device=device
        )
        pixels_t = torch.as_tensor(pixels, dtype=torch.float32, device=device)
        chunk = max(1, _CHUNK_BYTES // (4 * crop_h * crop_w))
        kept: list[_Candidates] = []
        with self.predictor._evaluating():
            for first in range(0, frame.shape[0], self.points_per_batch):
                logits, iou = self._decode(emb, frame[first : first + self.points_per_batch])
                k = logits.shape[1]
                logits = logits.flatten(0, 1)[:, None].float()  # (P*K, 1, s, s)
                iou = iou.flatten().float()
                points = pixels_t[first : first + self.points_per_batch].repeat_interleave(k, dim=0)
                index_t = torch.arange(iou.numel(), device=device)
                if self.pred_iou_thresh > 0:
                    index_t = index_t[iou > self.pred_iou_thresh]
                for start in range(0, index_t.numel(), chunk):
                    rows = index_t[start : start + chunk]
                    full = postprocess_logits(logits[rows], profile, emb.resized_size, (crop_h, crop_w))[:, 0]
                    high = (full > self.stability_score_offset).flatten(1).sum(1)
                    low = (full > -self.stability_score_offset).flatten(1).sum(1)
                    stability = high / low  # NaN for an empty mask: never passes a threshold
                    boxes = masks_to_boxes(full > 0)
                    del full
                    good = ~_near_crop_edge(boxes, box, size)
                    if self.stability_score_thresh > 0:
                        good &= stability >= self.stability_score_thresh
                    rows = rows[good]
                    offset = torch.tensor([box[0], box[1]], dtype=torch.float32, device=device)
                    kept.append(
                        _Candidates(
                            logits[rows],
                            iou[rows],
                            stability[good].float(),
                            boxes[good] + offset.repeat(2),
                            points[rows] + offset,
                            torch.full((rows.numel(),), index, dtype=torch.long, device=device),
                        )
                    )
        if not kept:
            side = self.predictor.model.prompt_encoder.mask_input_size
            empty = torch.zeros(0, device=device)
            return _Candidates(
                torch.zeros(0, 1, *side, device=device),
                empty,
                empty,
                torch.zeros(0, 4, device=device),
                torch.zeros(0, 2, device=device),
                torch.zeros(0, dtype=torch.long, device=device),
            )
        found = _Candidates.cat(kept)
        keep = batched_nms(found.boxes, found.iou, torch.zeros_like(found.crop), self.box_nms_thresh)
        return found.take(keep)

    def _full_masks(
        self,
        found: _Candidates,
        crops: list[tuple[list[int], int]],
        sizes: list[tuple[tuple[int, int], tuple[int, int]]],
        size: tuple[int, int],
    ) -> torch.Tensor:
        """(N, H, W) bool masks of the kept candidates, upsampled from their low-res logits."""
        masks = torch.zeros((found.iou.numel(), *size), dtype=torch.bool, device=found.iou.device)
        profile = self.predictor.profile
        for n, ((x0, y0, x1, y1), _) in enumerate(crops):
            rows = torch.nonzero(found.crop == n).flatten()
            crop_size, resized = sizes[n]
            for start in range(0, rows.numel(), 64):
                part = rows[start : start + 64]
                full = postprocess_logits(found.logits[part], profile, resized, crop_size)[:, 0]
                masks[part, y0:y1, x0:x1] = full > 0
        return masks

    def _remove_small_regions(
        self, found: _Candidates, masks: torch.Tensor
    ) -> tuple[_Candidates, torch.Tensor, torch.Tensor]:
        """Fill small holes, drop small islands, then NMS preferring the masks that did not change."""
        from torchvision.ops import batched_nms

        cleaned, unchanged = [], []
        for mask in masks.cpu().numpy():
            mask, changed_holes = remove_small_regions(mask, self.min_mask_region_area, "holes")
            mask, changed_islands = remove_small_regions(mask, self.min_mask_region_area, "islands")
            cleaned.append(torch.from_numpy(mask))
            unchanged.append(not (changed_holes or changed_islands))
        new_masks = torch.stack(cleaned).to(masks.device)
        boxes = masks_to_boxes(new_masks)
        scores = torch.tensor(unchanged, dtype=torch.float32, device=masks.device)
        nms_thresh = max(self.box_nms_thresh, self.crop_nms_thresh)
        keep = batched_nms(boxes, scores, torch.zeros_like(found.crop), nms_thresh)
        return found.take(keep), new_masks[keep], boxes[keep]

    def _result(
        self,
        found: _Candidates,
        masks: torch.Tensor,
        boxes: torch.Tensor,
        crops: list[tuple[list[int], int]],
        size: tuple[int, int],
        calls: int,
    ) -> AutomaticMasks:
        """Sort by area (largest first) and build the records."""
        areas = masks.flatten(1).sum(1)
        order = torch.sort(areas, descending=True, stable=True).indices
        records = []
        for label, n in enumerate(order.tolist(), start=1):
            x0, y0, x1, y1 = (int(v) for v in boxes[n].tolist())
            cx0, cy0, cx1, cy1 = crops[int(found.crop[n])][0]
            records.append(
                MaskRecord(
                    label=label,
                    area=int(areas[n]),
                    bbox=[x0, y0, x1 - x0, y1 - y0],
                    predicted_iou=float(found.iou[n]),
                    stability_score=float(found.stability[n]),
                    point=[float(v) for v in found.points[n].tolist()],
                    crop_box=[cx0, cy0, cx1 - cx0, cy1 - cy0],
                )
            )
        return AutomaticMasks(masks[order], records, size, calls, self.settings)
