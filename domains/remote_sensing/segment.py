"""Segment a raster of any size: box/point prompts in map coordinates, or everything tile by tile.

Both modes write an instance-id raster through a ``GeoTiffWriter`` piece by piece (512-row strips of at
most 4096 columns, or 512 x 512 blocks). Memory: the prompt mode holds each prompt's mask cropped to its
extent; the automatic mode holds one band of provisional ids (the owned rows of one tile row x the raster
width, int32) and the previous tile row's overlap strips, so it grows with the raster's width and the
tile size, never with its height; GDAL's block cache is capped by the CLI (``GDAL_CACHEMAX`` 256 MB).

- :func:`segment_prompts`: each prompt is segmented on its own window: tile-sized and centred on it
  (a box bigger than a tile gets a window 25% bigger than the box). With ``zoom="auto"`` a box whose
  object would span fewer than a quarter of the model's input side is segmented on a crop twice the
  box's long side instead, which the model sees enlarged to its input size. Prompt ``n`` (1-based,
  in the given order) writes id ``n``; where masks overlap, the higher predicted IoU wins.
  Measured with LiteMedSAM on the 43 solaris buildings (boxes from ``geotiff_labels.geojson`` on the
  16-bit pan ``sample_geotiff.tif``, 0.5 m, buildings 8-57 px): mean IoU 0.503 with ``--zoom off``,
  0.533 with ``auto`` (all 43 zoomed); crops of 1.5x / 3x / 4x the box gave 0.511 / 0.539 / 0.524.
- :func:`segment_auto`: the automatic mask generator on every tile of a :class:`TileGrid`; each tile
  writes only the part it owns (:meth:`TileGrid.core`), and instances of neighbouring tiles that cover
  the same pixels of their overlap (IoU >= ``merge_iou``) get one id (union-find), so an object crossing
  tile borders is one instance. Provisional ids go to a temporary compressed GeoTIFF band by band;
  a second pass renumbers them 1..N (in raster order) into the output.

Invalid pixels (nodata, masked, outside the raster) are never segmented and are written as the
writer's nodata. The returned records (id -> attributes) feed ``vectors.write_vectors``.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from samadapt.domains.remote_sensing.tiling import (
    TileGrid,
    UnionFind,
    embed_windows,
    merge_shared,
    strip_of,
    window_tuple,
)
from samadapt.errors import InputError

try:
    import rasterio
    from rasterio.windows import Window
except ImportError:  # pragma: no cover - raster.py raises the install hint first
    rasterio = None  # type: ignore[assignment]

__all__ = ["MAX_WINDOW", "ZOOM_CONTEXT", "ZOOM_FRACTION", "prompt_window", "segment_auto", "segment_prompts"]

#: zoom when the box's long side would be under this fraction of the model's input side
ZOOM_FRACTION = 0.25
#: a zoomed crop is this many times the box's long side
ZOOM_CONTEXT = 2.0
#: longest window side read for one prompt (pixels); bigger boxes need --resolution
MAX_WINDOW = 4096
_STRIP = 512  # output rows written at once
_CHUNK = 4096  # output columns written at once


def _progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, file=sys.stderr)


def _place(center: float, side: int, size: int) -> int:
    """Start of a ``side`` window centred on ``center``, moved inside [0, size) when it fits."""
    start = math.floor(center - side / 2 + 0.5)
    if size >= side:
        start = min(max(start, 0), size - side)
    return start


def prompt_window(
    pixels: np.ndarray,
    kind: str,
    tile: int,
    input_size: int,
    size: tuple[int, int],
    zoom: str = "auto",
) -> tuple[Window, bool]:
    """The window one prompt is segmented on, and whether it is a zoomed crop.

    Args:
        pixels: box (4,) x0, y0, x1, y1 pixel indexes (first and last pixel), or point (2,) x, y.
        kind: ``box`` or ``point``.
        tile: the tile side (context around a prompt at native resolution).
        input_size: the model's input side (what the window is resized to).
        size: (width, height) of the raster.
        zoom: ``auto`` (zoom small boxes) or ``off``.
    """
    width, height = size
    if kind == "point":
        return Window(
            _place(pixels[0] + 0.5, tile, width), _place(pixels[1] + 0.5, tile, height), tile, tile
        ), False
    x0, y0, x1, y1 = (float(v) for v in pixels)
    long_side = max(x1 - x0 + 1.0, y1 - y0 + 1.0)
    side = max(tile, math.ceil(long_side * 1.25))
    zoomed = zoom == "auto" and long_side * input_size / side < ZOOM_FRACTION * input_size
    if zoomed:
        side = max(math.ceil(ZOOM_CONTEXT * long_side), 16)
    if side > MAX_WINDOW:
        raise InputError(
            f"a box spans {long_side:.0f} pixels: more than one {MAX_WINDOW}-pixel window can hold; "
            "use --resolution to read a coarser grid"
        )
    cx, cy = (x0 + x1 + 1.0) / 2.0, (y0 + y1 + 1.0) / 2.0
    return Window(_place(cx, side, width), _place(cy, side, height), side, side), zoomed


def _box_indexes(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel-edge box (x0, y0, x1, y1; corners on integers) -> first/last pixel indexes, in the raster."""
    x0, y0, x1, y1 = (float(v) for v in pixels)
    x0, y0 = min(max(x0, 0.0), width - 1.0), min(max(y0, 0.0), height - 1.0)
    x1, y1 = min(max(x1 - 1.0, x0 + 0.5), width - 0.5), min(max(y1 - 1.0, y0 + 0.5), height - 0.5)
    return np.array([x0, y0, x1, y1])


