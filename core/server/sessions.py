"""Interactive sessions: one uploaded volume, its label mask, prompts, propagation, undo and redo.

The engine behind ``samadapt serve`` (and the MONAI Label facade). Segmentation goes through the same
code as ``samadapt segment VOLUME`` (:class:`~samadapt.domains.medical.propagation.VolumeSegmenter`
with the CLI's intensity preset, batch size, stop rule and embedding order), so a box on a slice
followed by ``propagate("both")`` gives exactly the CLI's mask for the same prompt.

Threads: one model copy is shared by every session; each predictor call (a batch of slice embeddings,
or one decoder call) holds the store's model lock, so calls of different sessions interleave slice by
slice. Each session has its own re-entrant lock, taken by every method that changes it.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from samadapt.domains.medical import Volume, apply_intensity, guess_preset
from samadapt.domains.medical.propagation import (
    AXES,
    Roi,
    SlicePrompt,
    put_slice,
    slice_count,
    slice_image,
)
from samadapt.domains.medical.stopping import PropagationReport, StopRule
from samadapt.errors import InputError
from samadapt.predictor import Predictor
from samadapt.server.cache import EmbeddingCache
from samadapt.server.regions import changed_box, encode_region
from samadapt.server.segmenter import (
    SharedPredictor,
    SliceSegmenter,
    check_box,
    check_label,
    check_plane,
    check_points,
    check_slice,
    plane_slab,
)

__all__ = ["DIRECTIONS", "Session", "SessionNotFound", "SessionStore", "StoreFull", "valid_session_id"]

_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
#: Propagation directions: ``up`` = towards higher slice indexes along the axis.
DIRECTIONS = {"up": (1,), "down": (-1,), "both": (1, -1)}
_UNDO_DEPTH = 64


class SessionNotFound(KeyError):
    """No session with this id (unknown, expired, deleted, or not a well-formed id)."""


class StoreFull(RuntimeError):
    """The server holds its maximum number of sessions."""


def valid_session_id(session_id: str) -> bool:
    return isinstance(session_id, str) and _ID.fullmatch(session_id) is not None


@dataclass
class _Anchor:
    """Where a label's propagation starts: the last prompted slice, its mask and score."""

    axis: str
    index: int
    mask: np.ndarray  # (rows, cols) bool
    score: float | None
    roi: Roi | None


@dataclass
class _Change:
    """One undoable change: the box's voxels before and after, and the anchors before and after."""

    offset: tuple[int, ...]
    before: np.ndarray
    after: np.ndarray
    label: int
    anchors_before: dict[int, _Anchor]
    anchors_after: dict[int, _Anchor]


