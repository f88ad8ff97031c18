"""Changed-region patches from the samadapt server, written into label arrays, with a local undo history.

A region is the bounding box of the voxels one call changed (docs/server.md, docs/slicer.md)::

    {"offset": [i0, j0, k0], "shape": [si, sj, sk], "label": 1,
     "encoding": "zlib+base64", "dtype": "uint8", "data": "..."}

``offset``/``shape`` are in the server's array order ``[i, j, k]`` (samadapt's ``Volume.array``);
``data`` is the C-order bytes of the label sub-array ``mask[i0:i0+si, j0:j0+sj, k0:k0+sk]`` after the
call (the whole label map in the box, not only the changed voxels). An empty change has shape [0, 0, 0].

Slicer arrays (``arrayFromVolume``, ``arrayFromSegmentBinaryLabelmap``) are ``[k, j, i]``; pass
``order="kji"`` to write into them. Pure Python + numpy (stdlib zlib/base64); no slicer import.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Patch",
    "PatchHistory",
    "RegionError",
    "apply_region",
    "decode_region",
    "encode_region",
    "extent_ijk",
    "region_index",
    "region_labels",
]

_MAX_DECODED_BYTES = 2**31  # a region never exceeds the volume; refuse absurd headers early


class RegionError(ValueError):
    """A region dict that is malformed or does not fit the target array."""


def encode_region(offset: Iterable[int], sub_ijk: np.ndarray, label: int = 1) -> dict[str, Any]:
    """A region dict for a label sub-array in ``[i, j, k]`` order (what the server sends; used by fakes)."""
    sub = np.ascontiguousarray(sub_ijk, dtype=np.uint8)
    return {
        "offset": [int(v) for v in offset],
        "shape": [int(v) for v in sub.shape],
        "label": int(label),
        "encoding": "zlib+base64",
        "dtype": "uint8",
        "data": base64.b64encode(zlib.compress(sub.tobytes())).decode("ascii"),
    }


def decode_region(region: dict[str, Any]) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(offset_ijk, sub_ijk)`` of a region; ``sub_ijk`` has the region's shape in ``[i, j, k]`` order.

    Raises:
        RegionError: missing keys, unknown encoding or dtype, or data that does not match the shape.
    """
    if isinstance(region, dict) and "region" in region and "offset" not in region:
        region = region["region"]  # a response that wraps the region
    try:
        offset = tuple(int(v) for v in region["offset"])
        shape = tuple(int(v) for v in region["shape"])
        encoding = str(region.get("encoding", "zlib+base64"))
        dtype = np.dtype(str(region.get("dtype", "uint8")))
        data = region.get("data", "")
    except (KeyError, TypeError, ValueError) as exc:
        raise RegionError(f"malformed region: {exc}") from None
    if len(offset) != 3 or len(shape) != 3 or min(shape) < 0 or min(offset) < 0:
        raise RegionError(f"region needs 3 non-negative offsets and sizes, got {offset} / {shape}")
    if dtype.kind not in "ub":
        raise RegionError(f"region dtype must be an unsigned integer type, got {dtype}")
    count = int(np.prod(shape))
    if count == 0:
        return offset, np.zeros(shape, dtype=np.uint8)
    if count * dtype.itemsize > _MAX_DECODED_BYTES:
        raise RegionError(f"region of shape {shape} is too large")
    if encoding == "zlib+base64":
        raw = zlib.decompress(base64.b64decode(data))
    elif encoding == "base64":
        raw = base64.b64decode(data)
    else:
        raise RegionError(f"unknown region encoding {encoding!r}")
    if len(raw) != count * dtype.itemsize:
        raise RegionError(f"region data holds {len(raw)} bytes, shape {shape} needs {count * dtype.itemsize}")
    return offset, np.frombuffer(raw, dtype=dtype).reshape(shape)


def region_index(
    offset_ijk: Iterable[int], shape_ijk: Iterable[int], order: str = "kji"
) -> tuple[slice, slice, slice]:
    """The numpy index of a region in an array of the given axis order (``kji`` Slicer, ``ijk`` samadapt)."""
    spans = [slice(o, o + s) for o, s in zip(offset_ijk, shape_ijk, strict=True)]
    if order == "ijk":
        return spans[0], spans[1], spans[2]
    if order == "kji":
        return spans[2], spans[1], spans[0]
    raise RegionError(f"order must be 'ijk' or 'kji', got {order!r}")


