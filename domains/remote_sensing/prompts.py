"""Prompts in map coordinates: from the command line (any CRS) or a vector file, in the raster's CRS.

Every prompt is reprojected to the raster's CRS once, here, and kept in map units (:class:`MapPrompt`);
:func:`to_pixels` turns it into pixel coordinates of any grid (the file's, or a resampled working grid).

Coordinates are always (x, y) in the CRS's traditional GIS order: (easting, northing) for projected
CRSs and (longitude, latitude) for EPSG:4326, whatever the CRS's official axis order says.

Boxes are reprojected as envelopes of their densified outline (``transform_bounds``), polygons from a
file as the envelope of their densified reprojected outline, so a box stays the box of the same area on
the ground. Prompts outside the raster are never clipped: command-line prompts outside raise
:class:`~samadapt.errors.InputError`; file features outside are skipped and their ids returned.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from samadapt.domains.remote_sensing.raster import GeoRaster, one_line
from samadapt.errors import InputError, MissingDependencyError

try:
    import pyogrio
    import shapely
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.warp import transform as warp_transform
    from rasterio.warp import transform_bounds
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "pyogrio/shapely/rasterio are not installed; install them with: pip install 'samadapt[geo]'"
    ) from _exc

__all__ = ["VECTOR_SUFFIXES", "MapPrompt", "cli_prompts", "parse_crs", "to_pixels", "vector_prompts"]

#: File name endings :func:`vector_prompts` reads.
VECTOR_SUFFIXES: tuple[str, ...] = (".geojson", ".json", ".gpkg", ".shp", ".fgb")
# Points per edge when densifying outlines before reprojection.
_DENSIFY = 21


@dataclass(frozen=True)
class MapPrompt:
    """One prompt in the raster's CRS.

    Attributes:
        kind: ``"box"`` or ``"point"``.
        coords: box (minx, miny, maxx, maxy) or point (x, y), map units of the raster's CRS.
        label: for points, 1 foreground, 0 background (boxes: 1).
        feature_id: the id of the vector feature it came from (None for command-line prompts).
    """

    kind: Literal["box", "point"]
    coords: tuple[float, ...]
    label: int = 1
    feature_id: str | None = None


def parse_crs(text: str) -> Any:
    """A :class:`rasterio.crs.CRS` from ``EPSG:4326``, a WKT string or PROJ string; InputError if invalid."""
    try:
        return CRS.from_user_input(text)
    except (CRSError, ValueError, TypeError) as exc:
        raise InputError(f"unknown CRS {text!r}: {one_line(exc)}") from exc


def _apply(t: Affine, x: float, y: float) -> tuple[float, float]:
    """``t`` applied to (x, y), without the operator whose spelling changed between affine releases."""
    return t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f


def to_pixels(prompt: MapPrompt, transform: Affine) -> np.ndarray:
    """Pixel coordinates of a prompt on the grid of ``transform`` (column, row; pixel corners at integers).

    Works for any affine (south-up, rotated): a box becomes the pixel-space envelope of its four corners.

    Returns:
        box: (4,) float64 ``x0, y0, x1, y1`` with ``x0 < x1`` and ``y0 < y1``; point: (2,) ``x, y``.
    """
    inverse = ~transform
    if prompt.kind == "point":
        return np.array(_apply(inverse, prompt.coords[0], prompt.coords[1]), dtype=np.float64)
    minx, miny, maxx, maxy = prompt.coords
    corners = np.array([_apply(inverse, x, y) for x in (minx, maxx) for y in (miny, maxy)])  # (4, 2) col,row
    return np.array(
        [corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()], dtype=np.float64
    )


def _overlaps(prompt: MapPrompt, raster: GeoRaster) -> bool:
    """Whether a box overlaps the raster (area > 0), or a point lies inside it."""
    pixels = to_pixels(prompt, raster.transform)
    if prompt.kind == "point":
        return bool(0 <= pixels[0] < raster.width and 0 <= pixels[1] < raster.height)
    x0, y0, x1, y1 = pixels
    return bool(x0 < raster.width and x1 > 0 and y0 < raster.height and y1 > 0)


def _target_crs(raster: GeoRaster, what: str) -> Any:
    if raster.crs is None:
        raise InputError(f"{what} needs a raster with a CRS; {raster.path.name} has none")
    return raster.crs


def _check_finite(values: Sequence[float], what: str) -> None:
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"{what} does not land in the raster's CRS (non-finite after reprojection)")


def cli_prompts(
    boxes: list[list[float]] | None,
    points: list[list[float]] | None,
    crs: str | None,
    raster: GeoRaster,
) -> list[MapPrompt]:
    """Prompts from ``--box MINX MINY MAXX MAXY`` and ``--point X Y [LABEL]`` given in ``crs``.

    Args:
        boxes: each [minx, miny, maxx, maxy] in ``crs``.
        points: each [x, y] or [x, y, label] (label 1 foreground, 0 background) in ``crs``.
        crs: the prompts' CRS (``"EPSG:4326"``, WKT, PROJ), or None for the raster's own.
        raster: the raster the prompts are for.

    Returns:
        Boxes first, then points, in the raster's CRS.

    Raises:
        InputError: malformed numbers, an unknown CRS, or a prompt that lies outside the raster.
    """
    source = parse_crs(crs) if crs is not None else None
    target = raster.crs
    if source is not None:
        target = _target_crs(raster, "--crs")
    same = source is None or source == target
    prompts: list[MapPrompt] = []
    for i, box in enumerate(boxes or [], start=1):
        if len(box) != 4:
            raise InputError(f"--box {i} needs 4 numbers MINX MINY MAXX MAXY, got {len(box)}")
        minx, miny, maxx, maxy = (float(v) for v in box)
        _check_finite((minx, miny, maxx, maxy), f"--box {i}")
        if not (minx < maxx and miny < maxy):
            raise InputError(
                f"--box {i} must have MINX < MAXX and MINY < MAXY, got {minx} {miny} {maxx} {maxy}"
            )
        if not same:
            minx, miny, maxx, maxy = transform_bounds(
                source, target, minx, miny, maxx, maxy, densify_pts=_DENSIFY
            )
            _check_finite((minx, miny, maxx, maxy), f"--box {i}")
        prompt = MapPrompt("box", (minx, miny, maxx, maxy))
        if not _overlaps(prompt, raster):
            raise InputError(f"--box {i} lies outside the raster (bounds {_fmt(raster.bounds)} in its CRS)")
        prompts.append(prompt)
    for i, point in enumerate(points or [], start=1):
        if len(point) not in (2, 3):
            raise InputError(f"--point {i} needs X Y (and optionally a label 0/1), got {len(point)} numbers")
        label = int(point[2]) if len(point) == 3 else 1
        if label not in (0, 1):
            raise InputError(f"--point {i} label must be 1 (foreground) or 0 (background), got {point[2]}")
        x, y = float(point[0]), float(point[1])
        _check_finite((x, y), f"--point {i}")
        if not same:
            xs, ys = warp_transform(source, target, [x], [y])
            x, y = float(xs[0]), float(ys[0])
            _check_finite((x, y), f"--point {i}")
        prompt = MapPrompt("point", (x, y), label=label)
        if not _overlaps(prompt, raster):
            raise InputError(f"--point {i} lies outside the raster (bounds {_fmt(raster.bounds)} in its CRS)")
        prompts.append(prompt)
    return prompts


def _fmt(bounds: Sequence[float]) -> str:
    return " ".join(f"{v:.6g}" for v in bounds)


def _read_layer(path: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray, list[np.ndarray]]:
    """(meta, fids, WKB geometries, field arrays) of the first layer with geometry."""
    try:
        layers = pyogrio.list_layers(path)
        with_geometry = [str(name) for name, geom in layers if geom is not None]
        if not with_geometry:
            raise InputError(f"{path.name} has no layer with geometries")
        meta, fids, geometry, fields = pyogrio.raw.read(path, layer=with_geometry[0], return_fids=True)
    except InputError:
        raise
    except Exception as exc:  # pyogrio raises DataSourceError/DataLayerError/GDAL errors
        raise InputError(f"cannot read vector prompts {path.name}: {one_line(exc)}") from exc
    return meta, fids, geometry, fields


def _feature_ids(meta: dict[str, Any], fids: np.ndarray, fields: list[np.ndarray]) -> list[str]:
    """Each feature's ``id`` field (case-insensitive) when the file has one, else its FID."""
    names = [str(n).lower() for n in meta["fields"]]
    if "id" in names:
        column = fields[names.index("id")]
        return [str(v) if v is not None else str(f) for v, f in zip(column, fids, strict=True)]
    return [str(int(f)) for f in fids]


