"""One raster through the whole geo pipeline: open, prompts, tiles, embedding cache, segmentation,
instance-id GeoTIFF, polygons, summary.

:func:`run_raster` is the single body behind ``samadapt geo segment`` (one raster, options from its
flags) and ``samadapt predict --config recipes/geo/predict.yaml`` (many rasters over DDP processes:
:class:`~samadapt.domains.remote_sensing.predict_data.GeoPredictionWriter` calls it once per raster).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samadapt.errors import InputError

__all__ = ["MODES", "VECTOR_SUFFIXES", "SegmentOptions", "run_raster"]

#: polygon file endings (the driver follows the ending)
VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".fgb", ".shp")
#: ``auto``: everything, tile by tile; ``prompts``: boxes/points (``boxes``/``points``) or a vector file
MODES = ("auto", "prompts")


@dataclass(frozen=True)
class SegmentOptions:
    """How one raster is segmented and where the results go.

    Prompts (``mode="prompts"``): a vector file (``prompts``: each feature's bounding box or point, in
    its own CRS), or ``boxes`` (MINX, MINY, MAXX, MAXY) and ``points`` (X, Y, LABEL: 1 foreground,
    0 background) in ``crs`` (default: the raster's). The automatic-mode fields carry the names
    :func:`samadapt.cli.common.mask_generator` reads, with ``samadapt geo segment``'s defaults.
    """

    output: str
    vector: str | None = None
    mode: str = "prompts"
    prompts: str | None = None
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    points: tuple[tuple[float, float, int], ...] = ()
    crs: str | None = None
    bands: tuple[int, ...] | None = None
    resolution: float | None = None
    tile: int | None = None
    overlap: int | None = None
    zoom: str = "auto"
    cache_dir: str | None = None
    use_cache: bool = True
    cog: bool = False
    simplify: float | None = None
    progress: bool = True
    software: str = "samadapt geo segment"
    points_per_side: int = 32
    points_per_batch: int = 256
    pred_iou_thresh: float = 0.88
    stability_thresh: float = 0.95
    stability_offset: float = 1.0
    min_area: int = 0
    single_mask: bool = False
    merge_iou: float = 0.5

    def check(self) -> None:
        """One-line errors for values that are wrong whatever the raster (before any slow work)."""
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.zoom not in ("auto", "off"):
            raise InputError(f"--zoom must be auto or off, got {self.zoom!r}")
        if self.vector and Path(self.vector).suffix.lower() not in VECTOR_SUFFIXES:
            raise InputError(
                f"--vector must end in one of {', '.join(VECTOR_SUFFIXES)}: {Path(self.vector).name}"
            )
        if self.simplify is not None and not self.simplify > 0:
            raise InputError(f"--simplify must be a positive distance, got {self.simplify}")
        if self.tile is not None and self.tile < 16:
            raise InputError(f"--tile must be at least 16 pixels, got {self.tile}")
        if self.overlap is not None and self.overlap < 0:
            raise InputError(f"--overlap must be 0 or more, got {self.overlap}")
        if self.points_per_side < 1 or self.points_per_batch < 1 or self.min_area < 0:
            raise InputError("--points-per-side and --points-per-batch must be >= 1, --min-area >= 0")
        if not 0 < self.merge_iou <= 1:
            raise InputError(f"--merge-iou must be in (0, 1], got {self.merge_iou}")


def _map_prompts(raster: Any, options: SegmentOptions) -> tuple[list[Any], list[str]]:
    """(prompts in the raster's CRS, ids of the file's features outside the raster)."""
    from samadapt.domains.remote_sensing.prompts import cli_prompts, vector_prompts

    if options.mode == "auto":
        return [], []
    if options.prompts:
        prompts, skipped = vector_prompts(options.prompts, raster)
        if not prompts:
            raise InputError(
                f"no feature of {Path(options.prompts).name} lies in the raster ({len(skipped)} skipped)"
            )
        return prompts, skipped
    if not options.boxes and not options.points:
        raise InputError("prompts mode needs boxes, points or a vector file of prompts")
    boxes = [list(b) for b in options.boxes] or None
    points = [list(p) for p in options.points] or None
    return cli_prompts(boxes, points, options.crs, raster), []


def run_raster(
    load_predictor: Callable[[], tuple[Any, str]], path: str | os.PathLike[str], options: SegmentOptions
) -> dict[str, Any]:
    """Segment one raster and write ``options.output`` (and ``options.vector``); returns the summary.

    Args:
        load_predictor: returns (a :class:`samadapt.predictor.Predictor`, a line describing the model);
            called once, after the raster was opened and its prompts checked, so bad input fails
            before a slow model load.
        path: the raster (any size, dtype, CRS; 1..N bands).
        options: what to segment and where to write.

    Returns:
        input, output, vector, mode, model, tile, overlap, tiles, prompts, instances, skipped (feature
        ids outside the raster), zoomed, cache (dir, hits, misses), timings (seconds), records (one per
        instance id).

    Raises:
        InputError: unreadable raster, prompts outside it, bad options (nothing is left half-written).
    """
    from samadapt.domains.remote_sensing.cache import EmbeddingCache
    from samadapt.domains.remote_sensing.raster import GeoRaster
    from samadapt.domains.remote_sensing.segment import segment_auto, segment_prompts
    from samadapt.domains.remote_sensing.tiling import TileGrid
    from samadapt.domains.remote_sensing.writers import GeoTiffWriter

    options.check()
    os.environ.setdefault("GDAL_CACHEMAX", "256")  # MB: GDAL's default (5% of RAM) would dwarf our tiles
    auto = options.mode == "auto"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    bands = list(options.bands) if options.bands else None
    with GeoRaster.open(path, bands=bands, resolution=options.resolution) as raster:
        prompts, skipped = _map_prompts(raster, options)
        timings["open"] = time.perf_counter() - start
        mark = time.perf_counter()
        predictor, described = load_predictor()
        generator = _generator(predictor, options) if auto else None
        tile = options.tile or int(predictor.profile.input_size)
        overlap = options.overlap if options.overlap is not None else max(tile // 8, 0)
        grid = TileGrid(raster.width, raster.height, tile, overlap)  # checks tile/overlap
        cache = EmbeddingCache.for_raster(
            options.cache_dir, raster, predictor.model, predictor.precision, enabled=options.use_cache
        )
        timings["model"] = time.perf_counter() - mark
        mark = time.perf_counter()
        tags = {"software": options.software, "model": described, "mode": options.mode}
        if auto:
            with GeoTiffWriter(options.output, like=raster, dtype="int32", cog=options.cog, tags=tags) as out:
                records = segment_auto(
                    generator,
                    raster,
                    grid,
                    out,
                    cache=cache,
                    merge_iou=options.merge_iou,
                    progress=options.progress,
                )
        else:
            highest = len(prompts)
            dtype = "uint8" if highest < 255 else "uint16" if highest < 65535 else "int32"
            with GeoTiffWriter(options.output, like=raster, dtype=dtype, cog=options.cog, tags=tags) as out:
                records = segment_prompts(
                    predictor,
                    raster,
                    prompts,
                    out,
                    zoom=options.zoom,  # type: ignore[arg-type]
                    tile=tile,
                    cache=cache,
                    progress=options.progress,
                )
        timings["segment"] = time.perf_counter() - mark
        crs = raster.crs
    if options.vector:
        mark = time.perf_counter()
        _write_vectors(options, records, crs)
        timings["vectors"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - start
    return {
        "input": str(path),
        "output": str(options.output),
        "vector": options.vector,
        "mode": options.mode,
        "model": described,
        "tile": tile,
        "overlap": overlap,
        "tiles": len(grid) if auto else None,
        "prompts": len(prompts),
        "instances": sum(1 for r in records.values() if r["pixels"] > 0),
        "skipped": skipped,
        "zoomed": sum(1 for r in records.values() if r.get("zoomed")),
        "cache": {"dir": str(cache.folder), "hits": cache.hits, "misses": cache.misses},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "records": list(records.values()),
    }


def _scalar_record(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if v is None or isinstance(v, bool | int | float | str)}


def _write_vectors(options: SegmentOptions, records: dict[int, dict[str, Any]], crs: Any) -> None:
    from samadapt.domains.remote_sensing.vectors import polygonize, write_vectors

    assert options.vector is not None
    polygons = polygonize(options.output)
    fields = {
        n: {k: v for k, v in _scalar_record(r).items() if k not in ("pixels", "window")}
        for n, r in records.items()
    }
    write_vectors(options.vector, polygons, fields, crs, simplify=options.simplify)


def _generator(predictor: Any, options: SegmentOptions) -> Any:
    """What ``geo segment --auto`` runs on each tile: an instance adapter's own predictions (RsPrompter,
    ``--adapter``), else the automatic mask generator (one builder: ``cli.common``)."""
    from samadapt.cli.common import mask_generator
    from samadapt.domains.remote_sensing.instance_tiles import AdapterInstances, instance_adapter

    adapter = instance_adapter(predictor)
    if adapter is not None:
        return AdapterInstances(predictor, adapter, min_area=options.min_area)
    if predictor.model.prompt_generator is not None:
        raise InputError(
            "--auto on rasters runs the point grid or an instance adapter (RsPrompter); this adapter's "
            "per-class prompts (AutoSAM) are not tiled yet"
        )
    return mask_generator(predictor, options)  # type: ignore[arg-type]