class Session:
    """One uploaded volume and its label mask.

    Attributes:
        session_id: the opaque id.
        volume: the uploaded volume (array (I, J, K) + RAS affine), never modified.
        image: (I, J, K) float32 in [0, 1] after the intensity preset (the CLI's ``apply_intensity``).
        mask: (I, J, K) uint8 label map on the volume's grid.
        preset: the intensity preset used (or ``window L W``).
        lock: re-entrant; every method below takes it.
        progress: the last/current propagation: ``state`` (idle, running, done, failed), ``done`` and
            ``total`` slices, ``direction``, ``label``; read without the lock.
        created, last_access: epoch seconds.
    """

    def __init__(
        self,
        session_id: str,
        volume: Volume,
        predictor: Any,
        cache: EmbeddingCache,
        *,
        preset: str | None = None,
        window: tuple[float, float] | None = None,
        batch_size: int = 2,
    ) -> None:
        if preset is not None and window is not None:
            raise InputError("give either a preset or a window, not both")
        self.session_id = session_id
        self.volume = volume
        self.preset = None if window else (preset or guess_preset(volume))
        self.image = apply_intensity(volume.array, preset=self.preset, window=window)
        self.mask = np.zeros(volume.shape, dtype=np.uint8)
        self.lock = threading.RLock()
        self.progress: dict[str, Any] = {"state": "idle", "done": 0, "total": 0}
        self.created = self.last_access = time.time()
        self._predictor = predictor
        self._cache = cache
        self._batch_size = batch_size
        self._segmenters: dict[str, SliceSegmenter] = {}
        self._anchors: dict[int, _Anchor] = {}
        self._undo: list[_Change] = []
        self._redo: list[_Change] = []
        self.window = window

    # ------------------------------------------------------------------ helpers
    def segmenter(self, axis: str) -> SliceSegmenter:
        if axis not in AXES:
            raise InputError(f"unknown axis {axis!r}; choose from {', '.join(AXES)}")
        if axis not in self._segmenters:
            self._segmenters[axis] = SliceSegmenter(
                self._predictor,
                self.image,
                axis,
                cache=self._cache,
                key=(self.session_id, axis),
                batch_size=self._batch_size,
            )
        return self._segmenters[axis]

    @property
    def undo_depth(self) -> int:
        return len(self._undo)

    @property
    def redo_depth(self) -> int:
        return len(self._redo)

    def info(self) -> dict[str, Any]:
        """JSON-able description (no lock: safe to call while a propagation runs)."""
        return {
            "session_id": self.session_id,
            "shape": list(self.volume.shape),
            "dtype": str(self.volume.array.dtype),
            "affine": self.volume.affine.tolist(),
            "spacing": list(self.volume.spacing),
            "preset": self.preset or f"window {self.window}",
            "undo_depth": self.undo_depth,
            "redo_depth": self.redo_depth,
            "labels": sorted(int(v) for v in self._anchors),
            "progress": dict(self.progress),
            "created": self.created,
            "last_access": self.last_access,
        }

    def _commit(
        self, lower: Sequence[int], after: np.ndarray, label: int, anchors: dict[int, _Anchor]
    ) -> dict[str, Any]:
        """Write ``after`` at ``lower`` and set the anchors, as one undoable change; returns its region."""
        index = tuple(slice(lo, lo + n) for lo, n in zip(lower, after.shape, strict=True))
        before = self.mask[index]
        box = changed_box(before, after)
        anchors_before, self._anchors = self._anchors, dict(anchors)
        if box is None:
            return self._region(None, (0, 0, 0), label)
        lo, hi = box
        tight = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        offset = tuple(int(a) + int(b) for a, b in zip(lower, lo, strict=True))
        change = _Change(
            offset, before[tight].copy(), after[tight].copy(), label, anchors_before, dict(anchors)
        )
        self.mask[index] = after
        self._undo.append(change)
        del self._undo[:-_UNDO_DEPTH]
        self._redo.clear()
        return self._region(change.after, offset, label)

    def _region(self, block: np.ndarray | None, offset: Sequence[int], label: int) -> dict[str, Any]:
        region = encode_region(block, offset, label)
        region.update(undo_depth=self.undo_depth, redo_depth=self.redo_depth)
        return region

    # ------------------------------------------------------------------ operations
    def prompt(
        self,
        *,
        axis: str,
        slice_index: int | None,
        boxes: Sequence[Sequence[float]] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
        label: int = 1,
        roi: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """Segment one slice; the label's voxels on that slice are replaced by the new mask.

        Voxels of other labels are kept (a new mask never overwrites them). Boxes are (x0, y0, x1, y1)
        and points (x, y) in the slice's X/Y (see :mod:`samadapt.domains.medical.propagation`);
        several boxes are united. ``roi`` (i0, j0, k0, i1, j1, k1) cuts the mask to its rectangle,
        limits later propagation, and without boxes or points prompts with its own rectangle.

        Returns:
            The changed region, plus ``slice_index`` and ``score`` (predicted IoU).
        """
        with self.lock:
            self.last_access = time.time()
            label = check_label(label)
            segmenter = self.segmenter(axis)
            box_list = [check_box(b) for b in (boxes or [])]
            point_list = check_points(points, point_labels)
            region_roi = None
            if roi is not None:
                values = [float(v) for v in roi]
                if len(values) != 6:
                    raise InputError("roi needs six numbers: i0 j0 k0 i1 j1 k1")
                region_roi = Roi.from_values(values, self.volume.shape)
                if slice_index is None:
                    low, high = region_roi.slice_range(axis)
                    slice_index = (low + high) // 2
                if not box_list and not point_list:
                    box_list = [region_roi.plane_box(axis)]
            index = check_slice(slice_index, self.volume.shape, axis)
            if not box_list and not point_list:
                raise InputError("give a prompt: boxes and/or points on the slice (or a 3D roi)")
            check_plane(box_list, point_list, self.volume.shape, axis)
            mask2d: np.ndarray | None = None
            score: float | None = None
            for n, box in enumerate(box_list or [None]):
                prompt = SlicePrompt(index, box, point_list if n == 0 else [], label)
                first, first_score = segmenter.first(prompt, region_roi)
                mask2d = first if mask2d is None else (mask2d | first)
                score = first_score if score is None else score
            assert mask2d is not None
            plane = self._plane_after(axis, index, label, mask2d)
            lower, after = plane_slab(plane, axis, index)
            anchors = {**self._anchors, label: _Anchor(axis, index, mask2d, score, region_roi)}
            region = self._commit(lower, after, label, anchors)
            region.update(slice_index=index, axis=axis, score=score)
            return region

    def _plane_after(self, axis: str, index: int, label: int, mask2d: np.ndarray) -> np.ndarray:
        """(rows, cols) label plane of slice ``index`` with ``label`` replaced by ``mask2d``."""
        plane = slice_image(self.mask, axis, index).copy()
        plane[plane == label] = 0
        plane[mask2d & (plane == 0)] = label
        return plane

    def propagate(
        self,
        *,
        direction: str = "both",
        label: int = 1,
        axis: str | None = None,
        slice_index: int | None = None,
        stop: str | None = None,
        max_slices: int | None = None,
        progress: Callable[[dict[str, Any]], object] | None = None,
    ) -> dict[str, Any]:
        """Propagate a label from its last prompted slice (or ``slice_index``'s current mask).

        The label's voxels beyond the start slice in each direction are replaced by the propagated
        masks, exactly as ``samadapt segment`` builds them (``up`` = higher slice indexes).

        Returns:
            The changed region, plus ``slices`` (kept per direction) and ``ends`` (why each stopped).
        """
        if direction not in DIRECTIONS:
            raise InputError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        with self.lock:
            self.last_access = time.time()
            label = check_label(label)
            anchor = self._anchors.get(label)
            if slice_index is not None or anchor is None:
                if slice_index is None:
                    raise InputError(f"label {label} has no prompt yet; prompt a slice or give slice_index")
                start_axis = axis or (anchor.axis if anchor else "axial")
                index = check_slice(slice_index, self.volume.shape, start_axis)
                start = slice_image(self.mask, start_axis, index) == label
                anchor = _Anchor(start_axis, index, start, None, None)
            segmenter = self.segmenter(anchor.axis)
            rule = StopRule.named(stop or "auto")
            segmenter.stop = rule.with_max_slices(max_slices) if max_slices is not None else rule
            count = slice_count(self.volume.shape, anchor.axis)
            total = sum(count - 1 - anchor.index if d > 0 else anchor.index for d in DIRECTIONS[direction])
            self.progress = {
                "state": "running",
                "done": 0,
                "total": int(total),
                "direction": direction,
                "label": label,
                "axis": anchor.axis,
                "start": anchor.index,
            }

            def tick() -> None:
                self.progress["done"] = self.progress["done"] + 1
                if progress is not None:
                    progress(dict(self.progress))

            segmenter.on_slice = tick
            volume_axis = AXES[anchor.axis]
            new = self.mask.copy()
            kept: dict[str, int] = {}
            ends: dict[str, str] = {}
            try:
                report = PropagationReport(
                    anchor.axis, anchor.index, segmenter.stop.thresholds(), label=label
                )
                for d in DIRECTIONS[direction]:
                    name = "up" if d > 0 else "down"
                    beyond: list[slice] = [slice(None)] * 3
                    beyond[volume_axis] = slice(anchor.index + 1, None) if d > 0 else slice(0, anchor.index)
                    part = new[tuple(beyond)]
                    part[part == label] = 0
                    masks = segmenter.propagate(
                        anchor.mask, anchor.index, d, anchor.roi, report=report, start_score=anchor.score
                    )
                    for k, mask2d in masks.items():
                        plane = slice_image(new, anchor.axis, k).copy()
                        plane[mask2d & (plane == 0)] = label
                        put_slice(new, anchor.axis, k, plane)
                    kept[name] = len(masks)
                    ends[name] = report.ends.get(d, "")
            except Exception:
                self.progress["state"] = "failed"
                raise
            finally:
                segmenter.on_slice = None
            region = self._commit((0, 0, 0), new, label, {**self._anchors, label: anchor})
            self.progress["state"] = "done"
            region.update(slices=kept, ends=ends, axis=anchor.axis, start=anchor.index)
            return region

    def undo(self) -> dict[str, Any]:
        """Restore the mask before the last change; returns that box's restored voxels."""
        with self.lock:
            self.last_access = time.time()
            if not self._undo:
                return self._region(None, (0, 0, 0), 0)
            change = self._undo.pop()
            self._write(change.offset, change.before)
            self._anchors = dict(change.anchors_before)
            self._redo.append(change)
            return self._region(change.before, change.offset, change.label)

    def redo(self) -> dict[str, Any]:
        """Re-apply the last undone change; returns its box's voxels."""
        with self.lock:
            self.last_access = time.time()
            if not self._redo:
                return self._region(None, (0, 0, 0), 0)
            change = self._redo.pop()
            self._write(change.offset, change.after)
            self._anchors = dict(change.anchors_after)
            self._undo.append(change)
            return self._region(change.after, change.offset, change.label)

    def seed(self, mask: np.ndarray, offset: Sequence[int] = (0, 0, 0)) -> dict[str, Any]:
        """Replace the mask (or the box at ``offset``) with an existing uint8 label block; undoable.

        Propagation anchors are dropped: after seeding, ``propagate`` needs ``slice_index``.
        """
        with self.lock:
            self.last_access = time.time()
            block = np.asarray(mask)
            if block.ndim != 3:
                raise InputError(f"a seed must be a 3D label array, got shape {block.shape}")
            if any(
                o < 0 or o + n > g for o, n, g in zip(offset, block.shape, self.volume.shape, strict=True)
            ):
                raise InputError(
                    f"seed of shape {block.shape} at {list(offset)} does not fit {self.volume.shape}"
                )
            if block.dtype != np.uint8:
                if block.size and (block.min() < 0 or block.max() > 255):
                    raise InputError("seed labels must be 0..255")
                block = block.astype(np.uint8)
            return self._commit(offset, block, 0, {})

    def _write(self, offset: Sequence[int], block: np.ndarray) -> None:
        index = tuple(slice(o, o + n) for o, n in zip(offset, block.shape, strict=True))
        self.mask[index] = block


# ---------------------------------------------------------------------------------------------- store


class SessionStore:
    """The sessions of one server, the one model copy, and the shared embedding cache.

    Args:
        predictor: the loaded :class:`Predictor` (one model copy for every session).
        cache_bytes: bound of the slice-embedding LRU shared by all sessions.
        session_ttl_s: idle seconds after which a session is deleted (``expiry_s``).
        max_sessions: most sessions at once (``create`` raises :class:`StoreFull` beyond).
        batch_size: slices embedded per encoder call (default: the CLI's, 8 on CUDA else 2).
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        cache_bytes: int = 1 << 30,
        session_ttl_s: float = 1800.0,
        max_sessions: int = 32,
        batch_size: int | None = None,
    ) -> None:
        self.predictor = predictor
        self.model_lock = threading.Lock()
        self.shared = SharedPredictor(predictor, self.model_lock)
        self.cache = EmbeddingCache(cache_bytes)
        self.expiry_s = float(session_ttl_s)
        self.max_sessions = int(max_sessions)
        self.batch_size = batch_size or (8 if predictor.device.type == "cuda" else 2)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def create(
        self, volume: Volume, *, preset: str | None = None, window: tuple[float, float] | None = None
    ) -> str:
        """Add a session for ``volume``; returns its opaque id (``secrets.token_urlsafe(16)``)."""
        self.expire()
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise StoreFull(f"the server holds its maximum of {self.max_sessions} sessions; close one")
        session_id = secrets.token_urlsafe(16)
        session = Session(
            session_id,
            volume,
            self.shared,
            self.cache,
            preset=preset,
            window=window,
            batch_size=self.batch_size,
        )
        with self._lock:
            self._sessions[session_id] = session
        return session_id

    def get(self, session_id: str) -> Session:
        """The session (its ``last_access`` refreshed).

        Raises:
            SessionNotFound: malformed, unknown, expired or deleted id.
        """
        if not valid_session_id(session_id):
            raise SessionNotFound("session not found (malformed id)")
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound("session not found (unknown, expired or deleted)")
        session.last_access = time.time()
        return session

    def delete(self, session_id: str) -> None:
        """Remove a session and its cached embeddings (SessionNotFound if there is none)."""
        if not valid_session_id(session_id):
            raise SessionNotFound("session not found (malformed id)")
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound("session not found (unknown, expired or deleted)")
        self.cache.drop(session_id)

    def expire(self, now: float | None = None) -> list[str]:
        """Delete sessions idle for longer than ``expiry_s`` (a busy session is never expired)."""
        now = time.time() if now is None else now
        with self._lock:
            idle = [s for s in self._sessions.values() if now - s.last_access > self.expiry_s]
        removed = []
        for session in idle:
            if not session.lock.acquire(blocking=False):
                continue
            try:
                with self._lock:
                    if self._sessions.get(session.session_id) is session:
                        del self._sessions[session.session_id]
                        removed.append(session.session_id)
            finally:
                session.lock.release()
            self.cache.drop(session.session_id)
        return removed
