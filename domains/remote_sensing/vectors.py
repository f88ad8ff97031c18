"""Instance rasters to polygons, and polygons to GeoPackage / GeoJSON / FlatGeobuf / Shapefile.

:func:`polygonize` runs :func:`rasterio.features.shapes` chunk by chunk (block-aligned, so memory is
bounded by one chunk plus the polygons) in *pixel* coordinates, where the pieces of one instance from
neighbouring chunks share exact integer edges and dissolve without slivers; the dissolved geometry is
then mapped to map coordinates with the raster's affine transform.

:func:`write_vectors` writes one feature per instance with fields ``id``, ``score``, ``area`` and
``feature_id`` (when prompts came from a file), plus any other scalar fields the records carry
(``class`` from an instance adapter, say). ``area`` is in m²: map units² times the CRS's unit
factor, or measured on a local equal-area projection for geographic CRSs (plain map units² only for
a raster without CRS). The file keeps the raster's CRS; GeoJSON too, except with ``rfc7946=True``
or a CRS without EPSG code, which GDAL's GeoJSON writer cannot store: such layers are reprojected to
WGS84 as RFC 7946 asks (areas are computed before). The file is written under a temporary name and
renamed, and is a valid empty layer when nothing was found.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.domains.remote_sensing.raster import one_line
from samadapt.errors import InputError, MissingDependencyError

try:
    import pyogrio
    import rasterio
    import rasterio.features
    import shapely
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.errors import CRSError, RasterioError
    from rasterio.warp import transform_geom
    from rasterio.windows import Window
    from shapely.geometry import mapping, shape
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "rasterio/shapely/pyogrio are not installed; install them with: pip install 'samadapt[geo]'"
    ) from _exc

__all__ = ["VECTOR_DRIVERS", "area_of", "polygonize", "write_vectors"]

#: Output file ending -> OGR driver.
VECTOR_DRIVERS: dict[str, str] = {
    ".gpkg": "GPKG",
    ".geojson": "GeoJSON",
    ".json": "GeoJSON",
    ".fgb": "FlatGeobuf",
    ".shp": "ESRI Shapefile",
}
# Side of the chunks polygonize reads (rounded up to whole blocks).
_CHUNK = 2048
_SHAPES_DTYPES = ("int16", "int32", "uint8", "uint16")


def _chunks(width: int, height: int, block: tuple[int, int]) -> Iterator[Window]:
    """Block-aligned windows of about _CHUNK x _CHUNK covering a width x height grid."""
    rows = max(block[0], (_CHUNK // block[0]) * block[0])
    cols = max(block[1], (_CHUNK // block[1]) * block[1])
    for row in range(0, height, rows):
        for col in range(0, width, cols):
            yield Window(col, row, min(cols, width - col), min(rows, height - row))


def _shapes_of(labels: np.ndarray, valid: np.ndarray, col: int, row: int) -> Iterator[tuple[int, Any]]:
    """(id, polygon in pixel coordinates of the full grid) for every region of ``labels`` where valid."""
    if labels.dtype.name not in _SHAPES_DTYPES:
        if labels.size and labels.max(initial=0) > np.iinfo(np.int32).max:
            raise InputError("instance ids above 2**31-1 cannot be polygonized")
        labels = labels.astype(np.int32)
    offset = Affine.translation(col, row)
    for geometry, value in rasterio.features.shapes(labels, mask=valid, connectivity=4, transform=offset):
        yield int(value), shape(geometry)


def polygonize(
    labels: str | os.PathLike[str] | np.ndarray,
    transform: Affine | None = None,
    window: Window | None = None,
) -> dict[int, Any]:
    """One (multi)polygon in map coordinates per instance id > 0.

    Args:
        labels: an instance-id/mask GeoTIFF (read chunk by chunk; its nodata is ignored) or an
            (h, w) integer array (ids > 0; 0 and negatives are background).
        transform: pixel -> map affine of the full raster; for a file, defaults to the file's.
        window: for an array, where it sits in the full raster (default: at 0, 0); for a file,
            the part to polygonize (default: all of it).

    Returns:
        {id: shapely Polygon or MultiPolygon}, ids sorted ascending.
    """
    pieces: dict[int, list[Any]] = {}
    if isinstance(labels, np.ndarray):
        if transform is None:
            raise ValueError("polygonize of an array needs its transform")
        if labels.ndim != 2:
            raise ValueError(f"expected an (h, w) label array, got shape {labels.shape}")
        col, row = (0, 0) if window is None else (int(window.col_off), int(window.row_off))
        for value, geometry in _shapes_of(labels, labels > 0, col, row):
            pieces.setdefault(value, []).append(geometry)
    else:
        path = Path(labels)
        try:
            with rasterio.open(path) as src:
                transform = src.transform if transform is None else transform
                area = window or Window(0, 0, src.width, src.height)
                for chunk in _chunks(int(area.width), int(area.height), src.block_shapes[0]):
                    chunk = Window(
                        chunk.col_off + area.col_off, chunk.row_off + area.row_off, chunk.width, chunk.height
                    )
                    block = src.read(1, window=chunk)
                    valid = block > 0
                    if src.nodata is not None:
                        valid &= block != src.nodata
                    if not valid.any():
                        continue
                    for value, geometry in _shapes_of(block, valid, int(chunk.col_off), int(chunk.row_off)):
                        pieces.setdefault(value, []).append(geometry)
        except RasterioError as exc:
            raise InputError(f"cannot read {path.name}: {one_line(exc)}") from exc
    assert transform is not None
    matrix = [transform.a, transform.b, transform.d, transform.e, transform.xoff, transform.yoff]
    out: dict[int, Any] = {}
    for value in sorted(pieces):
        merged = shapely.union_all(pieces[value]) if len(pieces[value]) > 1 else pieces[value][0]
        out[value] = shapely.affinity.affine_transform(merged, matrix)
    return out


def area_of(geometry: Any, crs: Any) -> float:
    """Area of ``geometry`` in m² (any CRS with known units), or in map units² without a CRS.

    Projected CRSs: map units² times the squared unit factor (feet -> metres). Geographic CRSs: the
    area on a Lambert azimuthal equal-area projection centred on the geometry.
    """
    if crs is None:
        return float(geometry.area)
    if crs.is_geographic:
        centre = geometry.centroid
        laea = CRS.from_proj4(
            f"+proj=laea +lat_0={centre.y} +lon_0={centre.x} +datum=WGS84 +units=m +no_defs"
        )
        return float(shape(transform_geom(crs, laea, mapping(geometry))).area)
    try:
        factor = float(crs.linear_units_factor[1])
    except (CRSError, TypeError, IndexError):
        factor = 1.0
    return float(geometry.area) * factor * factor


def _multi(geometry: Any) -> Any:
    return shapely.MultiPolygon([geometry]) if isinstance(geometry, shapely.Polygon) else geometry


def _field_array(values: list[Any]) -> np.ndarray:
    """A column for pyogrio: int64, float64 or str (object)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool | np.bool_) for v in present):
        return np.asarray([int(bool(v)) if v is not None else 0 for v in values], dtype=np.int64)
    if present and all(isinstance(v, int | np.integer) for v in present) and len(present) == len(values):
        return np.asarray(values, dtype=np.int64)
    if present and all(isinstance(v, int | float | np.integer | np.floating) for v in present):
        return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return np.asarray([None if v is None else str(v) for v in values], dtype=object)


