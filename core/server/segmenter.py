"""The pieces a session is made of: the shared predictor, the cached slice segmenter, prompt checks.

:class:`SliceSegmenter` is :class:`~samadapt.domains.medical.propagation.VolumeSegmenter` (the code
behind ``samadapt segment VOLUME``) with its embeddings kept in the server's shared byte-bounded LRU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from samadapt.domains.medical.propagation import (
    AXES,
    Roi,
    SlicePrompt,
    VolumeSegmenter,
    plane_size,
    slice_count,
    slice_image,
)
from samadapt.errors import InputError
from samadapt.predictor import ImageEmbedding, Prediction, Predictor
from samadapt.server.cache import EmbeddingCache

__all__ = [
    "SharedPredictor",
    "SliceSegmenter",
    "check_box",
    "check_label",
    "check_plane",
    "check_points",
    "check_slice",
    "plane_slab",
]


class SharedPredictor:
    """A :class:`Predictor` seen through a lock: one call at a time on the one model copy."""

    def __init__(self, predictor: Predictor, lock: threading.Lock) -> None:
        self.inner = predictor
        self.lock = lock

    @property
    def profile(self) -> Any:
        return self.inner.profile

    @property
    def device(self) -> Any:
        return self.inner.device

    def embed(
        self, images: Sequence[np.ndarray], batch_size: int = 8, *, propagation: bool = False
    ) -> list[ImageEmbedding]:
        with self.lock:
            return self.inner.embed(images, batch_size=batch_size, propagation=propagation)

    def predict(self, **kwargs: Any) -> Prediction:
        with self.lock:
            return self.inner.predict(**kwargs)


class SliceSegmenter(VolumeSegmenter):
    """A VolumeSegmenter whose slice embeddings live in the server's shared LRU cache.

    Embedding order and batches are the CLI's (a miss embeds ``batch_size`` slices ahead in the
    direction of travel), so results match ``samadapt segment`` while the cache holds them.
    """

    def __init__(
        self,
        predictor: Any,
        image: np.ndarray,
        axis: str,
        *,
        cache: EmbeddingCache,
        key: tuple[str, str],
        batch_size: int,
    ) -> None:
        super().__init__(predictor, image, axis, batch_size=batch_size)
        self.shared = cache
        self.key = key
        self.on_slice: Callable[[], None] | None = None

    def embeddings(self, indexes: Iterable[int]) -> dict[int, ImageEmbedding]:  # type: ignore[override]
        """Embed the slices not cached yet, ``batch_size`` at a time; returns the new ones."""
        todo = [k for k in indexes if (*self.key, k) not in self.shared and 0 <= k < self.num_slices]
        done: dict[int, ImageEmbedding] = {}
        for first in range(0, len(todo), self.batch_size):
            chunk = todo[first : first + self.batch_size]
            images = [slice_image(self.image, self.axis, k) for k in chunk]
            embedded = self.predictor.embed(images, batch_size=self.batch_size, propagation=True)
            for k, emb in zip(chunk, embedded, strict=True):
                self.shared.put((*self.key, k), emb)
                done[k] = emb
        return done

    def embedding(self, index: int, direction: int = 1, stop: int | None = None) -> ImageEmbedding:
        hit = self.shared.get((*self.key, index))
        if hit is not None:
            return hit
        last = stop if stop is not None else (self.num_slices - 1 if direction > 0 else 0)
        ahead = list(range(index, last + direction, direction))[: self.batch_size]
        return self.embeddings(ahead)[index]

    @property
    def cached_slices(self) -> int:
        return sum(1 for k in range(self.num_slices) if (*self.key, k) in self.shared)

    def _decode_box(
        self, index: int, box: tuple[float, float, float, float], direction: int, stop: int
    ) -> Prediction:
        prediction = super()._decode_box(index, box, direction, stop)
        if self.on_slice is not None:
            self.on_slice()
        return prediction

    def first(self, prompt: SlicePrompt, roi: Roi | None) -> tuple[np.ndarray, float]:
        """The prompted slice's (rows, cols) bool mask and its predicted IoU (the CLI's first step)."""
        mask, report = self._first(prompt, roi)
        return mask, float(report.rows[0].score)


# ---------------------------------------------------------------------------------------------- checks


def check_label(label: Any) -> int:
    if isinstance(label, bool) or not isinstance(label, int | np.integer) or not 1 <= int(label) <= 255:
        raise InputError(f"label must be an integer 1..255, got {label!r}")
    return int(label)


def check_slice(slice_index: Any, shape: Sequence[int], axis: str) -> int:
    if axis not in AXES:
        raise InputError(f"unknown axis {axis!r}; choose from {', '.join(AXES)}")
    count = slice_count(shape, axis)
    if isinstance(slice_index, bool) or not isinstance(slice_index, int | np.integer):
        raise InputError(f"slice_index must be a whole slice index 0..{count - 1}, got {slice_index!r}")
    if not 0 <= int(slice_index) < count:
        raise InputError(
            f"slice_index {slice_index} is outside the volume ({count} {axis} slices, 0..{count - 1})"
        )
    return int(slice_index)


def check_box(values: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise InputError("a box is four numbers x0 y0 x1 y1") from exc
    if len(box) != 4 or not np.isfinite(box).all():
        raise InputError("a box is four finite numbers x0 y0 x1 y1")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise InputError("box is reversed or empty: need x0 < x1 and y0 < y1")
    return box  # type: ignore[return-value]


def check_points(
    points: Sequence[Sequence[float]] | None, labels: Sequence[int] | None
) -> list[tuple[float, float, int]]:
    if not points:
        if labels:
            raise InputError("point_labels given without points")
        return []
    values = list(labels) if labels is not None else [1] * len(points)
    if len(values) != len(points):
        raise InputError(f"give one point label per point ({len(points)}), got {len(values)}")
    out = []
    for point, value in zip(points, values, strict=True):
        try:
            x, y = (float(v) for v in point)
        except (TypeError, ValueError) as exc:
            raise InputError("a point is two numbers x y") from exc
        if value not in (0, 1):
            raise InputError("point labels are 1 (foreground) or 0 (background)")
        if not (np.isfinite(x) and np.isfinite(y)):
            raise InputError("points must be finite")
        out.append((x, y, int(value)))
    return out


def check_plane(
    boxes: list[tuple[float, float, float, float]],
    points: list[tuple[float, float, int]],
    shape: Sequence[int],
    axis: str,
) -> None:
    height, width = plane_size(shape, axis)
    corners = [(b[0], b[1]) for b in boxes] + [(b[2], b[3]) for b in boxes] + [(x, y) for x, y, _ in points]
    for x, y in corners:
        if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
            raise InputError(
                f"prompt ({x:g}, {y:g}) lies outside the {width}x{height} {axis} slice "
                f"(voxel indexes X 0..{width - 1}, Y 0..{height - 1})"
            )


def plane_slab(plane: np.ndarray, axis: str, index: int) -> tuple[tuple[int, int, int], np.ndarray]:
    """A (rows, cols) slice plane as a one-slice (I, J, K) block and its offset."""
    volume_axis = AXES[axis]
    block = np.expand_dims(plane.T, volume_axis)
    lower = [0, 0, 0]
    lower[volume_axis] = index
    return (lower[0], lower[1], lower[2]), block
