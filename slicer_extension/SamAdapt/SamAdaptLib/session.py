"""Orchestration of one interactive segmentation session, independent of Slicer.

:class:`InteractiveSession` drives a samadapt server through a client object (duck-typed: the stdlib
``SamAdaptLib.client.SamAdaptClient`` in Slicer, a recording fake in tests) and keeps a local mirror of the
server's label map in Slicer's ``[k, j, i]`` order. Every change the server reports (a changed-region dict,
see :mod:`SamAdaptLib.regions`) is written into the mirror and handed, one label at a time and only inside
the changed box, to a ``writer`` callback; in Slicer that callback writes the box into the segment the label
stands for. Nothing here imports slicer, qt, vtk or torch.

Label values: each Slicer segment the user prompts gets its own label value (1, 2, ...; the server's label
map is uint8) through :meth:`InteractiveSession.label_for`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .geometry import Prompt
from .regions import PatchHistory, apply_region, decode_region, extent_ijk, region_index, region_labels

__all__ = ["Change", "InteractiveSession", "volume_geometry"]

#: writer(label, extent (i0, i1, j0, j1, k0, k1) inclusive, binary box in [k, j, i] order)
Writer = Callable[[int, tuple[int, int, int, int, int, int], np.ndarray], None]


@dataclass
class Change:
    """What one call changed: the IJK extent (None when nothing changed), labels touched, voxels changed."""

    extent: tuple[int, int, int, int, int, int] | None
    labels: list[int] = field(default_factory=list)
    voxels: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.extent is None or self.voxels == 0


def volume_geometry(ijk_to_ras: Any) -> tuple[list[float], list[float], list[float]]:
    """(spacing, origin, direction) of a volume from its IJKToRAS, as ``create_session_from_array`` takes
    them in the RAS frame: direction is 9 row-major values whose column n is the unit vector of axis n."""
    m = np.asarray(ijk_to_ras, dtype=np.float64).reshape(4, 4)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction = m[:3, :3] / spacing
    return spacing.tolist(), m[:3, 3].tolist(), direction.ravel().tolist()


def _session_id(result: Any) -> str:
    if isinstance(result, dict):
        return str(result.get("session_id") or result.get("id"))
    return str(result)


class InteractiveSession:
    """One uploaded volume on a samadapt server and the local label mirror.

    Args:
        client: an object with ``prompt``, ``propagate``, ``undo``, ``redo``, ``seed`` and ``close``
            methods taking a session id first (``SamAdaptClient``'s signatures).
        session_id: the server's session id.
        shape_ijk: volume dimensions (I, J, K).
        writer: called for every label a change touches (see :data:`Writer`); None: mirror only.
        server_undo: use the server's undo/redo (default); False keeps a local patch history instead.
    """

    def __init__(
        self,
        client: Any,
        session_id: str,
        shape_ijk: Sequence[int],
        *,
        writer: Writer | None = None,
        server_undo: bool = True,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.shape_ijk = tuple(int(n) for n in shape_ijk)
        self.labels = np.zeros(self.shape_ijk[::-1], dtype=np.uint8)  # [k, j, i], like Slicer arrays
        self.writer = writer
        self.server_undo = bool(server_undo)
        self.history = PatchHistory()
        self.segment_labels: dict[str, int] = {}
        self.last_prompt: dict[int, Prompt] = {}

    # ----------------------------------------------------------------------------- opening / closing
    @classmethod
    def from_array(
        cls,
        client: Any,
        array_kji: np.ndarray,
        ijk_to_ras: Any,
        *,
        writer: Writer | None = None,
        server_undo: bool = True,
        **upload: Any,
    ) -> InteractiveSession:
        """Upload a Slicer voxel array (``arrayFromVolume``: [k, j, i]) with its IJKToRAS geometry."""
        spacing, origin, direction = volume_geometry(ijk_to_ras)
        result = client.create_session_from_array(
            np.ascontiguousarray(array_kji),
            spacing=spacing,
            origin=origin,
            direction=direction,
            order="kji",
            frame="RAS",
            **upload,
        )
        shape_ijk = tuple(int(n) for n in np.shape(array_kji)[::-1])
        return cls(client, _session_id(result), shape_ijk, writer=writer, server_undo=server_undo)

    @classmethod
    def from_file(
        cls,
        client: Any,
        path_or_bytes: Any,
        shape_ijk: Sequence[int],
        *,
        fmt: str | None = None,
        writer: Writer | None = None,
        server_undo: bool = True,
    ) -> InteractiveSession:
        """Upload a NIfTI/NRRD file (or its bytes); ``shape_ijk`` is its voxel grid (I, J, K)."""
        result = client.create_session(path_or_bytes, fmt=fmt)
        return cls(client, _session_id(result), shape_ijk, writer=writer, server_undo=server_undo)

    def close(self) -> None:
        """Delete the server session (errors are ignored: the server may already have expired it)."""
        with contextlib.suppress(Exception):
            self.client.close(self.session_id)

    # ----------------------------------------------------------------------------- labels
    def label_for(self, segment_id: str) -> int:
        """The label value standing for a segment (assigned 1, 2, ... on first use)."""
        if segment_id not in self.segment_labels:
            used = set(self.segment_labels.values())
            value = next(v for v in range(1, 256) if v not in used) if len(used) < 255 else None
            if value is None:
                raise ValueError("a session holds at most 255 segments")
            self.segment_labels[segment_id] = value
        return self.segment_labels[segment_id]

    def segment_for(self, label: int) -> str | None:
        """The segment a label value stands for, or None."""
        for segment_id, value in self.segment_labels.items():
            if value == label:
                return segment_id
        return None

    # ----------------------------------------------------------------------------- server calls
    def prompt(self, prompt: Prompt, label: int = 1) -> Change:
        """Send a slice prompt; the changed region is written into the mirror and the segment."""
        region = self.client.prompt(self.session_id, label=int(label), **prompt.to_request())
        self.last_prompt[int(label)] = prompt
        return self._apply(region, record=True)

    def propagate(self, direction: str = "both", label: int = 1) -> Change:
        """Propagate the label's mask ``up`` (higher slice indexes), ``down`` or ``both``."""
        return self.apply(self.request_propagate(direction, label))

    def request_propagate(self, direction: str = "both", label: int = 1) -> Any:
        """Only the server call of :meth:`propagate` (safe on a worker thread); pass its result to
        :meth:`apply` on the main thread, which writes into the segments."""
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction must be up, down or both, got {direction!r}")
        return self.client.propagate(self.session_id, direction=direction, label=int(label))

    def apply(self, response: Any) -> Change:
        """Write a server response (a region, or a dict holding one) that changed the mask."""
        return self._apply(response, record=True)

    def undo(self) -> Change:
        """Step back one change (server history, or the local one when ``server_undo`` is False)."""
        if self.server_undo:
            return self._apply(self.client.undo(self.session_id), record=False)
        return self._local(self.history.undo)

    def redo(self) -> Change:
        """Re-apply the last undone change."""
        if self.server_undo:
            return self._apply(self.client.redo(self.session_id), record=False)
        return self._local(self.history.redo)

    def seed(self, labels_kji: np.ndarray) -> Change:
        """Start from an existing label map ([k, j, i], e.g. the segments already drawn in Slicer)."""
        labels = np.asarray(labels_kji, dtype=np.uint8)
        if labels.shape != self.labels.shape:
            raise ValueError(f"seed has shape {labels.shape}, the volume {self.labels.shape} ([k, j, i])")
        region = self.client.seed(self.session_id, np.ascontiguousarray(labels.transpose(2, 1, 0)))
        return self._apply(region, record=True)

    # ----------------------------------------------------------------------------- writing
    def _apply(self, response: Any, *, record: bool) -> Change:
        region = response.get("region", response) if isinstance(response, dict) else response
        info = {k: v for k, v in response.items() if k not in ("data", "region")} if response else {}
        offset, sub = decode_region(region)
        if 0 in sub.shape:
            return Change(None, [], 0, info)
        index = region_index(offset, sub.shape, "kji")
        old = self.labels[index].copy()
        if record and not self.server_undo:
            self.history.record(self.labels, region, order="kji")
        else:
            apply_region(self.labels, region, order="kji")
        new = self.labels[index]
        labels = region_labels(region, old)
        self._write(extent_ijk(region), index, labels)
        return Change(extent_ijk(region), labels, int(np.count_nonzero(old != new)), info)

    def _local(self, step: Callable[[np.ndarray], Any]) -> Change:
        before = self.labels.copy()
        patch = step(self.labels)
        if patch is None:
            return Change(None)
        k, j, i = patch.index
        extent = (i.start, i.stop - 1, j.start, j.stop - 1, k.start, k.stop - 1)
        labels = sorted({int(v) for v in np.unique(patch.before)} | {int(v) for v in np.unique(patch.after)})
        labels = [v for v in labels if v]
        self._write(extent, patch.index, labels)
        return Change(extent, labels, int(np.count_nonzero(before[patch.index] != self.labels[patch.index])))

    def _write(self, extent: Any, index: tuple[slice, slice, slice], labels: list[int]) -> None:
        if self.writer is None or extent is None:
            return
        box = self.labels[index]
        for value in labels:
            self.writer(int(value), tuple(int(v) for v in extent), (box == value).astype(np.uint8))