def _crop_mask(mask: np.ndarray, window: Window) -> tuple[int, int, np.ndarray] | None:
    """(row, col, tight bool array) of a window-frame mask in raster pixels; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return int(window.row_off) + int(r0), int(window.col_off) + int(c0), mask[r0:r1, c0:c1].copy()


def _check_writer(writer: Any, highest: int) -> Any:
    """The writer's nodata value after checking ids 1..highest fit its dtype."""
    dtype = np.dtype(getattr(writer, "dtype", "int32"))
    limit = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 2**24
    nodata = getattr(writer, "nodata", None)
    if highest >= limit or (nodata is not None and 0 < nodata <= highest):
        raise InputError(f"{highest} instances do not fit the output type {dtype} (nodata {nodata})")
    return nodata


def _strips(height: int, width: int) -> list[Window]:
    """Full-width strips of ``_STRIP`` rows (prompt masks are pasted strip by strip)."""
    return [Window(0, r, width, min(_STRIP, height - r)) for r in range(0, height, _STRIP)]


def _blocks(height: int, width: int) -> list[Window]:
    """``_STRIP`` x ``_STRIP`` blocks, row by row (the output's own blocks)."""
    return [
        Window(c, r, min(_STRIP, width - c), min(_STRIP, height - r))
        for r in range(0, height, _STRIP)
        for c in range(0, width, _STRIP)
    ]


