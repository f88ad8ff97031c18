"""Where RsPrompter's training objects come from: label rasters, polygon files, COCO JSON, cut into tiles.

Used by :mod:`samadapt.domains.remote_sensing.instances` (the module docstring there describes the sources,
the tiling and the split by region).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import rasterize
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from samadapt.domains.remote_sensing.raster import GeoRaster
from samadapt.domains.remote_sensing.tiling import TileGrid
from samadapt.errors import InputError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LABEL_FOLDERS = ("labels", "masks")


@dataclass
class Tile:
    """One tile: (t, t, 3) uint8 pixels, (t, t) int32 object ids (0: none) and each id's class."""

    image: np.ndarray
    ids: np.ndarray
    classes: dict[int, int]
    source: str
    window: tuple[int, int, int, int]  # col, row, width, height in the source raster


def _open(path: Path, bands: Sequence[int] | None) -> GeoRaster:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as probe:
            eight_bit = probe.dtypes[0] == "uint8"
        return GeoRaster.open(path, bands=bands, value_range=(0.0, 255.0) if eight_bit else None)


def components(
    labels: np.ndarray, values: Sequence[int] | None, min_area: int
) -> tuple[np.ndarray, dict[int, int]]:
    """Objects of a label map: connected components (4-connectivity) of each label value.

    Args:
        labels: (h, w) integer label map (0: background).
        values: label values of the classes (class index = position); None: every nonzero value is
            class 0 (a binary map such as building footprints).
        min_area: smaller components are dropped.

    Returns:
        ((h, w) int32 object ids, {id: class index}).
    """
    from scipy import ndimage  # only label rasters need it

    ids = np.zeros(labels.shape, np.int32)
    classes: dict[int, int] = {}
    present = [int(v) for v in np.unique(labels) if v != 0]
    if values is None:  # every value is class 0; touching objects of two values stay two objects
        groups = [(0, labels == v) for v in present]
    else:
        groups = [(list(values).index(v), labels == v) for v in present if v in values]
    for cls, region in groups:
        found, count = ndimage.label(region)
        for k in range(1, count + 1):
            part = found == k
            if int(part.sum()) >= min_area:
                new = len(classes) + 1
                ids[part] = new
                classes[new] = cls
    return ids, classes


def _read_vectors(path: Path, raster: GeoRaster, class_field: str | None, values: Sequence[str] | None):
    """Features of a polygon file in the raster's CRS: list of (shapely geometry, class index)."""
    import pyogrio
    from rasterio.warp import transform_geom

    try:
        meta, _, geometry, fields = pyogrio.raw.read(path)
    except Exception as exc:  # pyogrio raises several types for unreadable files
        raise InputError(f"cannot read polygons from {path.name}: {exc}") from exc
    names = list(meta["fields"])
    if class_field is not None and class_field not in names:
        raise InputError(f"{path.name} has no field {class_field!r} (fields: {', '.join(names)})")
    column = fields[names.index(class_field)] if class_field is not None else None
    source = meta.get("crs")
    out = []
    for i, wkb in enumerate(geometry):
        if wkb is None:
            continue
        geom = shapely.from_wkb(wkb)
        if source and raster.crs is not None:
            geom = shapely.geometry.shape(transform_geom(source, raster.crs, shapely.geometry.mapping(geom)))
        if geom.is_empty or geom.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        cls = 0
        if column is not None:
            value = str(column[i])
            if values is not None and value not in values:
                continue
            cls = 0 if values is None else list(values).index(value)
        out.append((geom, cls))
    return out


def _polygon_tile(features: list, transform: Any, size: tuple[int, int], min_area: int):
    """Rasterize the features touching one window: ((h, w) int32 ids, {id: class})."""
    height, width = size
    ids = np.zeros(size, np.int32)
    classes: dict[int, int] = {}
    left, top = transform @ (0, 0)
    right, bottom = transform @ (width, height)
    box = shapely.box(min(left, right), min(top, bottom), max(left, right), max(top, bottom))
    for geom, cls in features:
        if not geom.intersects(box):
            continue
        burnt = rasterize([(geom, 1)], out_shape=size, transform=transform, fill=0, dtype="uint8")
        region = (burnt > 0) & (ids == 0)
        if int(region.sum()) >= min_area:
            new = len(classes) + 1
            ids[region] = new
            classes[new] = cls
    return ids, classes


def _label_tile(labels: Any, window: Window, values: Sequence[int] | None, min_area: int):
    data = labels.read(1, window=window, boundless=True, fill_value=0)
    return components(data, values, min_area)


def _regions(width: int, height: int, val_fraction: float) -> tuple[tuple[int, int, int, int], ...]:
    """(col0, row0, col1, row1) of the training and (if any) validation regions of one raster."""
    split = width - round(width * val_fraction)
    if val_fraction <= 0 or split <= 0 or split >= width:
        return ((0, 0, width, height),)
    return (0, 0, split, height), (split, 0, width, height)


def _inside(window: Window, region: tuple[int, int, int, int]) -> np.ndarray:
    """(h, w) bool: the pixels of ``window`` inside ``region`` (col0, row0, col1, row1)."""
    cols = np.arange(int(window.col_off), int(window.col_off) + int(window.width))
    rows = np.arange(int(window.row_off), int(window.row_off) + int(window.height))
    c0, r0, c1, r1 = region
    return ((rows >= r0) & (rows < r1))[:, None] & ((cols >= c0) & (cols < c1))[None, :]


