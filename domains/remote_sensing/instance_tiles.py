"""Per-tile instances from an instance adapter (RsPrompter) for ``samadapt geo segment --auto --adapter DIR``.

:class:`AdapterInstances` has the two things :func:`~samadapt.domains.remote_sensing.segment.segment_auto`
uses of the automatic mask generator: ``predictor`` (to embed the tiles, through the embedding cache) and
``generate(image, embedding)`` (one tile's masks as :class:`~samadapt.automatic.AutomaticMasks`). So an
adapter's instances are tiled, merged across tile borders, numbered and written exactly as the point grid's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samadapt.automatic import AutomaticMasks, MaskRecord
from samadapt.errors import InputError

__all__ = ["AdapterInstances", "instance_adapter"]


def instance_adapter(predictor: Any) -> Any | None:
    """The predictor's adapter when it predicts instances by itself (``predict_encoded``), else None."""
    adapter = getattr(predictor, "adapter", None)
    return adapter if callable(getattr(adapter, "predict_encoded", None)) else None


class AdapterInstances:
    """One tile's instances from ``adapter.predict_encoded`` (masks, scores, class labels).

    Args:
        predictor: a :class:`samadapt.predictor.Predictor` whose model has ``adapter`` attached.
        adapter: an instance adapter (``predict_encoded(model, encoded, size)``: per image ``masks`` (N, S, S)
            bool in the encoder frame, ``scores`` (N,), ``labels`` (N,) class indexes).
        min_area: masks with fewer pixels (tile frame) are dropped.
    """

    crop_n_layers = 0  # the tiles are the crops (what segment_auto checks of a generator)

    def __init__(self, predictor: Any, adapter: Any, min_area: int = 0) -> None:
        if not callable(getattr(adapter, "predict_encoded", None)):
            raise InputError(f"{type(adapter).__name__} does not predict instances by itself")
        self.predictor, self.adapter, self.min_area = predictor, adapter, int(min_area)

    def settings(self) -> dict[str, Any]:
        return {"adapter": getattr(self.adapter, "adapter_type", type(self.adapter).__name__)}

    @torch.inference_mode()
    def generate(self, image: np.ndarray, embedding: Any) -> AutomaticMasks:
        """Instances of one tile: image (h, w, 3) uint8, its ``ImageEmbedding`` -> masks (N, h, w) bool,
        largest first (``AutomaticMasks`` order); ``predicted_iou`` holds the adapter's score."""
        model = self.predictor.model
        size = int(model.profile.input_size)
        was_training = model.training
        model.eval()
        try:
            found = self.adapter.predict_encoded(model, embedding.encoder_output(), size)[0]
        finally:
            model.train(was_training)
        height, width = embedding.original_size
        rh, rw = embedding.resized_size
        masks = found["masks"][:, :rh, :rw].float()  # (N, h', w'): the image inside the padded frame
        if masks.shape[0]:
            masks = F.interpolate(masks[:, None], size=(height, width), mode="nearest")[:, 0]
        masks = masks.bool().cpu()
        areas = masks.flatten(1).sum(1)
        keep = torch.nonzero(areas >= max(self.min_area, 1)).flatten()
        order = keep[torch.argsort(areas[keep], descending=True, stable=True)]
        records = []
        for label, n in enumerate(order.tolist(), start=1):
            rows = torch.nonzero(masks[n].any(1)).flatten()
            cols = torch.nonzero(masks[n].any(0)).flatten()
            x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])
            records.append(
                MaskRecord(
                    label=label,
                    area=int(areas[n]),
                    bbox=[x0, y0, x1 - x0, y1 - y0],
                    predicted_iou=float(found["scores"][n]),
                    stability_score=1.0,  # no stability score here (written as 1.0 in the outputs)
                    point=[],
                    crop_box=[0, 0, width, height],
                )
            )
        settings = {**self.settings(), "classes": [int(found["labels"][n]) for n in order.tolist()]}
        return AutomaticMasks(masks[order], records, (height, width), decoder_calls=1, settings=settings)