def write_vectors(
    path: str | os.PathLike[str],
    polygons: Mapping[int, Any],
    records: Mapping[int, Mapping[str, Any]],
    crs: Any,
    simplify: float | None = None,
    layer: str | None = None,
    rfc7946: bool = False,
) -> None:
    """Write one MultiPolygon feature per instance, driver chosen by the file ending.

    Args:
        path: ``.gpkg``, ``.geojson``/``.json``, ``.fgb`` or ``.shp``; its folder must exist.
        polygons: {id: Polygon/MultiPolygon in ``crs``}; empty geometries are left out.
        records: {id: {"score": float, "feature_id": str, ...}}; missing ids get empty fields.
        crs: the polygons' CRS (a rasterio CRS or anything CRS.from_user_input takes), or None.
        simplify: tolerance in map units for ``simplify(preserve_topology=True)``, or None.
        layer: layer name (default: the file stem).
        rfc7946: GeoJSON only: write RFC 7946 GeoJSON (reprojected to WGS84 by GDAL); automatic when
            the CRS has no EPSG code.

    Raises:
        InputError: unknown file ending, missing folder, or a GDAL write error.
    """
    path = Path(path)
    driver = VECTOR_DRIVERS.get(path.suffix.lower())
    if driver is None:
        raise InputError(f"vector output must end in one of {', '.join(VECTOR_DRIVERS)}: {path.name}")
    if not path.parent.is_dir():
        raise InputError(f"output folder does not exist: {path.parent}")
    if simplify is not None and not simplify > 0:
        raise InputError(f"--simplify must be a positive distance in map units, got {simplify}")
    crs_obj = crs if crs is None or isinstance(crs, CRS) else CRS.from_user_input(crs)
    ids, geometries = [], []
    for value in sorted(polygons):
        geometry = polygons[value]
        if simplify is not None:
            geometry = geometry.simplify(simplify, preserve_topology=True)
        if geometry is None or geometry.is_empty:
            continue
        ids.append(int(value))
        geometries.append(_multi(geometry))
    extra = sorted({k for r in records.values() for k in r} - {"id", "score", "area", "feature_id"})
    names = ["id", "score", "area"]
    columns: list[np.ndarray] = [
        np.asarray(ids, dtype=np.int64),
        np.asarray([float(records.get(i, {}).get("score", np.nan)) for i in ids], dtype=np.float64),
        np.asarray([area_of(g, crs_obj) for g in geometries], dtype=np.float64),
    ]
    if any("feature_id" in r for r in records.values()):
        names.append("feature_id")
        columns.append(
            np.asarray(
                [None if (v := records.get(i, {}).get("feature_id")) is None else str(v) for i in ids],
                dtype=object,
            )
        )
    for key in extra:
        names.append(key)
        columns.append(_field_array([records.get(i, {}).get(key) for i in ids]))
    wkb = np.asarray(shapely.to_wkb(np.asarray(geometries, dtype=object)) if geometries else [], dtype=object)
    options: dict[str, Any] = {}
    # GDAL's GeoJSON writer keeps only EPSG-coded CRSs (others would be read back as WGS84 without
    # warning): such layers are written as RFC 7946 GeoJSON, i.e. reprojected to WGS84 by GDAL.
    if driver == "GeoJSON" and (rfc7946 or (crs_obj is not None and crs_obj.to_epsg() is None)):
        options["layer_options"] = {"RFC7946": "YES"}
    _atomic_vector(
        path,
        lambda target: pyogrio.raw.write(
            target,
            wkb,
            columns,
            names,
            layer=layer or path.stem,
            driver=driver,
            geometry_type="MultiPolygon",
            crs=crs_obj.to_wkt() if crs_obj is not None else None,
            **options,
        ),
    )


def _atomic_vector(path: Path, write: Any) -> None:
    """Run ``write(tmp_path)`` in a temporary folder next to ``path``, then rename every file it made."""
    folder = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        target = folder / path.name
        try:
            write(target)
        except Exception as exc:  # pyogrio/GDAL errors
            raise InputError(f"cannot write {path.name}: {one_line(exc)}") from exc
        made = sorted(folder.iterdir())
        for item in made:  # sidecars first (.shx/.dbf/.prj) so the main file appears last
            if item.name != path.name:
                os.replace(item, path.parent / item.name)
        os.replace(target, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