def extent_ijk(region: dict[str, Any]) -> tuple[int, int, int, int, int, int] | None:
    """VTK-style inclusive extent (i0, i1, j0, j1, k0, k1) of a region; None for an empty region."""
    offset = [int(v) for v in region["offset"]]
    shape = [int(v) for v in region["shape"]]
    if 0 in shape:
        return None
    return (
        offset[0],
        offset[0] + shape[0] - 1,
        offset[1],
        offset[1] + shape[1] - 1,
        offset[2],
        offset[2] + shape[2] - 1,
    )


def region_labels(region: dict[str, Any], before: np.ndarray | None = None) -> list[int]:
    """Label values a region touches: those in its data, in ``before`` and its own ``label`` (no 0)."""
    _, sub = decode_region(region)
    values = set(np.unique(sub).tolist())
    if before is not None:
        values |= set(np.unique(before).tolist())
    if region.get("label") is not None:
        values.add(int(region["label"]))
    values.discard(0)
    return sorted(int(v) for v in values)


def _to_order(sub_ijk: np.ndarray, order: str) -> np.ndarray:
    return sub_ijk if order == "ijk" else sub_ijk.transpose(2, 1, 0)


def apply_region(
    array: np.ndarray, region: dict[str, Any], *, order: str = "kji", label: int | None = None
) -> np.ndarray | None:
    """Write a region into ``array`` in place.

    Args:
        array: the target: a label map (``label=None``: the region's label values are copied) or the
            binary array of one segment (``label=L``: voxels equal to L become 1, the rest of the box 0).
        region: the region dict.
        order: axis order of ``array``: ``kji`` (Slicer) or ``ijk`` (samadapt).
        label: the label value the binary target stands for.

    Returns:
        A copy of the box as it was before (for an undo history), or None for an empty region.

    Raises:
        RegionError: the region does not fit inside ``array``.
    """
    offset, sub = decode_region(region)
    if 0 in sub.shape:
        return None
    full = array.shape if order == "ijk" else array.shape[::-1]
    if any(o + s > n for o, s, n in zip(offset, sub.shape, full, strict=True)):
        raise RegionError(
            f"region at {list(offset)} of shape {list(sub.shape)} does not fit the volume {list(full)} (IJK)"
        )
    index = region_index(offset, sub.shape, order)
    before = array[index].copy()
    values = _to_order(sub, order)
    array[index] = values if label is None else (values == label)
    return before


@dataclass
class Patch:
    """One change to a local array: the box index and its contents before and after."""

    index: tuple[slice, slice, slice]
    before: np.ndarray
    after: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.before.nbytes + self.after.nbytes)


class PatchHistory:
    """Local undo/redo of region patches, bounded in bytes (oldest steps are dropped first).

    The server keeps its own history (``/undo``, ``/redo``); this one is for servers without it (the
    MONAI Label facade) and for restoring a segment the user also edited by hand.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = int(max_bytes)
        self._undo: list[Patch] = []
        self._redo: list[Patch] = []

    def __len__(self) -> int:
        return len(self._undo)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def clear(self) -> None:
        self._undo.clear()
        self._redo.clear()

    def record(self, array: np.ndarray, region: dict[str, Any], *, order: str = "kji", label=None) -> None:
        """Apply ``region`` to ``array`` and remember the change (clears the redo steps)."""
        before = apply_region(array, region, order=order, label=label)
        if before is None:
            return
        offset, sub = decode_region(region)
        index = region_index(offset, sub.shape, order)
        self.push(Patch(index, before, array[index].copy()))

    def push(self, patch: Patch) -> None:
        self._undo.append(patch)
        self._redo.clear()
        while len(self._undo) > 1 and sum(p.nbytes for p in self._undo) > self.max_bytes:
            self._undo.pop(0)

    def undo(self, array: np.ndarray) -> Patch | None:
        """Restore the last change in ``array``; returns the patch (None when there is nothing to undo)."""
        if not self._undo:
            return None
        patch = self._undo.pop()
        array[patch.index] = patch.before
        self._redo.append(patch)
        return patch

    def redo(self, array: np.ndarray) -> Patch | None:
        """Re-apply the last undone change; returns the patch (None when there is nothing to redo)."""
        if not self._redo:
            return None
        patch = self._redo.pop()
        array[patch.index] = patch.after
        self._undo.append(patch)
        return patch