def _tiles_in(region: tuple[int, int, int, int], tile: int, overlap: int) -> list[Window]:
    c0, r0, c1, r1 = region
    grid = TileGrid(c1 - c0, r1 - r0, tile, overlap)
    return [Window(c0 + w.col_off, r0 + w.row_off, w.width, w.height) for _, _, w in grid]


def raster_tiles(
    image: str | Path,
    *,
    labels: str | Path | None = None,
    vectors: str | Path | None = None,
    class_field: str | None = None,
    classes: Sequence[Any] | None = None,
    bands: Sequence[int] | None = None,
    tile: int = 256,
    overlap: int = 0,
    val_fraction: float = 0.2,
    min_area: int = 16,
) -> tuple[list[Tile], list[Tile]]:
    """Training and validation tiles of one raster with objects from a label raster or polygons.

    Returns:
        (training tiles, validation tiles); only tiles holding at least one object are kept.
    """
    if (labels is None) == (vectors is None):
        raise InputError("give exactly one of a label raster (labels) or a polygon file (vectors)")
    image = Path(image)
    out: tuple[list[Tile], list[Tile]] = ([], [])
    with _open(image, bands) as raster:
        if labels is not None:
            label_path = Path(labels)
            if not label_path.is_file():
                raise InputError(f"label raster not found: {label_path}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                source = rasterio.open(label_path)
            if (source.width, source.height) != (raster.width, raster.height):
                source.close()
                raise InputError(
                    f"{label_path.name} is {source.width}x{source.height}, the image "
                    f"{raster.width}x{raster.height}: label rasters must be aligned"
                )
            values = None if classes is None else [int(v) for v in classes]
        else:
            vector_path = Path(vectors)  # type: ignore[arg-type]
            if not vector_path.is_file():
                raise InputError(f"polygon file not found: {vector_path}")
            names = None if classes is None else [str(v) for v in classes]
            features = _read_vectors(vector_path, raster, class_field, names)
        try:
            for split, region in enumerate(_regions(raster.width, raster.height, val_fraction)):
                for window in _tiles_in(region, tile, overlap):
                    if labels is not None:
                        ids, found = _label_tile(source, window, values, min_area)
                    else:
                        ids, found = _polygon_tile(
                            features, raster.window_transform(window), (tile, tile), min_area
                        )
                    if not found:
                        continue
                    pixels, valid = raster.read(window)
                    valid &= _inside(window, region)  # a tile past its region never sees the other one
                    pixels[~valid] = 0
                    ids[~valid] = 0
                    if not (ids > 0).any():
                        continue
                    w = tuple(int(v) for v in (window.col_off, window.row_off, window.width, window.height))
                    out[split].append(Tile(pixels, ids, found, image.name, w))  # type: ignore[arg-type]
        finally:
            if labels is not None:
                source.close()
    return out


def coco_tiles(
    path: str | Path,
    *,
    classes: Sequence[Any] | None = None,
    bands: Sequence[int] | None = None,
    tile: int = 256,
    overlap: int = 0,
    val_fraction: float = 0.2,
    min_area: int = 16,
    seed: int = 0,
) -> tuple[list[Tile], list[Tile]]:
    """Tiles of the images of a COCO JSON file with polygon segmentations, split by whole image.

    Args:
        classes: category ids to keep, in class-index order (default: every category, sorted by id).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        images, annotations = data["images"], data["annotations"]
        categories = sorted(int(c["id"]) for c in data.get("categories", []))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path.name} is not a COCO JSON file ({exc.__class__.__name__}: {exc})") from None
    wanted = [int(c) for c in classes] if classes is not None else categories
    by_image: dict[int, list[dict]] = {}
    for ann in annotations:
        if int(ann["category_id"]) in wanted and not ann.get("iscrowd", 0):
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = 0 if val_fraction <= 0 or len(images) < 2 else max(1, round(len(images) * val_fraction))
    val_ids = {int(images[i]["id"]) for i in order[:n_val]}
    out: tuple[list[Tile], list[Tile]] = ([], [])
    for info in images:
        image_path = path.parent / info["file_name"]
        shapes = []
        for ann in by_image.get(int(info["id"]), []):
            seg = ann.get("segmentation")
            if not isinstance(seg, list):
                raise InputError(
                    f"{path.name}: annotation {ann.get('id')} is not a polygon (RLE is not supported)"
                )
            parts = [shapely.Polygon(np.asarray(p, float).reshape(-1, 2)) for p in seg if len(p) >= 6]
            if parts:
                shapes.append((shapely.MultiPolygon(parts).buffer(0), wanted.index(int(ann["category_id"]))))
        with _open(image_path, bands) as raster:
            split = 1 if int(info["id"]) in val_ids else 0
            for window in _tiles_in((0, 0, raster.width, raster.height), tile, overlap):
                pixel_frame = window_transform(window, rasterio.Affine.identity())
                ids, found = _polygon_tile(shapes, pixel_frame, (tile, tile), min_area)
                if not found:
                    continue
                pixels, valid = raster.read(window)
                ids[~valid] = 0
                w = (int(window.col_off), int(window.row_off), tile, tile)
                out[split].append(Tile(pixels, ids, found, image_path.name, w))
    return out