def _labels(meta: dict[str, Any], fields: list[np.ndarray], count: int) -> list[int]:
    """Point labels from a ``label`` field (1 foreground, 0 background); 1 when absent or empty."""
    names = [str(n).lower() for n in meta["fields"]]
    if "label" not in names:
        return [1] * count
    out = []
    for value in fields[names.index("label")]:
        try:
            out.append(0 if value is not None and int(value) == 0 else 1)
        except (TypeError, ValueError):
            out.append(1)
    return out


def _reproject(geometry: Any, source: Any, target: Any) -> Any:
    """``geometry`` with every (densified) vertex transformed from ``source`` to ``target``."""
    if source == target:
        return geometry
    if not isinstance(geometry, shapely.Point | shapely.MultiPoint):
        minx, miny, maxx, maxy = geometry.bounds
        step = max(maxx - minx, maxy - miny) / (_DENSIFY - 1)
        if step > 0:
            geometry = shapely.segmentize(geometry, step)

    def convert(xy: np.ndarray) -> np.ndarray:  # (N, 2) -> (N, 2)
        xs, ys = warp_transform(source, target, xy[:, 0].tolist(), xy[:, 1].tolist())
        return np.column_stack([xs, ys])

    return shapely.transform(geometry, convert)


def vector_prompts(path: str | os.PathLike[str], raster: GeoRaster) -> tuple[list[MapPrompt], list[str]]:
    """Prompts from a vector file: each polygon/line's bounding box, each point as a point prompt.

    Reads the first layer with geometries of a GeoJSON, GeoPackage, Shapefile or FlatGeobuf file with
    pyogrio, reprojects from the layer's CRS (a layer without CRS is taken to be in the raster's) and
    takes the bounding box after reprojection. A MultiPoint gives one point prompt per part (all parts
    must lie in the raster, or the feature is skipped); a
    ``label`` field (0/1) sets point labels. Feature ids: the ``id`` field if any, else the FID.

    Returns:
        (prompts in file order, ids of the features skipped: outside the raster or without geometry).

    Raises:
        InputError: missing/unreadable file, unknown format, or coordinates that do not fit the layer's CRS.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"vector prompts not found: {path}")
    if path.suffix.lower() not in VECTOR_SUFFIXES:
        raise InputError(f"vector prompts must end in one of {', '.join(VECTOR_SUFFIXES)}: {path.name}")
    meta, fids, wkb, fields = _read_layer(path)
    ids = _feature_ids(meta, fids, fields)
    labels = _labels(meta, fields, len(ids))
    geometries = shapely.from_wkb(wkb)  # None stays None
    source = parse_crs(meta["crs"]) if meta.get("crs") else raster.crs
    target = raster.crs if raster.crs is not None else source
    if source is not None and target is not None and source != target:
        _check_lonlat(source, geometries, path)
    prompts: list[MapPrompt] = []
    skipped: list[str] = []
    for geometry, feature_id, label in zip(geometries, ids, labels, strict=True):
        if geometry is None or geometry.is_empty:
            skipped.append(feature_id)
            continue
        moved = (
            _reproject(geometry, source, target) if source is not None and target is not None else geometry
        )
        if isinstance(moved, shapely.Point | shapely.MultiPoint):
            parts = [
                MapPrompt("point", (float(p.x), float(p.y)), label=label, feature_id=feature_id)
                for p in getattr(moved, "geoms", [moved])
            ]
        else:
            parts = [MapPrompt("box", tuple(float(v) for v in moved.bounds), feature_id=feature_id)]
        if not all(all(math.isfinite(v) for v in p.coords) for p in parts):
            skipped.append(feature_id)
            continue
        if not all(_overlaps(p, raster) for p in parts):  # a MultiPoint is kept whole or skipped whole
            skipped.append(feature_id)
            continue
        prompts.extend(parts)
    return prompts, skipped


def _check_lonlat(source: Any, geometries: np.ndarray, path: Path) -> None:
    """Refuse a geographic layer whose coordinates are not longitudes/latitudes (a mislabelled file)."""
    if not source.is_geographic:
        return
    present = [g for g in geometries if g is not None and not g.is_empty]
    if not present:
        return
    minx, miny, maxx, maxy = shapely.total_bounds(np.asarray(present, dtype=object))
    if minx < -180.0 or maxx > 360.0 or miny < -90.0 or maxy > 90.0:
        raise InputError(
            f"{path.name} says its CRS is geographic but holds coordinates like {minx:.6g} {miny:.6g}:"
            " give the file its real CRS"
        )
