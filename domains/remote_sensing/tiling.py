"""Tiles over a raster, their embeddings (through the on-disk cache) and cross-tile instance merging.

- :class:`TileGrid`: square windows of ``tile`` pixels with ``overlap`` pixels shared between
  neighbours; the last row/column is snapped back inside the raster (no overhanging reads), and each
  tile *owns* the part of the raster closest to it (:meth:`TileGrid.core`: the overlap is split at its
  middle), so the owned cores partition the raster exactly: every output pixel comes from one tile.
- :func:`encoder_input`: one uint8 RGB window -> the encoder frame, with the raster's GLOBAL stretch
  kept: the per-image min-max of the ``minmax`` profiles (LiteMedSAM, MedSAM) is replaced by the fixed
  0..255 range of the stretched raster, so a dark tile is not brightened differently from its
  neighbour (per-tile normalisation is what makes seams).
- :func:`embed_windows`: read + embed windows in batches, served from / stored to an
  :class:`~samadapt.domains.remote_sensing.cache.EmbeddingCache`; all-nodata windows are skipped.
- :class:`UnionFind` and :func:`overlap_pairs`: instances of two tiles that cover the same pixels of
  their shared strip (IoU there at least ``merge_iou``) become one instance.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from samadapt.errors import InputError
from samadapt.predictor import ImageEmbedding, Predictor
from samadapt.preprocess import PreprocessProfile, preprocess, resize_image

try:
    from rasterio.windows import Window
except ImportError:  # pragma: no cover - raster.py raises the install hint first
    Window = None  # type: ignore[assignment,misc]

__all__ = [
    "TileGrid",
    "UnionFind",
    "WindowEmbedding",
    "embed_windows",
    "encoder_input",
    "merge_shared",
    "overlap_pairs",
    "strip_of",
    "window_tuple",
]


def window_tuple(window: Window) -> tuple[int, int, int, int]:
    """(col_off, row_off, width, height) of a rasterio window, as integers."""
    return (int(window.col_off), int(window.row_off), int(window.width), int(window.height))


def _offsets(size: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: 0, stride, ...; the last snapped to ``size - tile`` (>= 0)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _owned(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) each tile owns along an axis: neighbours split their overlap at its middle."""
    bounds = [0]
    for i in range(len(starts) - 1):
        end_of_this = min(starts[i] + tile, size)
        bounds.append((starts[i + 1] + end_of_this) // 2)
    bounds.append(size)
    return [(bounds[i], bounds[i + 1]) for i in range(len(starts))]


@dataclass(frozen=True)
class TileGrid:
    """Square tiles of ``tile`` pixels over a ``width`` x ``height`` raster, ``overlap`` pixels shared.

    Tiles step by ``tile - overlap``; the last row and column are moved back so they end at the raster
    edge (a neighbour then shares more than ``overlap``). A raster smaller than a tile gets one tile
    that reaches past it (read boundless, the outside marked invalid).

    Args:
        width, height: raster size in pixels.
        tile: tile side in pixels; use the model's input side (``predictor.profile.input_size``) to
            keep the model at the raster's native resolution.
        overlap: pixels shared by neighbouring tiles (0 <= overlap < tile).
    """

    width: int
    height: int
    tile: int
    overlap: int

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise InputError(f"raster has no pixels: {self.width}x{self.height}")
        if self.tile < 16:
            raise InputError(f"--tile must be at least 16 pixels, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise InputError(
                f"--overlap must be 0 or more and less than --tile ({self.tile}), got {self.overlap}"
            )

    @property
    def col_starts(self) -> list[int]:
        return _offsets(self.width, self.tile, self.tile - self.overlap)

    @property
    def row_starts(self) -> list[int]:
        return _offsets(self.height, self.tile, self.tile - self.overlap)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of tiles."""
        return len(self.row_starts), len(self.col_starts)

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def window(self, row: int, col: int) -> Window:
        """The (tile x tile) read window of tile (row, col)."""
        return Window(self.col_starts[col], self.row_starts[row], self.tile, self.tile)

    def core(self, row: int, col: int) -> Window:
        """The part of the raster tile (row, col) owns (cores partition the raster)."""
        c0, c1 = _owned(self.col_starts, self.tile, self.width)[col]
        r0, r1 = _owned(self.row_starts, self.tile, self.height)[row]
        return Window(c0, r0, c1 - c0, r1 - r0)

    def __iter__(self) -> Iterator[tuple[int, int, Window]]:
        """(row, col, window) of every tile, row by row."""
        rows, cols = self.shape
        for r in range(rows):
            for c in range(cols):
                yield r, c, self.window(r, c)


# ---------------------------------------------------------------------------------------- encoding
def encoder_input(image: np.ndarray, profile: PreprocessProfile) -> tuple[torch.Tensor, tuple[int, int]]:
    """One (h, w, 3) uint8 window, already globally stretched, -> ((1, 3, S, S) float32, resized (h', w')).

    ``imagenet`` profiles (SAM) take uint8 pixels as they are, exactly as :func:`preprocess`. ``minmax``
    profiles (LiteMedSAM, MedSAM) would min-max each image; here 0..255 maps to 0..1 for every window
    (after the profile's resize and 8-bit rounding), so neighbouring tiles see the same radiometry.
    """
    if profile.normalize != "minmax":
        return preprocess(image, profile)
    rgb = np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1))  # (3, h, w)
    tensor = torch.from_numpy(rgb)[None]  # (1, 3, h, w)
    new_size = profile.resized_size((image.shape[0], image.shape[1]))
    tensor = resize_image(tensor, new_size, profile.resize)
    if profile.quantize:
        tensor = torch.floor(tensor + 0.5)
    tensor = (tensor / 255.0).clamp(0.0, 1.0)
    pad_h, pad_w = profile.input_size - new_size[0], profile.input_size - new_size[1]
    tensor = torch.nn.functional.pad(tensor, (0, pad_w, 0, pad_h))
    return tensor.contiguous(), new_size


@dataclass
class WindowEmbedding:
    """One window read from the raster and its embedding.

    Attributes:
        window: the read window (raster pixel grid; may reach past the edge).
        image: (h, w, 3) uint8 pixels as the model saw them.
        valid: (h, w) bool, False at nodata/masked pixels and outside the raster.
        embedding: the window's embedding, or None when no pixel is valid (nothing to segment).
        cached: whether the embedding came from the cache.
    """

    window: Window
    image: np.ndarray
    valid: np.ndarray
    embedding: ImageEmbedding | None
    cached: bool = False


def embed_windows(
    predictor: Predictor,
    raster: object,
    windows: Sequence[Window],
    cache: object | None = None,
    batch_size: int | None = None,
) -> Iterator[WindowEmbedding]:
    """Read and embed ``windows`` (in order), ``batch_size`` windows per encoder call.

    Args:
        predictor: runs the encoder (its precision plan, device).
        raster: a ``GeoRaster`` (``read(window) -> (image, valid)``).
        windows: windows of the raster grid.
        cache: an ``EmbeddingCache`` (or None: always encode).
        batch_size: windows per encoder call for cache misses (default: 1 on CPU, where batching
            gains little and LiteMedSAM's activations take ~150 MB per window; 4 on CUDA).

    Yields:
        one :class:`WindowEmbedding` per window, in order. Only ``batch_size`` windows are held at once.
    """
    profile = predictor.profile
    if batch_size is None:
        batch_size = 1 if predictor.device.type == "cpu" else 4
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        reads = [raster.read(w) for w in chunk]  # type: ignore[attr-defined]
        outputs: list[object | None] = [None] * len(chunk)
        resized: list[tuple[int, int]] = [(0, 0)] * len(chunk)
        todo: list[int] = []
        tensors: list[torch.Tensor] = []
        for i, (window, (image, valid)) in enumerate(zip(chunk, reads, strict=True)):
            if not valid.any():
                continue
            resized[i] = profile.resized_size((image.shape[0], image.shape[1]))
            hit = cache.load(window_tuple(window), predictor.device) if cache is not None else None  # type: ignore[attr-defined]
            if hit is not None:
                outputs[i] = hit
                continue
            tensor, resized[i] = encoder_input(image, profile)
            tensors.append(tensor)
            todo.append(i)
        cached_flags = [outputs[i] is not None for i in range(len(chunk))]
        if tensors:
            encoded = predictor.encode_batch(torch.cat(tensors))
            for row, i in enumerate(todo):
                one = encoded.select(torch.tensor([row], device=encoded.embedding.device))
                if cache is not None:
                    one = cache.store(window_tuple(chunk[i]), one)  # type: ignore[attr-defined]
                outputs[i] = one
        for i, (window, (image, valid)) in enumerate(zip(chunk, reads, strict=True)):
            out = outputs[i]
            embedding = None
            if out is not None:
                embedding = ImageEmbedding(
                    out.embedding,  # type: ignore[attr-defined]
                    (image.shape[0], image.shape[1]),
                    resized[i],
                    list(out.features),  # type: ignore[attr-defined]
                    out.image,  # type: ignore[attr-defined]
                )
            yield WindowEmbedding(window, image, valid, embedding, cached_flags[i])


# ---------------------------------------------------------------------------------------- merging
class UnionFind:
    """Disjoint sets over integer ids (grown on demand), with path halving."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, item: int) -> int:
        parent = self.parent
        parent.setdefault(item, item)
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller id is the root: the instance keeps its first-seen number
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra


def overlap_pairs(a: np.ndarray, b: np.ndarray, merge_iou: float = 0.5) -> list[tuple[int, int]]:
    """Pairs (id in ``a``, id in ``b``) that are the same instance seen by two tiles.

    Args:
        a, b: (h, w) integer labels of the SAME raster pixels from two tiles (0 = nothing).
        merge_iou: IoU, within these pixels, at or above which two instances are one.

    Returns:
        the pairs to merge.
    """
    both = (a > 0) & (b > 0)
    if not both.any():
        return []
    la, lb = a[both].astype(np.int64), b[both].astype(np.int64)
    span = int(lb.max()) + 1
    keys, counts = np.unique(la * span + lb, return_counts=True)  # one int64 key per (a, b) pair
    pairs = np.stack([keys // span, keys % span])  # (2, P)
    ids_a, area_a = np.unique(a[a > 0], return_counts=True)
    ids_b, area_b = np.unique(b[b > 0], return_counts=True)
    size_a = dict(zip(ids_a.tolist(), area_a.tolist(), strict=True))
    size_b = dict(zip(ids_b.tolist(), area_b.tolist(), strict=True))
    merged = []
    for (ia, ib), inter in zip(pairs.T.tolist(), counts.tolist(), strict=True):
        union = size_a[ia] + size_b[ib] - inter
        if inter / union >= merge_iou:
            merged.append((int(ia), int(ib)))
    return merged


def strip_of(
    window: Window, labels: np.ndarray, *, col: int | None = None, row: int | None = None
) -> tuple[Window, np.ndarray]:
    """The part of a tile's labels from raster column ``col`` (or row ``row``) to its end."""
    c0, r0, w, h = window_tuple(window)
    if col is not None:
        return Window(col, r0, c0 + w - col, h), labels[:, col - c0 :].copy()
    assert row is not None
    return Window(c0, row, w, r0 + h - row), labels[row - r0 :, :].copy()


def merge_shared(
    union: UnionFind, neighbour: tuple[Window, np.ndarray], window: Window, labels: np.ndarray, iou: float
) -> None:
    """Union the instances of a neighbour's strip and this tile that cover the same shared pixels."""
    other_window, other = neighbour
    oc, orow, ow, oh = window_tuple(other_window)
    c0, r0, w, h = window_tuple(window)
    left, top = max(oc, c0), max(orow, r0)
    right, bottom = min(oc + ow, c0 + w), min(orow + oh, r0 + h)
    if left >= right or top >= bottom:
        return
    a = other[top - orow : bottom - orow, left - oc : right - oc]
    b = labels[top - r0 : bottom - r0, left - c0 : right - c0]
    for ia, ib in overlap_pairs(a, b, iou):
        union.union(ia, ib)
