"""Read GeoTIFFs (any size, dtype and CRS) window by window as 8-bit RGB for SAM, with a validity mask.

:class:`GeoRaster` wraps one rasterio dataset. At open it computes ONE global :class:`Stretch` for the
raster (per-band percentiles of a decimated read, nodata, internal masks and NaNs left out), so every
window of the raster is mapped to uint8 the same way: no seams from per-tile min-max.

Band selection is 1-based (``bands=(3, 2, 1)``); by default the first three bands (or the one or two
there are). One band becomes gray (copied to R, G and B); two bands become ``(b1, b2, b1)``, the usual
false colour of dual-polarisation SAR.

Target resolution (``resolution=``, map units of the raster's CRS, normally metres): the raster is read
through a :class:`rasterio.vrt.WarpedVRT` on a north-up grid with square pixels of that size (average
resampling when coarser than the file, bilinear when finer). ``width``, ``height``, ``transform`` and
``res`` then describe that working grid, and ``source_width``, ``source_height``, ``source_transform``
the file's own grid. Writers built ``like`` such a raster (:class:`~.writers.GeoTiffWriter`) accept
windows of the working grid and resample the finished output back to the file's grid (nearest), so
outputs always have the input's CRS, transform and shape.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from samadapt.errors import InputError, MissingDependencyError

try:
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.errors import NodataShadowWarning, RasterioError
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "rasterio is not installed; install it with: pip install 'samadapt[geo]'"
    ) from _exc

__all__ = ["SUPPORTED_DTYPES", "GeoRaster", "Stretch", "one_line"]

#: Sample types GeoRaster reads (complex data is refused).
SUPPORTED_DTYPES: tuple[str, ...] = (
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "float32",
    "float64",
)
# Longest side of the decimated read the stretch statistics come from.
_STATS_SIDE = 1024
_HASH_CHUNK = 1 << 20


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most 200 characters (for user-facing errors)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _rgb_order(count: int) -> list[int]:
    """Indices into the selected bands that make R, G, B: 1 -> (0,0,0), 2 -> (0,1,0), >=3 -> (0,1,2)."""
    if count == 1:
        return [0, 0, 0]
    if count == 2:
        return [0, 1, 0]
    return [0, 1, 2]


@dataclass(frozen=True)
class Stretch:
    """A linear map of each selected band from ``[low, high]`` to ``[0, 255]``, the same for every window.

    Attributes:
        low: (B,) float64, the value that maps to 0 for each selected band.
        high: (B,) float64, the value that maps to 255 (always > ``low``).
        percentiles: the percentiles ``low``/``high`` came from, or None for a fixed value range.
    """

    low: np.ndarray
    high: np.ndarray
    percentiles: tuple[float, float] | None = None

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Map (B, h, w) samples of any numeric dtype to an (h, w, 3) uint8 RGB image.

        B == 1 gives gray (band copied three times), B == 2 gives (b1, b2, b1), B >= 3 uses the first
        three bands. Values are clipped to ``[low, high]``; NaNs become 0.
        """
        if data.ndim != 3 or data.shape[0] != len(self.low):
            raise ValueError(f"expected ({len(self.low)}, h, w) samples, got shape {data.shape}")
        out = np.empty((data.shape[1], data.shape[2], 3), dtype=np.uint8)
        scaled: dict[int, np.ndarray] = {}
        for channel, band in enumerate(_rgb_order(data.shape[0])):
            if band not in scaled:
                low, high = float(self.low[band]), float(self.high[band])
                values = data[band].astype(np.float64)  # (h, w)
                values = (values - low) * (255.0 / (high - low))
                np.clip(values, 0.0, 255.0, out=values)
                values = np.nan_to_num(values, nan=0.0)
                scaled[band] = np.rint(values).astype(np.uint8)
            out[..., channel] = scaled[band]
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (``geo info``, cache keys)."""
        return {
            "percentiles": list(self.percentiles) if self.percentiles is not None else None,
            "low": [float(v) for v in self.low],
            "high": [float(v) for v in self.high],
        }


class GeoRaster:
    """One GeoTIFF (or any GDAL raster) opened for windowed reads; use :meth:`open` and ``with``.

    One instance holds one GDAL handle: use one instance per thread. Memory is bounded by the window
    read plus GDAL's block cache (``GDAL_CACHEMAX``; set it with ``rasterio.Env`` to cap it).

    Attributes:
        path: the file.
        width, height: size in pixels of the working grid (the file's, or the resampled one).
        crs: the raster's :class:`rasterio.crs.CRS` (None when the file has none).
        transform: affine pixel -> map transform of the working grid.
        nodata: the file's nodata value (None when unset).
        dtype: sample type of the file, e.g. ``"uint16"``.
        count: number of bands in the file.
        bands: the selected bands, 1-based.
        res: (xres, yres) pixel size of the working grid in map units.
        stretch: the global :class:`Stretch` of the selected bands.
        resolution: the target resolution asked for, or None.
        source_width, source_height, source_transform: the file's own grid.
    """

    def __init__(
        self,
        dataset: Any,
        path: Path,
        bands: tuple[int, ...],
        resolution: float | None,
        stretch: Stretch,
        reader: Any,
    ) -> None:
        """Use :meth:`open`; this wires an already opened dataset (and optional WarpedVRT ``reader``)."""
        self._dataset = dataset
        self._reader = reader
        self._key: str | None = None
        self.path = path
        self.bands = bands
        self.resolution = resolution
        self.stretch = stretch
        self.crs = dataset.crs
        self.nodata = dataset.nodata
        self.dtype = str(dataset.dtypes[0])
        self.count = int(dataset.count)
        self.source_width = int(dataset.width)
        self.source_height = int(dataset.height)
        self.source_transform: Affine = dataset.transform
        self.width = int(reader.width)
        self.height = int(reader.height)
        self.transform: Affine = reader.transform
        self.res: tuple[float, float] = (float(reader.res[0]), float(reader.res[1]))

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        bands: Sequence[int] | None = None,
        resolution: float | None = None,
        stretch_percentiles: tuple[float, float] = (2.0, 98.0),
        value_range: tuple[float, float] | None = None,
    ) -> GeoRaster:
        """Open a raster, check it and compute its global stretch.

        Args:
            path: a GeoTIFF (any GDAL raster works).
            bands: 1-based band numbers, at most three (default: the first three, or all if fewer).
            resolution: target pixel size in map units (projected CRS only), or None for the file's grid.
            stretch_percentiles: (low, high) percentiles of the valid samples that map to 0 and 255.
            value_range: a fixed (min, max) used for every band instead of percentiles (e.g. (0, 255)
                to pass 8-bit imagery through unchanged).

        Raises:
            InputError: missing/unreadable file, bad bands, unsupported dtype, a raster without valid
                pixels, or a resolution that cannot be used.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"raster not found: {path}")
        try:
            dataset = rasterio.open(path)
        except RasterioError as exc:
            raise InputError(f"cannot read raster {path.name}: {one_line(exc)}") from exc
        try:
            chosen = _check_bands(dataset, bands)
            _check_dtype(dataset, path)
            reader = dataset if resolution is None else _warped(dataset, resolution)
            stretch = _compute_stretch(dataset, chosen, stretch_percentiles, value_range, path)
        except BaseException:
            dataset.close()
            raise
        return cls(dataset, path, chosen, resolution, stretch, reader)

    def close(self) -> None:
        """Close the file (and the resampling VRT)."""
        if self._reader is not self._dataset:
            self._reader.close()
        self._dataset.close()

    def __enter__(self) -> GeoRaster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ geometry
    @property
    def resampled(self) -> bool:
        """Whether windows refer to a resampled working grid rather than the file's own grid."""
        return self._reader is not self._dataset

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of the working grid in the raster's CRS."""
        b = rasterio.transform.array_bounds(self.height, self.width, self.transform)
        return (b[0], b[1], b[2], b[3])

    @property
    def block_shape(self) -> tuple[int, int]:
        """(rows, cols) of one internal block of the working grid (reads are fastest aligned to it)."""
        rows, cols = self._reader.block_shapes[0]
        return int(rows), int(cols)

    def window_transform(self, window: Window) -> Affine:
        """The affine transform of ``window`` (working grid), e.g. to georeference a tile."""
        t, col, row = self.transform, float(window.col_off), float(window.row_off)
        return Affine(t.a, t.b, t.c + t.a * col + t.b * row, t.d, t.e, t.f + t.d * col + t.e * row)

    def block_windows(self) -> Iterator[Window]:
        """The internal blocks of the working grid, row by row (each clipped to the raster)."""
        for _, window in self._reader.block_windows(self.bands[0]):
            yield window

    # ------------------------------------------------------------------ reading
    def read_raw(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Samples of the selected bands and validity for ``window``; boundless (padded outside).

        Returns:
            (B, h, w) samples in the file's dtype (0 outside the raster) and an (h, w) bool validity
            mask: True where at least one selected band is valid (not nodata, not masked, not NaN)
            and the pixel lies inside the raster.
        """
        col, row, width, height = _int_window(window)
        data = np.zeros((len(self.bands), height, width), dtype=self.dtype)
        valid = np.zeros((height, width), dtype=bool)
        c0, r0 = max(col, 0), max(row, 0)
        c1, r1 = min(col + width, self.width), min(row + height, self.height)
        if c1 <= c0 or r1 <= r0:
            return data, valid
        inner = Window(c0, r0, c1 - c0, r1 - r0)
        try:
            samples = self._reader.read(list(self.bands), window=inner)
            masks = _masks(self._reader, self.bands, window=inner)
        except RasterioError as exc:
            raise InputError(f"cannot read {self.path.name} at {inner}: {one_line(exc)}") from exc
        ok = (masks > 0).any(axis=0)
        if np.issubdtype(samples.dtype, np.floating):
            ok &= ~np.isnan(samples).any(axis=0)
        rows = slice(r0 - row, r1 - row)
        cols = slice(c0 - col, c1 - col)
        data[:, rows, cols] = samples
        valid[rows, cols] = ok
        return data, valid

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """An RGB view of ``window`` through the global stretch, plus validity; boundless.

        A window past the edge keeps its full size: the part outside is black and invalid.

        Returns:
            (h, w, 3) uint8 image (0 where invalid) and (h, w) bool validity mask.
        """
        data, valid = self.read_raw(window)
        image = self.stretch.apply(data)
        image[~valid] = 0
        return image, valid

    # ------------------------------------------------------------------ identity
    def content_key(self) -> str:
        """sha256 of the file's bytes (hex), computed once in 1 MiB chunks (embedding-cache key)."""
        if self._key is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as handle:
                for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                    digest.update(chunk)
            self._key = digest.hexdigest()
        return self._key

    def crs_string(self) -> str | None:
        """``"EPSG:nnnn"`` when the CRS has an EPSG code, else its WKT; None without a CRS."""
        if self.crs is None:
            return None
        epsg = self.crs.to_epsg()
        return f"EPSG:{epsg}" if epsg is not None else self.crs.to_wkt()

    def info_dict(self) -> dict[str, Any]:
        """What ``samadapt geo info`` prints: CRS, size, bands, dtype, nodata, resolution, stretch."""
        nodata: float | str | None = self.nodata
        if self.nodata is not None and math.isnan(self.nodata):
            nodata = "nan"
        info: dict[str, Any] = {
            "path": str(self.path),
            "driver": self._dataset.driver,
            "crs": self.crs_string(),
            "crs_units": None
            if self.crs is None
            else ("degree" if self.crs.is_geographic else self.crs.linear_units),
            "width": self.source_width,
            "height": self.source_height,
            "count": self.count,
            "bands": list(self.bands),
            "dtype": self.dtype,
            "nodata": nodata,
            "res": [float(v) for v in self._dataset.res],
            "transform": list(self.source_transform)[:6],
            "bounds": list(self._dataset.bounds),
            "block_shape": [int(v) for v in self._dataset.block_shapes[0]],
            "stretch": self.stretch.as_dict(),
        }
        if self.resampled:
            info["resolution"] = self.resolution
            info["working_grid"] = {
                "width": self.width,
                "height": self.height,
                "res": list(self.res),
                "transform": list(self.transform)[:6],
            }
        return info

    @property
    def dataset(self) -> Any:
        """The underlying rasterio dataset (the file, not the resampling VRT)."""
        return self._dataset


# ---------------------------------------------------------------------- helpers
def _int_window(window: Window) -> tuple[int, int, int, int]:
    """(col_off, row_off, width, height) of a window as integers (rounded)."""
    col, row = round(window.col_off), round(window.row_off)
    width, height = round(window.width), round(window.height)
    if width <= 0 or height <= 0:
        raise ValueError(f"empty window: {window}")
    return col, row, width, height


def _masks(reader: Any, bands: tuple[int, ...], **kwargs: Any) -> np.ndarray:
    """GDAL validity masks (B, h, w), 0 = invalid; the file's nodata wins over an alpha band, silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NodataShadowWarning)
        return reader.read_masks(list(bands), **kwargs)


def _check_bands(dataset: Any, bands: Sequence[int] | None) -> tuple[int, ...]:
    if bands is None:
        return tuple(range(1, min(dataset.count, 3) + 1))
    chosen = tuple(int(b) for b in bands)
    if not chosen:
        raise InputError("--bands needs at least one band number")
    if len(chosen) > 3:
        raise InputError(f"--bands takes at most 3 bands (R G B), got {len(chosen)}")
    bad = [b for b in chosen if not 1 <= b <= dataset.count]
    if bad:
        raise InputError(f"band {bad[0]} does not exist: the raster has bands 1..{dataset.count} (1-based)")
    return chosen


def _check_dtype(dataset: Any, path: Path) -> None:
    dtype = str(dataset.dtypes[0])
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"{path.name}: sample type {dtype} is not supported ({', '.join(SUPPORTED_DTYPES)})")
    if len(set(dataset.dtypes)) > 1:
        raise InputError(f"{path.name}: bands of different sample types are not supported")


def _warped(dataset: Any, resolution: float) -> Any:
    """A WarpedVRT of ``dataset`` on a north-up grid with square pixels of ``resolution`` map units."""
    if not math.isfinite(resolution) or resolution <= 0:
        raise InputError(f"--resolution must be a positive number, got {resolution}")
    if dataset.crs is None:
        raise InputError("--resolution needs a raster with a CRS")
    if dataset.crs.is_geographic:
        raise InputError("--resolution is in metres but the raster's CRS is geographic (degrees)")
    t = dataset.transform
    size = dataset.width, dataset.height
    corners = [(t.a * c + t.b * r + t.c, t.d * c + t.e * r + t.f) for c in (0, size[0]) for r in (0, size[1])]
    left, top = min(x for x, _ in corners), max(y for _, y in corners)
    right, bottom = max(x for x, _ in corners), min(y for _, y in corners)
    # North-up grid with square pixels anchored at the top-left corner of the raster's envelope.
    transform = Affine(resolution, 0.0, left, 0.0, -resolution, top)
    width = math.ceil((right - left) / resolution - 1e-6)
    height = math.ceil((top - bottom) / resolution - 1e-6)
    if width * height == 0:
        raise InputError(f"--resolution {resolution} is larger than the raster")
    coarser = resolution > min(abs(dataset.res[0]), abs(dataset.res[1]))
    return WarpedVRT(
        dataset,
        crs=dataset.crs,
        transform=transform,
        width=width,
        height=height,
        resampling=Resampling.average if coarser else Resampling.bilinear,
    )


def _compute_stretch(
    dataset: Any,
    bands: tuple[int, ...],
    percentiles: tuple[float, float],
    value_range: tuple[float, float] | None,
    path: Path,
) -> Stretch:
    """Per-band percentiles of a decimated (longest side <= 1024) read, invalid pixels left out."""
    if value_range is not None:
        low_v, high_v = float(value_range[0]), float(value_range[1])
        if not high_v > low_v:
            raise InputError(f"value range must have min < max, got {low_v} {high_v}")
        n = len(bands)
        return Stretch(np.full(n, low_v), np.full(n, high_v), None)
    p_low, p_high = float(percentiles[0]), float(percentiles[1])
    if not 0.0 <= p_low < p_high <= 100.0:
        raise InputError(f"stretch percentiles must satisfy 0 <= low < high <= 100, got {p_low} {p_high}")
    scale = max(dataset.width, dataset.height) / _STATS_SIDE
    shape = (
        max(1, round(dataset.height / max(scale, 1.0))),
        max(1, round(dataset.width / max(scale, 1.0))),
    )
    try:
        samples = dataset.read(list(bands), out_shape=(len(bands), *shape), resampling=Resampling.nearest)
        masks = _masks(dataset, bands, out_shape=(len(bands), *shape), resampling=Resampling.nearest)
    except RasterioError as exc:
        raise InputError(f"cannot read {path.name}: {one_line(exc)}") from exc
    lows, highs = [], []
    for i, band in enumerate(bands):
        values = samples[i][masks[i] > 0].astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise InputError(f"{path.name}: band {band} has no valid pixels (all nodata or masked)")
        low, high = np.percentile(values, [p_low, p_high])
        if not high > low:  # constant band: keep a non-zero span so the map is defined
            high = low + 1.0
        lows.append(float(low))
        highs.append(float(high))
    return Stretch(np.asarray(lows), np.asarray(highs), (p_low, p_high))
