"""Write a mask or instance-id GeoTIFF window by window, atomically, on the input raster's grid.

:class:`GeoTiffWriter` streams windows into a tiled (512 x 512), deflate-compressed GeoTIFF written as a
hidden temporary file next to the output and renamed into place only when the ``with`` block ends
without an error (on an error the temporary files are deleted and an existing output is untouched).
Memory stays bounded by one window.

Grids: windows are given on the working grid of the ``like`` raster. When that raster is read at another
resolution (``GeoRaster.open(..., resolution=...)``), the finished output is resampled back to the file's
own grid with nearest neighbour, block by block, so the output always has the input's CRS, transform and
shape. ``cog=True`` converts the finished GeoTIFF to a Cloud-Optimized GeoTIFF (GDAL's COG driver,
nearest-neighbour overviews, which keeps label values intact).

Nodata: by default (``nodata="auto"``) the largest value of the output dtype (255, 65535, 2**31 - 1), so
0 stays "background" and pixels where the input was invalid are told apart from "nothing found".
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from samadapt.domains.remote_sensing.raster import GeoRaster, one_line
from samadapt.errors import InputError, MissingDependencyError

try:
    import rasterio
    import rasterio.shutil
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "rasterio is not installed; install it with: pip install 'samadapt[geo]'"
    ) from _exc

__all__ = ["RASTER_SUFFIXES", "WRITE_DTYPES", "GeoTiffWriter"]

#: Output file endings GeoTiffWriter accepts.
RASTER_SUFFIXES: tuple[str, ...] = (".tif", ".tiff")
#: Output dtypes (uint8: binary masks; uint16/int32: instance ids; int32 is the widest rasterio's
#: polygonizer reads exactly).
WRITE_DTYPES: tuple[str, ...] = ("uint8", "uint16", "int32")
_BLOCK = 512


def _auto_nodata(dtype: str) -> int:
    return int(np.iinfo(np.dtype(dtype)).max)


def _temp_path(path: Path, tag: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.{tag}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


class GeoTiffWriter:
    """A single-band GeoTIFF on the grid of ``like``; use as a context manager.

    Example::

        with GeoTiffWriter("out.tif", like=raster, dtype="uint16") as writer:
            writer.write(window, labels, valid=valid)

    Attributes:
        path: the final output path.
        width, height, transform, crs: the working grid windows refer to (``like``'s).
        dtype: output sample type. nodata: the nodata value written (None: none).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        like: GeoRaster,
        dtype: str = "uint8",
        nodata: float | str | None = "auto",
        cog: bool = False,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """Create the temporary output (the final path appears only on a clean close).

        Args:
            path: output ``.tif``/``.tiff`` (its folder must exist).
            like: the input raster; the output gets its CRS, transform and shape.
            dtype: ``"uint8"`` (binary mask), ``"uint16"`` or ``"int32"`` (instance ids).
            nodata: ``"auto"`` (dtype maximum), a value, or None for no nodata.
            cog: write a Cloud-Optimized GeoTIFF.
            tags: metadata tags (model, prompts, software version) stored in the file.

        Raises:
            InputError: a bad output path, dtype or nodata value.
        """
        self.path = Path(path)
        if self.path.suffix.lower() not in RASTER_SUFFIXES:
            raise InputError(
                f"raster output must end in one of {', '.join(RASTER_SUFFIXES)}: {self.path.name}"
            )
        if not self.path.parent.is_dir():
            raise InputError(f"output folder does not exist: {self.path.parent}")
        if dtype not in WRITE_DTYPES:
            raise InputError(f"output dtype must be one of {', '.join(WRITE_DTYPES)}, got {dtype}")
        if nodata == "auto":
            nodata = _auto_nodata(dtype)
        if nodata is not None:
            info = np.iinfo(np.dtype(dtype))
            if isinstance(nodata, str) or not (info.min <= float(nodata) <= info.max) or float(nodata) % 1:
                raise InputError(f"nodata {nodata} is not a valid {dtype} value")
            nodata = int(nodata)
        self.like = like
        self.dtype = dtype
        self.nodata: int | None = nodata
        self.cog = cog
        self.width, self.height = like.width, like.height
        self.transform, self.crs = like.transform, like.crs
        self._tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self._temps: list[Path] = []
        self._closed = False
        self._tmp = self._new_temp("part")
        try:
            self._dataset: Any = rasterio.open(
                self._tmp, "w+", **self._profile(self.width, self.height, self.transform)
            )
        except RasterioError as exc:
            self._cleanup()
            raise InputError(f"cannot create {self.path.name}: {one_line(exc)}") from exc

    def _new_temp(self, tag: str) -> Path:
        tmp = _temp_path(self.path, tag)
        self._temps.append(tmp)
        return tmp

    def _profile(self, width: int, height: int, transform: Any) -> dict[str, Any]:
        return {
            "driver": "GTiff",
            "width": width,
            "height": height,
            "count": 1,
            "dtype": self.dtype,
            "crs": self.crs,
            "transform": transform,
            "nodata": self.nodata,
            "tiled": True,
            "blockxsize": _BLOCK,
            "blockysize": _BLOCK,
            "compress": "deflate",
            "predictor": 2,
            "BIGTIFF": "IF_SAFER",
        }

    # ------------------------------------------------------------------ windows
    def _clip(self, window: Window) -> tuple[Window, slice, slice] | None:
        """The part of ``window`` inside the grid, and the matching slices of a window-sized array."""
        col, row = round(window.col_off), round(window.row_off)
        width, height = round(window.width), round(window.height)
        c0, r0 = max(col, 0), max(row, 0)
        c1, r1 = min(col + width, self.width), min(row + height, self.height)
        if c1 <= c0 or r1 <= r0:
            return None
        return Window(c0, r0, c1 - c0, r1 - r0), slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)

    def write(self, window: Window, array: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Write an (h, w) array at ``window`` (working grid); the part outside the raster is dropped.

        Args:
            window: where ``array`` goes; may extend past the raster's edges.
            array: (h, w) values (bool masks are written as 0/1); must fit the output dtype.
            valid: optional (h, w) bool; pixels where it is False are written as nodata.
        """
        array = np.asarray(array)
        if array.shape != (round(window.height), round(window.width)):
            raise ValueError(f"array shape {array.shape} does not match window {window}")
        clipped = self._clip(window)
        if clipped is None:
            return
        inner, rows, cols = clipped
        block = array[rows, cols]
        info = np.iinfo(np.dtype(self.dtype))
        if block.size and (block.min() < info.min or block.max() > info.max):
            raise ValueError(f"values {block.min()}..{block.max()} do not fit {self.dtype}")
        block = block.astype(self.dtype)
        if valid is not None:
            if self.nodata is None:
                raise ValueError("valid= needs a writer with a nodata value")
            block = np.where(np.asarray(valid)[rows, cols], block, self.nodata).astype(self.dtype)
        self._dataset.write(block, 1, window=inner)

    def read(self, window: Window) -> np.ndarray:
        """Read back an (h, w) window already written (0 or nodata elsewhere; outside: nodata or 0)."""
        height, width = round(window.height), round(window.width)
        fill = self.nodata if self.nodata is not None else 0
        out = np.full((height, width), fill, dtype=self.dtype)
        clipped = self._clip(window)
        if clipped is not None:
            inner, rows, cols = clipped
            out[rows, cols] = self._dataset.read(1, window=inner)
        return out

    def block_windows(self) -> list[Window]:
        """The output's 512 x 512 blocks (clipped to the grid)."""
        return [w for _, w in self._dataset.block_windows(1)]

    def remap(self, lookup: np.ndarray | Mapping[int, int]) -> None:
        """Replace every value v by ``lookup[v]`` block by block (e.g. merge instance ids across tiles).

        Args:
            lookup: an array indexed by value (length > the largest value written), or a mapping from old
                to new values (values absent from it are kept). Nodata pixels are kept.
        """
        table: np.ndarray | None = None
        if not isinstance(lookup, Mapping):
            table = np.asarray(lookup)
        for window in self.block_windows():
            block = self._dataset.read(1, window=window)
            keep = block == self.nodata if self.nodata is not None else np.zeros(block.shape, dtype=bool)
            if table is not None:
                mapped = table[np.where(keep, 0, block)]
            else:
                assert isinstance(lookup, Mapping)
                values, inverse = np.unique(block, return_inverse=True)
                mapped = np.asarray([lookup.get(int(v), int(v)) for v in values])[inverse].reshape(
                    block.shape
                )
            self._dataset.write(np.where(keep, block, mapped).astype(self.dtype), 1, window=window)

    # ------------------------------------------------------------------ closing
    def _finish(self) -> None:
        if self._tags:
            self._dataset.update_tags(**self._tags)
        self._dataset.close()
        current = self._tmp
        if self.like.resampled:
            current = self._back_to_source(current)
        if self.cog:
            cog = self._new_temp("cog")
            rasterio.shutil.copy(
                current,
                cog,
                driver="COG",
                compress="DEFLATE",
                blocksize=_BLOCK,
                overview_resampling="nearest",
                BIGTIFF="IF_SAFER",
            )
            current = cog
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(current, 0o666 & ~umask)  # mkstemp made it owner-only; a plain file gets the umask's mode
        os.replace(current, self.path)

    def _back_to_source(self, working: Path) -> Path:
        """Resample the working-grid output to the input file's grid (nearest), block by block."""
        like = self.like
        out = self._new_temp("grid")
        profile = self._profile(like.source_width, like.source_height, like.source_transform)
        with (
            rasterio.open(working) as src,
            WarpedVRT(
                src,
                crs=like.crs,
                transform=like.source_transform,
                width=like.source_width,
                height=like.source_height,
                resampling=Resampling.nearest,
                nodata=self.nodata,
            ) as vrt,
            rasterio.open(out, "w", **profile) as dst,
        ):
            if self._tags:
                dst.update_tags(**self._tags)
            for _, window in dst.block_windows(1):
                dst.write(vrt.read(1, window=window), 1, window=window)
        return out

    def _cleanup(self) -> None:
        for tmp in self._temps:
            tmp.unlink(missing_ok=True)
            Path(str(tmp) + ".aux.xml").unlink(missing_ok=True)

    def close(self, ok: bool = True) -> None:
        """Finish and rename into place (``ok``), or discard everything (not ``ok``); once only."""
        if self._closed:
            return
        self._closed = True
        try:
            if ok:
                try:
                    self._finish()
                except RasterioError as exc:
                    raise InputError(f"cannot write {self.path.name}: {one_line(exc)}") from exc
            elif not self._dataset.closed:
                self._dataset.close()
        finally:
            self._cleanup()

    def __enter__(self) -> GeoTiffWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(ok=exc_type is None)
