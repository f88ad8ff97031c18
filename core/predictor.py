"""Interactive prediction: embed an image once, then prompt it any number of times."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from samadapt.errors import InputError
from samadapt.modeling import EncoderOutput, PromptBatch, SamModel
from samadapt.modeling.common import all_modules
from samadapt.precision import PrecisionPlan, plan_precision
from samadapt.preprocess import postprocess_logits, preprocess

if TYPE_CHECKING:
    from samadapt.adapter import Adapter


@dataclass
class ImageEmbedding:
    """A cached image embedding and the geometry needed to map prompts and masks.

    Attributes:
        embedding: (1, 256, 64, 64) float32 on the predictor's device.
        original_size: (H, W) of the input image.
        resized_size: (h, w) of the image inside the padded encoder frame.
        features: the encoder features the model's adapters asked for (``model.feature_indexes``),
            each with a leading batch dimension of 1.
        image: the (1, 3, S, S) preprocessed input when the model keeps it (``model.keep_image``).
    """

    embedding: torch.Tensor
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    features: list[torch.Tensor] = field(default_factory=list)
    image: torch.Tensor | None = None

    def encoder_output(self) -> EncoderOutput:
        return EncoderOutput(self.embedding, self.features, self.image)


@dataclass
class Prediction:
    """Masks at the original resolution, their predicted IoU and the low-res logits.

    Attributes:
        masks: (B, K, H, W) bool.
        scores: (B, K) predicted IoU.
        low_res_logits: (B, K, 256, 256) float32 decoder logits (feed back as ``mask_input``).
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: torch.Tensor


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """Embed once, prompt many times.

    Args:
        model: a loaded :class:`SamModel`, with any adapter attached. It is moved to ``device`` (with
            channels-last weights); every call runs it in eval mode and restores its training flag.
        device: ``cpu``, ``cuda``, ``auto`` or a torch device.
        precision: ``auto``, ``bf16``, ``fp16`` (CUDA) or ``fp32``. The encoder runs at this precision;
            the light decoder in fp32. ``auto`` is the fastest plan that keeps fp32 masks on this machine
            (:mod:`samadapt.autoprecision`): bf16 in the quality-checked parts of the encoder where that
            is measurably faster (``precision`` then reads ``bf16-partial``), else fp32.
        adapter: the adapter attached to ``model``, when the caller holds it (``load_predictor`` does): what
            an adapter offers beyond SAM's prompts (an instance adapter's ``predict_encoded``) is reached
            through it. None for a plain core; the model runs the same either way.

    Attributes:
        precision: the precision used: ``fp32``, ``bf16``, ``fp16`` or ``bf16-partial``.
        precision_plan: the :class:`~samadapt.precision.PrecisionPlan` behind it: which encoder modules
            run in bf16 (``modules``, ``parts``) and why (``reason``).
        propagation_plan: the plan for slices embedded for volume propagation (``embed(...,
            propagation=True)``): the same, or fp32 where ``auto``'s plan was not checked on propagation.
    """

    def __init__(
        self,
        model: SamModel,
        device: str | torch.device | None = "cpu",
        precision: str = "auto",
        adapter: Adapter | None = None,
    ):
        self.adapter = adapter
        self.device = pick_device(device)
        # channels-last convolutions are ~25% faster on CPU (oneDNN) and on CUDA tensor cores
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.precision_plan: PrecisionPlan = plan_precision(precision, self.device, self.model)
        self.precision = self.precision_plan.precision
        self.propagation_plan: PrecisionPlan = self.precision_plan.for_propagation()
        self._current: ImageEmbedding | None = None
        self.last_encode_seconds = 0.0

    @property
    def profile(self):
        return self.model.profile

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode and no autograd for one call; each module's training flag comes back after.

        Only the modules in training mode are switched: ``Module.eval()`` and ``.train()`` walk and set
        all ~300 of LiteMedSAM's modules, about 1.5 ms a prompt.
        """
        training = [module for module in all_modules(self.model) if module.training]
        for module in training:
            module.training = False
        try:
            with torch.inference_mode():
                yield
        finally:
            for module in training:
                module.training = True

    # ------------------------------------------------------------------ embedding
    def encode_batch(self, batch: torch.Tensor, *, propagation: bool = False) -> EncoderOutput:
        """Preprocessed (B, 3, S, S) images -> float32 embeddings (B, 256, 64, 64) and features.

        Runs the encoder as every predictor call does: inference mode, channels-last memory and the
        precision plan (bf16/fp16 autocast over the whole encoder or over the planned parts, or fp32;
        :attr:`propagation_plan` with ``propagation=True``). Keeps the features the model's adapters
        asked for.
        """
        plan = self.propagation_plan if propagation else self.precision_plan
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        with self._evaluating(), plan.applied(self.model, self.device):
            encoded = self.model.encode(batch)
        return EncoderOutput(
            encoded.embedding.float(),
            [f.float() for f in encoded.features],
            encoded.image.float() if encoded.image is not None else None,
        )

    def embed(
        self, images: Sequence[np.ndarray], batch_size: int = 8, *, propagation: bool = False
    ) -> list[ImageEmbedding]:
        """Embed several images (e.g. the slices of a volume), ``batch_size`` at a time.

        ``propagation=True`` (slices that volume propagation prompts from each other's masks) runs
        :attr:`propagation_plan`, which is fp32 where the precision plan was not checked on propagation.
        """
        results: list[ImageEmbedding] = []
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            chunk = images[first : first + batch_size]
            tensors, sizes = [], []
            for image in chunk:
                tensor, resized = preprocess(image, self.profile)
                tensors.append(tensor)
                sizes.append(((int(np.shape(image)[0]), int(np.shape(image)[1])), resized))
            encoded = self.encode_batch(torch.cat(tensors), propagation=propagation)
            for i, (original, resized) in enumerate(sizes):
                row = encoded.select(torch.tensor([i], device=encoded.embedding.device))
                results.append(ImageEmbedding(row.embedding, original, resized, row.features, row.image))
        self.last_encode_seconds = time.perf_counter() - start
        return results

    def set_image(self, image: np.ndarray) -> ImageEmbedding:
        """Embed one image (gray/RGB; uint8/uint16/float; any size) and cache it for :meth:`predict`."""
        self._current = self.embed([image])[0]
        return self._current

    @property
    def current(self) -> ImageEmbedding:
        if self._current is None:
            raise RuntimeError("call set_image() before predict()")
        return self._current

    # ------------------------------------------------------------------ prompting
    def check_points(self, coords: np.ndarray, size: tuple[int, int], what: str = "point") -> None:
        """Refuse (..., 2) x/y coordinates outside an (H, W) image.

        Coordinates are pixel indexes (x = column, y = row; fractions allowed), so the valid range is
        0..W-1 and 0..H-1 inclusive; a box's corners are the first and last pixels it covers, as the
        tight box ``x0, y0, x1, y1 = min/max of np.nonzero(mask)`` that MedSAM/LiteMedSAM trained on.
        The volume prompts (:mod:`samadapt.domains.medical.prompts`) follow the same convention.
        """
        height, width = size
        if not np.isfinite(coords).all():
            raise InputError(f"{what} has non-finite coordinates")
        xs, ys = coords[..., 0], coords[..., 1]
        if xs.min() < 0 or ys.min() < 0 or xs.max() > width - 1 or ys.max() > height - 1:
            raise InputError(
                f"{what} lies outside the {width}x{height} image (pixel indexes x 0..{width - 1}, "
                f"y 0..{height - 1})"
            )

    def check_boxes(self, boxes: np.ndarray | Sequence[float], size: tuple[int, int]) -> np.ndarray:
        """Validate (4,) or (B, 4) x0 y0 x1 y1 boxes against an (H, W) image; returns them as (B, 4)."""
        array = np.asarray(boxes, dtype=np.float64)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != 4:
            raise InputError(f"boxes must be (4,) or (B, 4) as x0 y0 x1 y1, got shape {array.shape}")
        if ((array[:, 2] <= array[:, 0]) | (array[:, 3] <= array[:, 1])).any():
            raise InputError("box is reversed or empty: need x0 < x1 and y0 < y1")
        self.check_points(array.reshape(-1, 2, 2), size, "box")
        return array

    def predict(
        self,
        *,
        point_coords: np.ndarray | Sequence[Sequence[float]] | None = None,
        point_labels: np.ndarray | Sequence[int] | None = None,
        boxes: np.ndarray | Sequence[float] | None = None,
        mask_input: torch.Tensor | np.ndarray | None = None,
        multimask_output: bool = False,
        embedding: ImageEmbedding | None = None,
    ) -> Prediction:
        """Prompt the cached (or given) embedding; coordinates are pixels of the original image.

        Args:
            point_coords: (N, 2) or (B, N, 2) x, y. point_labels: (N,) or (B, N); 1 fg, 0 bg.
            boxes: (4,) or (B, 4) x0, y0, x1, y1 — many boxes decode in one batch.
            mask_input: (B, 1, 256, 256) low-res logits from an earlier prediction.
            multimask_output: three candidate masks per prompt instead of one.
            embedding: use this embedding instead of the one from :meth:`set_image`.
        """
        emb = embedding or self.current
        size = emb.original_size
        profile = self.profile
        points_t = None
        if point_coords is not None:
            coords = np.asarray(point_coords, dtype=np.float64)
            if coords.ndim == 2:
                coords = coords[None]
            if coords.ndim != 3 or coords.shape[-1] != 2:
                raise InputError(f"points must be (N, 2) or (B, N, 2), got shape {coords.shape}")
            labels = np.ones(coords.shape[:2]) if point_labels is None else np.asarray(point_labels, float)
            if labels.size != coords.shape[0] * coords.shape[1]:
                raise InputError("point_labels must give one label per point")
            labels = labels.reshape(coords.shape[:2])
            self.check_points(coords, size, "point")
            points_t = (
                torch.as_tensor(
                    profile.coords_to_input(coords, size), dtype=torch.float32, device=self.device
                ),
                torch.as_tensor(labels, dtype=torch.float32, device=self.device),
            )
        boxes_t = None
        if boxes is not None:
            box_array = self.check_boxes(boxes, size)
            scaled = profile.boxes_to_input(box_array, size)
            boxes_t = torch.as_tensor(scaled, dtype=torch.float32, device=self.device)
        if points_t is not None and boxes_t is not None and points_t[0].shape[0] != boxes_t.shape[0]:
            if points_t[0].shape[0] != 1:
                raise InputError("give one point set per box, or one point set for all boxes")
            points_t = (
                points_t[0].expand(boxes_t.shape[0], -1, -1),
                points_t[1].expand(boxes_t.shape[0], -1),
            )
        mask_t = None
        if mask_input is not None:
            mask_t = torch.as_tensor(mask_input, dtype=torch.float32, device=self.device)
            if mask_t.ndim == 3:
                mask_t = mask_t[:, None]
        prompts = PromptBatch(
            points=points_t[0] if points_t is not None else None,
            point_labels=points_t[1] if points_t is not None else None,
            boxes=boxes_t,
            masks=mask_t,
        )
        if prompts.is_empty and self.model.prompt_generator is None:
            raise InputError("give a prompt: points, boxes or a mask (this model has no prompt generator)")
        with self._evaluating():
            logits, iou = self.model.decode_prompts(
                emb.encoder_output(), prompts, multimask_output=multimask_output
            )
            full = postprocess_logits(logits, profile, emb.resized_size, size)
        return Prediction(
            masks=(full > 0).cpu().numpy(),
            scores=iou.float().cpu().numpy(),
            low_res_logits=logits.float(),
        )