# ---------------------------------------------------------------------------------------- prompts
def segment_prompts(
    predictor: Any,
    raster: Any,
    prompts: Sequence[Any],
    writer: Any,
    zoom: Literal["auto", "off"] = "auto",
    *,
    tile: int | None = None,
    cache: Any = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[int, dict[str, Any]]:
    """Segment every box/point prompt and write the instance-id raster.

    Args:
        predictor: a :class:`samadapt.predictor.Predictor`.
        raster: the ``GeoRaster`` the prompts refer to.
        prompts: ``MapPrompt``s in the raster's CRS. Each box, and each foreground point, is one
            instance; background points (label 0) go with every foreground point whose window holds them.
        writer: an open ``GeoTiffWriter`` (``write(window, array)``, ``dtype``, ``nodata``).
        zoom: ``auto`` segments small boxes on an enlarged crop; ``off`` never does.
        tile: context window side (default: the model's input side).
        cache: an ``EmbeddingCache`` or None.
        batch_size: windows per encoder call (default: 1 on CPU, 4 on CUDA).
        progress: show a progress bar on stderr.

    Returns:
        id -> {id, kind, score (predicted IoU), pixels (visible in the output), zoomed, window
        (col, row, width, height), feature_id}; ids with an empty mask have pixels 0 and no polygon.
    """
    from samadapt.domains.remote_sensing.prompts import to_pixels

    if zoom not in ("auto", "off"):
        raise InputError(f"--zoom must be auto or off, got {zoom!r}")
    input_size = int(predictor.profile.input_size)
    tile = tile or input_size
    size = (int(raster.width), int(raster.height))
    negatives = [to_pixels(p, raster.transform) - 0.5 for p in prompts if p.kind == "point" and p.label == 0]
    objects: list[tuple[int, Any, np.ndarray]] = []  # (id, prompt, pixel prompt)
    for n, prompt in enumerate(prompts, start=1):
        if prompt.kind == "point" and prompt.label == 0:
            continue
        pixels = to_pixels(prompt, raster.transform)
        if prompt.kind == "box":
            pixels = _box_indexes(pixels, *size)
        else:
            pixels = np.clip(pixels - 0.5, 0.0, [size[0] - 1.0, size[1] - 1.0])  # edge -> index frame
        objects.append((n, prompt, pixels))
    highest = max((n for n, _, _ in objects), default=0)
    nodata = _check_writer(writer, highest)
    placed = [prompt_window(px, p.kind, tile, input_size, size, zoom) for _, p, px in objects]
    records: dict[int, dict[str, Any]] = {}
    masks: list[tuple[float, int, int, int, np.ndarray]] = []  # (score, id, row, col, mask)
    windows = [w for w, _ in placed]
    with _progress(len(objects), "prompts", "prompt", progress) as bar:
        for (n, prompt, pixels), (_, zoomed), item in zip(
            objects, placed, embed_windows(predictor, raster, windows, cache, batch_size), strict=True
        ):
            window = item.window
            offset = np.array([window.col_off, window.row_off], dtype=np.float64)
            score, found = 0.0, None
            if item.embedding is not None:
                h, w = item.valid.shape
                if prompt.kind == "box":
                    box = pixels - np.tile(offset, 2)
                    result = predictor.predict(boxes=box, embedding=item.embedding)
                else:
                    coords = [pixels - offset] + [q - offset for q in negatives]
                    labels = [1] + [0] * len(negatives)
                    keep = [i for i, (x, y) in enumerate(coords) if 0 <= x <= w - 1 and 0 <= y <= h - 1]
                    result = predictor.predict(
                        point_coords=np.array([coords[i] for i in keep]),
                        point_labels=np.array([labels[i] for i in keep]),
                        embedding=item.embedding,
                    )
                best = int(result.scores[0].argmax())
                score = float(result.scores[0, best])
                found = _crop_mask(result.masks[0, best] & item.valid, window)
            if found is not None:
                masks.append((score, n, *found))
            records[n] = {
                "id": n,
                "kind": prompt.kind,
                "score": score,
                "pixels": 0,
                "zoomed": zoomed,
                "window": list(window_tuple(window)),
                "feature_id": prompt.feature_id,
            }
            bar.update(1)
    masks.sort(key=lambda m: m[0])  # paint low scores first: the best mask ends on top
    _write_prompt_masks(raster, writer, masks, records, nodata)
    return records


def _all_valid(raster: Any) -> bool:
    """Whether every pixel of the raster is valid (no nodata, mask or NaN: no need to read it)."""
    from rasterio.enums import MaskFlags

    dataset = getattr(raster, "dataset", None)
    if dataset is None or raster.resampled or raster.nodata is not None or "float" in str(raster.dtype):
        return False
    flags = [dataset.mask_flag_enums[b - 1] for b in raster.bands]
    return all(list(f) == [MaskFlags.all_valid] for f in flags)


def _write_prompt_masks(
    raster: Any,
    writer: Any,
    masks: list[tuple[float, int, int, int, np.ndarray]],
    records: dict[int, dict[str, Any]],
    nodata: Any,
) -> None:
    """Paste the masks into the output piece by piece (nodata where the raster is invalid).

    Pieces are ``_STRIP`` rows by at most ``_CHUNK`` columns, so memory does not grow with the raster.
    """
    dtype = np.dtype(writer.dtype)
    width, height = int(raster.width), int(raster.height)
    every_valid = _all_valid(raster)
    for strip in _strips(height, width):
        r0, r1 = int(strip.row_off), int(strip.row_off + strip.height)
        in_strip = [m for m in masks if m[2] < r1 and m[2] + m[4].shape[0] > r0]
        for c0 in range(0, width, _CHUNK):
            c1 = min(c0 + _CHUNK, width)
            piece = Window(c0, r0, c1 - c0, r1 - r0)
            labels = np.zeros((r1 - r0, c1 - c0), dtype=dtype)
            for _, n, row, col, mask in in_strip:
                top, bottom = max(row, r0), min(row + mask.shape[0], r1)
                left, right = max(col, c0), min(col + mask.shape[1], c1)
                if top >= bottom or left >= right:
                    continue
                part = mask[top - row : bottom - row, left - col : right - col]
                labels[top - r0 : bottom - r0, left - c0 : right - c0][part] = n
            valid = np.ones(labels.shape, dtype=bool) if every_valid else raster.read(piece)[1]
            counts = np.bincount(labels[valid].ravel().astype(np.int64), minlength=1)
            for value in np.flatnonzero(counts[1:]) + 1:
                records[int(value)]["pixels"] += int(counts[value])
            if nodata is not None:
                labels[~valid] = nodata
            writer.write(piece, labels)


# ---------------------------------------------------------------------------------------- automatic
def segment_auto(
    generator: Any,
    raster: Any,
    grid: TileGrid,
    writer: Any,
    *,
    cache: Any = None,
    merge_iou: float = 0.5,
    batch_size: int | None = None,
    progress: bool = True,
    workdir: str | Path | None = None,
) -> dict[int, dict[str, Any]]:
    """Segment everything, tile by tile, and write one instance id per object over the whole raster.

    Args:
        generator: a :class:`samadapt.automatic.AutomaticMaskGenerator` (``crop_n_layers=0``: the
            tiles are the crops).
        raster: a ``GeoRaster``.
        grid: the tiles (same width/height as ``raster``).
        writer: an open ``GeoTiffWriter`` of an integer dtype.
        cache: an ``EmbeddingCache`` or None.
        merge_iou: IoU within a shared strip at which two tiles' instances are merged.
        batch_size: tiles per encoder call (default: 1 on CPU, 4 on CUDA).
        progress: show a progress bar on stderr.
        workdir: where the temporary provisional-id raster goes (default: the system temp folder).

    Returns:
        id -> {id, score (pixel-weighted predicted IoU), stability, pixels, tiles (parts merged)}, plus
        ``class`` (the class index most of its pixels got) when the generator gives classes (an
        instance adapter such as RsPrompter).
    """
    if generator.crop_n_layers:
        raise InputError("--crop-layers is not used on rasters: the tiles are the crops (use --tile)")
    if (grid.width, grid.height) != (raster.width, raster.height):
        raise ValueError("the tile grid does not match the raster size")
    union = UnionFind()
    stats: dict[int, list[float]] = {}  # provisional id -> [score, stability, pixels, class or -1]
    n_rows, n_cols = grid.shape
    windows = [w for _, _, w in grid]
    with tempfile.TemporaryDirectory(prefix="samadapt-geo-", dir=workdir) as tmp:
        provisional = Path(tmp) / "provisional.tif"
        profile = {
            "driver": "GTiff",
            "width": raster.width,
            "height": raster.height,
            "count": 1,
            "dtype": "int32",
            "nodata": -1,
            "crs": raster.crs,
            "transform": raster.transform,
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
            "compress": "deflate",
            "zlevel": 1,
            "BIGTIFF": "IF_SAFER",
        }
        with rasterio.open(provisional, "w", **profile) as scratch:
            _auto_pass(
                generator,
                raster,
                grid,
                windows,
                scratch,
                union,
                stats,
                cache,
                merge_iou,
                batch_size,
                progress,
            )
        return _renumber(provisional, raster, writer, union, stats, n_rows * n_cols)


def _auto_pass(
    generator: Any,
    raster: Any,
    grid: TileGrid,
    windows: list[Window],
    scratch: Any,
    union: UnionFind,
    stats: dict[int, list[float]],
    cache: Any,
    merge_iou: float,
    batch_size: int | None,
    progress: bool,
) -> None:
    """Pass 1: provisional ids per tile into ``scratch`` band by band, merges recorded in ``union``."""
    n_rows, n_cols = grid.shape
    next_id = 1
    above: dict[int, tuple[Window, np.ndarray]] = {}  # previous row's strips that reach this row
    below: dict[int, tuple[Window, np.ndarray]] = {}
    left: tuple[Window, np.ndarray] | None = None
    band: np.ndarray | None = None
    tiles = embed_windows(generator.predictor, raster, windows, cache, batch_size)
    with _progress(len(windows), "tiles", "tile", progress) as bar:
        for index, item in enumerate(tiles):
            r, c = divmod(index, n_cols)
            window = item.window
            labels = np.zeros(item.valid.shape, dtype=np.int64)
            if item.embedding is not None:
                result = generator.generate(item.image, embedding=item.embedding)
                local = result.label_map().astype(np.int64)
                local[~item.valid] = 0
                labels = np.where(local > 0, local + (next_id - 1), 0)
                classes = result.settings.get("classes")  # per record, from an instance adapter
                for record in result.records:
                    kind = classes[record.label - 1] if classes else -1
                    score, stability = record.predicted_iou, record.stability_score
                    stats[next_id + record.label - 1] = [score, stability, 0.0, kind]
                next_id += len(result)
            neighbours = [left] + [above.get(k) for k in (c - 1, c, c + 1)]
            for neighbour in neighbours:
                if neighbour is not None:
                    merge_shared(union, neighbour, window, labels, merge_iou)
            core = grid.core(r, c)
            if c == 0:
                band = np.full((int(core.height), raster.width), -1, dtype=np.int32)
            assert band is not None
            _fill_core(band, core, window, labels, item.valid, stats)
            col_next = grid.col_starts[c + 1] if c + 1 < n_cols else None
            row_next = grid.row_starts[r + 1] if r + 1 < n_rows else None
            left = strip_of(window, labels, col=col_next) if col_next is not None else None
            if row_next is not None:
                below[c] = strip_of(window, labels, row=row_next)
            if c == n_cols - 1:
                scratch.write(band, 1, window=Window(0, core.row_off, raster.width, core.height))
                above, below, left = below, {}, None
            bar.update(1)


def _fill_core(
    band: np.ndarray,
    core: Window,
    window: Window,
    labels: np.ndarray,
    valid: np.ndarray,
    stats: dict[int, list[float]],
) -> None:
    """Copy the tile's owned part into the row band (-1 where invalid) and count owned pixels per id."""
    cc, cr, cw, ch = window_tuple(core)
    c0, r0, _, _ = window_tuple(window)
    part = labels[cr - r0 : cr - r0 + ch, cc - c0 : cc - c0 + cw]
    ok = valid[cr - r0 : cr - r0 + ch, cc - c0 : cc - c0 + cw]
    band[:, cc : cc + cw] = np.where(ok, part, -1)
    ids, counts = np.unique(part[ok & (part > 0)], return_counts=True)
    for i, count in zip(ids.tolist(), counts.tolist(), strict=True):
        stats[i][2] += count


def _renumber(
    provisional: Path, raster: Any, writer: Any, union: UnionFind, stats: dict[int, list[float]], tiles: int
) -> dict[int, dict[str, Any]]:
    """Pass 2: merged instances numbered 1..N in raster order, written block by block."""
    totals: dict[int, list[float]] = {}  # root -> [score*pixels, stability*pixels, pixels, parts]
    votes: dict[int, dict[int, float]] = {}  # root -> class -> pixels (parts merged across tiles)
    for pid in sorted(stats):
        score, stability, pixels, kind = stats[pid]
        if pixels <= 0:
            continue
        root = union.find(pid)
        entry = totals.setdefault(root, [0.0, 0.0, 0.0, 0.0])
        entry[0] += score * pixels
        entry[1] += stability * pixels
        entry[2] += pixels
        entry[3] += 1
        if kind >= 0:
            tally = votes.setdefault(root, {})
            tally[int(kind)] = tally.get(int(kind), 0.0) + pixels
    final = {root: n for n, root in enumerate(sorted(totals), start=1)}
    nodata = _check_writer(writer, len(final))
    lookup = np.zeros(max(stats, default=0) + 2, dtype=np.int64)
    for pid in stats:
        lookup[pid] = final.get(union.find(pid), 0)
    dtype = np.dtype(writer.dtype)
    with rasterio.open(provisional) as scratch:
        for block in _blocks(raster.height, raster.width):
            ids = scratch.read(1, window=block)
            out = lookup[np.maximum(ids, 0)]
            out[ids < 0] = nodata if nodata is not None else 0
            writer.write(block, out.astype(dtype))
    records: dict[int, dict[str, Any]] = {}
    for root, n in final.items():
        weighted_score, weighted_stability, pixels, parts = totals[root]
        records[n] = {
            "id": n,
            "score": weighted_score / pixels,
            "stability": weighted_stability / pixels,
            "pixels": int(pixels),
            "tiles": int(parts),
        }
        if root in votes:  # the class most of its pixels got (the lower index on a tie)
            records[n]["class"] = min(votes[root].items(), key=lambda item: (-item[1], item[0]))[0]
    return records
