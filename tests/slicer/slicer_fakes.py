"""FakeClient: a stand-in for the samadapt server and its HTTP client, which cannot run inside Slicer in
these tests. It records every call and answers with changed regions computed from a simple rule (a box
prompt fills the box on its slice), so SamAdaptLib's logic is tested without HTTP or a model."""

from __future__ import annotations

from typing import Any

import numpy as np
from SamAdaptLib.regions import encode_region

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def changed_region(before: np.ndarray, after: np.ndarray, label: int) -> dict[str, Any]:
    """The region dict of what changed between two (I, J, K) label maps (the server's rule)."""
    diff = np.argwhere(before != after)
    if diff.size == 0:
        return encode_region((0, 0, 0), np.zeros((0, 0, 0), np.uint8), label)
    lo, hi = diff.min(axis=0), diff.max(axis=0) + 1
    index = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return encode_region(lo.tolist(), after[index], label)


class FakeClient:
    """Stand-in for ``SamAdaptLib.client.SamAdaptClient`` and the server behind it (no HTTP, no model).

    A box prompt sets the box (rounded, inclusive) on its slice to ``label`` after clearing that label
    on the slice; propagate copies the prompted slice's mask to every slice in the direction; undo/redo
    restore whole label maps. Every call is recorded in ``calls`` as ``(name, kwargs)``.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.mask: np.ndarray | None = None
        self.undo_stack: list[np.ndarray] = []
        self.redo_stack: list[np.ndarray] = []
        self.last: dict[int, tuple[str, int]] = {}

    def create_session_from_array(self, array: np.ndarray, **kwargs: Any) -> str:
        self.calls.append(("create_session_from_array", {"shape": array.shape, **kwargs}))
        shape = array.shape[::-1] if kwargs.get("order") == "kji" else array.shape
        self.mask = np.zeros(shape, np.uint8)
        return "fake-session-0001"

    def create_session(self, path_or_bytes: Any, fmt: str | None = None) -> str:
        self.calls.append(("create_session", {"fmt": fmt}))
        return "fake-session-0002"

    def _change(self, new: np.ndarray, label: int) -> dict[str, Any]:
        assert self.mask is not None
        region = changed_region(self.mask, new, label)
        if not np.array_equal(new, self.mask):
            self.undo_stack.append(self.mask)
            self.redo_stack.clear()
            self.mask = new
        return region

    def prompt(
        self,
        session_id: str,
        axis: str,
        slice_index: int,
        box=None,
        points=None,
        point_labels=None,
        label: int = 1,
    ) -> dict[str, Any]:
        self.calls.append(
            (
                "prompt",
                dict(
                    session_id=session_id,
                    axis=axis,
                    slice_index=slice_index,
                    box=box,
                    points=points,
                    point_labels=point_labels,
                    label=label,
                ),
            )
        )
        assert self.mask is not None
        new = self.mask.copy()
        plane = np.moveaxis(new, AXES[axis], 0)[slice_index]  # (X, Y) view of the slice
        plane[plane == label] = 0
        if box is not None:
            x0, y0, x1, y1 = (round(v) for v in box)
            plane[x0 : x1 + 1, y0 : y1 + 1] = label
        for (x, y), positive in zip(points or [], point_labels or [], strict=True):
            plane[round(x), round(y)] = label if positive else 0
        self.last[label] = (axis, slice_index)
        return self._change(new, label)

    def propagate(self, session_id: str, direction: str = "both", label: int = 1) -> dict[str, Any]:
        self.calls.append(("propagate", dict(session_id=session_id, direction=direction, label=label)))
        assert self.mask is not None
        axis, index = self.last[label]
        new = np.moveaxis(self.mask.copy(), AXES[axis], 0)
        source = new[index] == label
        span = {"up": range(index + 1, len(new)), "down": range(0, index), "both": range(len(new))}[direction]
        for n in span:
            new[n][source] = label
        return self._change(np.moveaxis(new, 0, AXES[axis]), label)

    def _step(self, source: list[np.ndarray], target: list[np.ndarray]) -> dict[str, Any]:
        assert self.mask is not None
        if not source:
            return changed_region(self.mask, self.mask, 0)
        new = source.pop()
        target.append(self.mask)
        region = changed_region(self.mask, new, 0)
        self.mask = new
        return region

    def undo(self, session_id: str) -> dict[str, Any]:
        self.calls.append(("undo", {"session_id": session_id}))
        return self._step(self.undo_stack, self.redo_stack)

    def redo(self, session_id: str) -> dict[str, Any]:
        self.calls.append(("redo", {"session_id": session_id}))
        return self._step(self.redo_stack, self.undo_stack)

    def seed(self, session_id: str, array: np.ndarray) -> dict[str, Any]:
        self.calls.append(("seed", {"session_id": session_id, "shape": array.shape}))
        return self._change(np.asarray(array, np.uint8).copy(), 0)

    def close(self, session_id: str) -> None:
        self.calls.append(("close", {"session_id": session_id}))
