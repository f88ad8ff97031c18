"""Slice-by-slice propagation of a 2D prompt through a volume (LiteMedSAM's 3D inference, faster).

The prompted slice is segmented from the user's box/points; every next slice, up and down, is
prompted by the previous slice's mask box plus a small margin, until the stop rule says the object
has ended (:mod:`~samadapt.domains.medical.stopping`: by default from the predicted IoU, the mask's
contact with its box and its overlap with the previous slice's mask), the mask vanishes, it leaves
the 3D region of interest, or a cap on the slices per direction is reached. Slices are
embedded in batches ahead of the front (bf16 where supported) and each embedding is computed once
and cached, so re-prompting a slice re-runs only the cheap decoder from there on.

Coordinates follow the IJK convention of NIfTI, ITK and 3D Slicer. A slice is shown as a 2D image
whose X is the first in-plane voxel axis and Y the second: axial (slice k): X = i, Y = j;
coronal (slice j): X = i, Y = k; sagittal (slice i): X = j, Y = k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from samadapt.domains.medical.stopping import PropagationReport, SliceSignals, StopRule, measure
from samadapt.errors import InputError
from samadapt.predictor import ImageEmbedding, Prediction, Predictor

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def slice_image(array: np.ndarray, axis: str, index: int) -> np.ndarray:
    """The 2D image of one slice, rows = Y and columns = X (see the module docstring)."""
    return np.take(array, index, axis=AXES[axis]).T


def slice_count(shape: Sequence[int], axis: str) -> int:
    return int(shape[AXES[axis]])


def plane_size(shape: Sequence[int], axis: str) -> tuple[int, int]:
    """(height, width) = (rows, columns) of a slice image."""
    in_plane = [n for a, n in enumerate(shape) if a != AXES[axis]]
    return (int(in_plane[1]), int(in_plane[0]))


def put_slice(volume: np.ndarray, axis: str, index: int, mask2d: np.ndarray) -> None:
    """Write a (rows, cols) slice mask back into an (I, J, K) array in place."""
    index_tuple: list[slice | int] = [slice(None)] * 3
    index_tuple[AXES[axis]] = index
    volume[tuple(index_tuple)] = mask2d.T


@dataclass
class SlicePrompt:
    """A prompt on one slice, in that slice's X/Y pixel coordinates.

    Attributes:
        slice_index: index along the propagation axis.
        box: (x0, y0, x1, y1) or None.
        points: (x, y, label) with label 1 = foreground, 0 = background.
        label: value written into the label map for this object.
    """

    slice_index: int
    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float, int]] = field(default_factory=list)
    label: int = 1


@dataclass
class Roi:
    """A 3D box (inclusive voxel bounds) that limits propagation: (i0, j0, k0, i1, j1, k1)."""

    lower: tuple[int, int, int]
    upper: tuple[int, int, int]

    @classmethod
    def from_values(cls, values: Sequence[float], shape: Sequence[int]) -> Roi:
        if len(values) != 6:
            raise InputError("--roi needs six numbers: I0 J0 K0 I1 J1 K1")
        lower = tuple(int(np.floor(min(values[a], values[a + 3]))) for a in range(3))
        upper = tuple(int(np.ceil(max(values[a], values[a + 3]))) for a in range(3))
        if any(lo > n - 1 or hi < 0 for lo, hi, n in zip(lower, upper, shape, strict=True)):
            raise InputError(f"--roi {list(values)} lies outside the volume of shape {tuple(shape)}")
        lower = tuple(max(lo, 0) for lo in lower)
        upper = tuple(min(hi, n - 1) for hi, n in zip(upper, shape, strict=True))
        return cls(lower, upper)  # type: ignore[arg-type]

    def slice_range(self, axis: str) -> tuple[int, int]:
        a = AXES[axis]
        return self.lower[a], self.upper[a]

    def plane_box(self, axis: str) -> tuple[float, float, float, float]:
        """The ROI's in-plane rectangle as an (x0, y0, x1, y1) slice box."""
        in_plane = [a for a in range(3) if a != AXES[axis]]
        x_axis, y_axis = in_plane
        return (
            float(self.lower[x_axis]),
            float(self.lower[y_axis]),
            float(self.upper[x_axis]),
            float(self.upper[y_axis]),
        )


def mask_box(mask: np.ndarray, margin: float) -> tuple[float, float, float, float] | None:
    """Tight (x0, y0, x1, y1) of a 2D mask grown by ``margin`` pixels and clipped to the image."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    height, width = mask.shape
    return (
        max(float(cols[0]) - margin, 0.0),
        max(float(rows[0]) - margin, 0.0),
        min(float(cols[-1]) + margin, float(width - 1)),
        min(float(rows[-1]) + margin, float(height - 1)),
    )


def clip_box(
    box: tuple[float, float, float, float], limit: tuple[float, float, float, float]
) -> tuple[float, float, float, float] | None:
    """Intersection of two boxes, or None if it is empty."""
    x0, y0 = max(box[0], limit[0]), max(box[1], limit[1])
    x1, y1 = min(box[2], limit[2]), min(box[3], limit[3])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


class VolumeSegmenter:
    """Propagates 2D prompts through one volume with a shared embedding cache.

    Args:
        predictor: a :class:`Predictor` (its precision applies to the slice encoder).
        image: (I, J, K) float array already mapped to [0, 1] by an intensity preset.
        axis: ``axial`` (slices along k), ``coronal`` (j) or ``sagittal`` (i).
        batch_size: slices embedded per encoder call.
        margin: box margin in encoder-frame pixels (LiteMedSAM's reference uses 3 at 256).
        progress: called with the number of slices just embedded (e.g. a tqdm ``update``).
        stop: when an object ends: a :class:`StopRule`, or ``auto`` (default rule) or ``vanish`` (run
            until the mask is empty, the behaviour before stop rules).
        max_slices: most slices propagated in each direction (None: no cap); overrides ``stop``'s.

    After :meth:`segment` or :meth:`reprompt`, :attr:`last_report` holds the per-slice signals of
    that object's propagation (:class:`PropagationReport`).
    """

    def __init__(
        self,
        predictor: Predictor,
        image: np.ndarray,
        axis: str = "axial",
        *,
        batch_size: int = 8,
        margin: float = 3.0,
        progress: Callable[[int], object] | None = None,
        stop: StopRule | str = "auto",
        max_slices: int | None = None,
    ) -> None:
        if axis not in AXES:
            raise InputError(f"unknown axis {axis!r}; choose from {', '.join(AXES)}")
        if image.ndim != 3:
            raise InputError(f"expected a 3D volume, got shape {image.shape}")
        self.predictor = predictor
        self.image = image
        self.axis = axis
        self.batch_size = max(1, int(batch_size))
        self.num_slices = slice_count(image.shape, axis)
        self.plane = plane_size(image.shape, axis)
        self.margin = margin * max(self.plane) / predictor.profile.input_size
        self.progress = progress
        rule = StopRule.named(stop) if isinstance(stop, str) else stop
        self.stop = rule.with_max_slices(max_slices) if max_slices is not None else rule
        self.last_report: PropagationReport | None = None
        self._cache: dict[int, ImageEmbedding] = {}

    # ------------------------------------------------------------------ embeddings
    def embeddings(self, indexes: Iterable[int]) -> None:
        """Embed the given slices that are not cached yet, ``batch_size`` at a time."""
        todo = [k for k in indexes if k not in self._cache and 0 <= k < self.num_slices]
        for first in range(0, len(todo), self.batch_size):
            chunk = todo[first : first + self.batch_size]
            images = [slice_image(self.image, self.axis, k) for k in chunk]
            embedded = self.predictor.embed(images, batch_size=self.batch_size, propagation=True)
            for k, emb in zip(chunk, embedded, strict=True):
                self._cache[k] = emb
            if self.progress is not None:
                self.progress(len(chunk))

    def embedding(self, index: int, direction: int = 1, stop: int | None = None) -> ImageEmbedding:
        """Embedding of one slice; on a miss, embed a batch ahead in ``direction`` up to ``stop``."""
        if index not in self._cache:
            last = stop if stop is not None else (self.num_slices - 1 if direction > 0 else 0)
            ahead = range(index, last + direction, direction)
            self.embeddings(list(ahead)[: self.batch_size])
        return self._cache[index]

    @property
    def cached_slices(self) -> int:
        return len(self._cache)

    # ------------------------------------------------------------------ decoding
    def _check_prompt(self, prompt: SlicePrompt) -> None:
        if not 0 <= prompt.slice_index < self.num_slices:
            raise InputError(
                f"slice {prompt.slice_index} is outside the volume ({self.num_slices} {self.axis} slices)"
            )
        if prompt.box is None and not prompt.points:
            raise InputError("give a box or at least one point on the prompted slice")

    def segment_slice(self, prompt: SlicePrompt) -> np.ndarray:
        """(rows, cols) bool mask of the prompted slice."""
        return self._prompted(prompt).masks[0, 0]

    def _prompted(self, prompt: SlicePrompt) -> Prediction:
        self._check_prompt(prompt)
        emb = self.embedding(prompt.slice_index)
        coords = np.array([[x, y] for x, y, _ in prompt.points]) if prompt.points else None
        labels = np.array([lab for _, _, lab in prompt.points]) if prompt.points else None
        return self.predictor.predict(
            point_coords=coords, point_labels=labels, boxes=prompt.box, embedding=emb
        )

    def _decode_box(
        self, index: int, box: tuple[float, float, float, float], direction: int, stop: int
    ) -> Prediction:
        emb = self.embedding(index, direction, stop)
        return self.predictor.predict(boxes=box, embedding=emb)

    def _first(self, prompt: SlicePrompt, roi: Roi | None) -> tuple[np.ndarray, PropagationReport]:
        """The prompted slice's mask (cut to the ROI's rectangle) and a report holding its row."""
        prediction = self._prompted(prompt)
        first = prediction.masks[0, 0]
        if roi is not None:
            first = first & _plane_mask(self.plane, roi.plane_box(self.axis))
        report = PropagationReport(self.axis, prompt.slice_index, self.stop.thresholds(), label=prompt.label)
        limit = roi.plane_box(self.axis) if roi is not None else None
        row = _signals(prompt.slice_index, 0, first, None, prompt.box, prediction, None, limit)
        if not first.any():
            row.kept, row.reason = False, "vanished"
        report.rows.append(row)
        self.last_report = report
        return first, report

    def propagate(
        self,
        start_mask: np.ndarray,
        start: int,
        direction: int,
        roi: Roi | None = None,
        out: np.ndarray | None = None,
        report: PropagationReport | None = None,
        start_score: float | None = None,
    ) -> dict[int, np.ndarray]:
        """Propagate from slice ``start`` (whose mask is given) one way until the object ends.

        It ends where the stop rule (:attr:`stop`) rejects a slice's mask, the mask vanishes, the
        ROI or the volume ends, or after ``max_slices`` slices.

        Args:
            report: if given, every visited slice's signals are appended to its rows and the reason
                propagation ended is recorded in its ``ends``.
            start_score: the predicted IoU of the start slice's mask, the first reference of the
                score ratio (None: the report's first row if it has one, else the first propagated
                slice's own score).

        Returns:
            {slice index: (rows, cols) bool mask} for the slices it kept (``start`` excluded).
        """
        low, high = roi.slice_range(self.axis) if roi else (0, self.num_slices - 1)
        limit = roi.plane_box(self.axis) if roi else None
        stop = high if direction > 0 else low
        masks: dict[int, np.ndarray] = {}
        previous = start_mask
        index = start + direction
        cap = self.stop.max_slices
        if start_score is None and report is not None and report.rows:
            start_score = report.rows[0].score
        best = start_score
        ended = ""
        while low <= index <= high:
            if cap is not None and len(masks) >= cap:
                ended = f"max-slices {cap}"
                break
            box = mask_box(previous, self.margin)
            if box is not None and limit is not None:
                box = clip_box(box, limit)
            if box is None:
                ended = "vanished"
                break
            prediction = self._decode_box(index, box, direction, stop)
            mask = prediction.masks[0, 0]
            if limit is not None:
                mask = mask & _plane_mask(self.plane, limit)
            signals = _signals(index, direction, mask, previous, box, prediction, best, limit)
            reason = self.stop.reason(signals)
            if report is not None:
                report.rows.append(signals)
            if reason:
                signals.kept, signals.reason, ended = False, reason, reason
                break
            masks[index] = mask
            previous = mask
            best = signals.score if best is None else max(best, signals.score)
            index += direction
        if not ended:  # left the slice range: the ROI's end if the volume goes on, else the volume's
            ended = "roi edge" if 0 <= index < self.num_slices else "volume edge"
        if report is not None:
            report.ends[direction] = ended
        return masks

    def segment(self, prompt: SlicePrompt, roi: Roi | None = None) -> np.ndarray:
        """Segment one object: the prompted slice, then propagation both ways. (I, J, K) bool."""
        self._check_prompt(prompt)
        if roi is not None:
            low, high = roi.slice_range(self.axis)
            if not low <= prompt.slice_index <= high:
                raise InputError(f"slice {prompt.slice_index} is outside --roi (slices {low}..{high})")
        result = np.zeros(self.image.shape, dtype=bool)
        first, report = self._first(prompt, roi)
        put_slice(result, self.axis, prompt.slice_index, first)
        if not first.any():
            report.ends = {1: "vanished", -1: "vanished"}
            return result
        for direction in (1, -1):
            for index, mask in self.propagate(
                first, prompt.slice_index, direction, roi, report=report
            ).items():
                put_slice(result, self.axis, index, mask)
        return result

    def reprompt(
        self, current: np.ndarray, prompt: SlicePrompt, direction: int, roi: Roi | None = None
    ) -> np.ndarray:
        """Correct one slice and re-propagate from there in ``direction`` only (+1 or -1).

        Slices on the other side of the corrected slice keep their masks; slices beyond it in
        ``direction`` are replaced. Cached embeddings are reused, so only the decoder runs again.
        """
        if direction not in (1, -1):
            raise InputError("direction must be +1 (towards higher slice indexes) or -1")
        result = current.copy()
        first, report = self._first(prompt, None)
        axis = AXES[self.axis]
        index_tuple: list[slice] = [slice(None)] * 3
        if direction > 0:
            index_tuple[axis] = slice(prompt.slice_index, None)
        else:
            index_tuple[axis] = slice(None, prompt.slice_index + 1)
        result[tuple(index_tuple)] = False
        put_slice(result, self.axis, prompt.slice_index, first)
        if not first.any():
            report.ends = {direction: "vanished"}
        else:
            for index, mask in self.propagate(
                first, prompt.slice_index, direction, roi, report=report
            ).items():
                put_slice(result, self.axis, index, mask)
        return result


def _signals(
    index: int,
    direction: int,
    mask: np.ndarray,
    previous: np.ndarray | None,
    box: tuple[float, float, float, float] | None,
    prediction: Prediction,
    best_score: float | None = None,
    limit: tuple[float, float, float, float] | None = None,
) -> SliceSignals:
    logits = prediction.low_res_logits
    low_res = logits[0, 0].detach().cpu().numpy() if logits is not None and logits.ndim == 4 else None
    score = float(prediction.scores[0, 0])
    return measure(index, direction, mask, previous, box, score, low_res, best_score, limit)


def _plane_mask(plane: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """(rows, cols) bool mask of the pixels inside an inclusive (x0, y0, x1, y1) box."""
    mask = np.zeros(plane, dtype=bool)
    x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def combine_labels(masks: Sequence[tuple[int, np.ndarray]], shape: Sequence[int]) -> np.ndarray:
    """Label map from (label, (I, J, K) bool) pairs; an earlier object keeps contested voxels."""
    labels = np.zeros(
        tuple(shape), dtype=np.uint16 if max((v for v, _ in masks), default=0) > 255 else np.uint8
    )
    for value, mask in masks:
        labels[mask & (labels == 0)] = value
    return labels
