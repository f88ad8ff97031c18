"""``samadapt geo``: segment GeoTIFFs of any size (``geo segment``) and describe them (``geo info``).

``geo segment IN.tif`` takes exactly one prompt source: ``--box`` (repeatable; ``--crs`` for another
CRS), ``--point`` (repeatable), ``--prompts FILE`` (GeoJSON, GeoPackage, Shapefile, FlatGeobuf: each
feature's bounding box or point) or ``--auto`` (everything, tile by tile). It writes an instance-id
GeoTIFF with the input's CRS, transform and shape (``--cog`` for a Cloud-Optimized GeoTIFF; nodata
where the input is invalid) and, with ``--vector``, one polygon per instance with id, score, area and
the prompt's feature id. Embeddings are cached on disk (``--cache-dir``), so a second run on the same
raster and model skips the encoder.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from samadapt.cli.common import adapter_dir, add_model_args, load_predictor, mask_generator
from samadapt.errors import InputError

_VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".fgb", ".shp")
_HINT = (
    "note: no mask passed the thresholds; LiteMedSAM (the default weights) was trained on boxes: try "
    "--single-mask --pred-iou-thresh 0.3 --stability-thresh 0.5 --stability-offset 0.5"
)


def register(sub: Any) -> None:
    """Add ``geo`` with its ``segment`` and ``info`` sub-commands to the sub-parsers ``sub``."""
    geo = sub.add_parser("geo", help="remote sensing: segment GeoTIFFs of any size, describe them")
    commands = geo.add_subparsers(dest="geo_command", required=True, parser_class=type(geo))
    seg = commands.add_parser("segment", help="segment a GeoTIFF from map-coordinate prompts or --auto")
    seg.add_argument("input", help="GeoTIFF (any size, dtype, CRS; 1..N bands)")
    seg.add_argument("-o", "--output", required=True, help="instance-id GeoTIFF (.tif), the input's grid")
    prompts = seg.add_argument_group("prompts (exactly one source)")
    prompts.add_argument(
        "--box", nargs=4, type=float, action="append", metavar=("MINX", "MINY", "MAXX", "MAXY")
    )
    prompts.add_argument(
        "--point", nargs=2, type=float, action="append", metavar=("X", "Y"), help="a foreground point"
    )
    prompts.add_argument(
        "--negative-point",
        nargs=2,
        type=float,
        action="append",
        metavar=("X", "Y"),
        help="a background point (goes with every --point whose window holds it)",
    )
    prompts.add_argument("--crs", help="CRS of --box/--point (default: the raster's), e.g. EPSG:4326")
    prompts.add_argument(
        "--prompts", metavar="FILE", help="vector file of prompts (.geojson .gpkg .shp .fgb)"
    )
    prompts.add_argument("--auto", action="store_true", help="segment everything, tile by tile")
    out = seg.add_argument_group("outputs")
    out.add_argument("--vector", metavar="FILE", help="also write polygons (.gpkg, .geojson, .fgb, .shp)")
    out.add_argument("--cog", action="store_true", help="write a Cloud-Optimized GeoTIFF")
    out.add_argument("--simplify", type=float, metavar="M", help="simplify polygons (map units, e.g. metres)")
    out.add_argument("--json", action="store_true", help="print a JSON summary instead of one line")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    reading = seg.add_argument_group("reading and tiling")
    reading.add_argument("--bands", nargs="+", type=int, metavar="B", help="1-based bands as R G B (max 3)")
    reading.add_argument("--resolution", type=float, metavar="M", help="read at this pixel size (map units)")
    reading.add_argument("--tile", type=int, help="tile side in pixels (default: the model's input side)")
    reading.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles (default: tile/8)")
    reading.add_argument(
        "--zoom",
        choices=("auto", "off"),
        default="auto",
        help="auto: segment small boxes on an enlarged crop at the model's resolution (default)",
    )
    reading.add_argument("--cache-dir", metavar="DIR", help="embedding cache (default ~/.cache/samadapt/geo)")
    reading.add_argument("--no-cache", action="store_true", help="neither read nor write cached embeddings")
    auto = seg.add_argument_group("automatic masks (--auto)")
    auto.add_argument(
        "--points-per-side", type=int, default=32, help="grid points per tile side (default 32)"
    )
    auto.add_argument("--points-per-batch", type=int, default=256, help="points per decoder call")
    auto.add_argument("--pred-iou-thresh", type=float, default=0.88, help="default 0.88")
    auto.add_argument("--stability-thresh", type=float, default=0.95, help="default 0.95")
    auto.add_argument("--stability-offset", type=float, default=1.0, help="default 1")
    auto.add_argument("--min-area", type=int, default=0, help="fill holes / drop islands under N pixels")
    auto.add_argument("--single-mask", action="store_true", help="one candidate per point (LiteMedSAM)")
    auto.add_argument(
        "--merge-iou", type=float, default=0.5, help="IoU in a tile overlap that merges two instances (0.5)"
    )
    add_model_args(seg)
    info = commands.add_parser("info", help="CRS, size, bands, dtype, nodata and the stretch of a GeoTIFF")
    info.add_argument("input", help="GeoTIFF")
    info.add_argument("--bands", nargs="+", type=int, metavar="B", help="1-based bands as R G B (max 3)")
    info.add_argument(
        "--resolution", type=float, metavar="M", help="describe the grid read at this pixel size"
    )
    info.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    """Dispatch ``geo segment`` / ``geo info``."""
    os.environ.setdefault("GDAL_CACHEMAX", "256")  # MB: GDAL's default (5% of RAM) would dwarf our tiles
    if args.geo_command == "info":
        return _info(args)
    return _segment(args)


def _info(args: argparse.Namespace) -> int:
    from samadapt.domains.remote_sensing.raster import GeoRaster

    with GeoRaster.open(args.input, bands=args.bands, resolution=args.resolution) as raster:
        info = raster.info_dict()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    stretch = info["stretch"]
    lows = " ".join(f"{v:g}" for v in stretch["low"])
    highs = " ".join(f"{v:g}" for v in stretch["high"])
    source = f"percentiles {stretch['percentiles']}" if stretch.get("percentiles") else "fixed range"
    lines = [
        f"{info['path']}",
        f"  crs: {info['crs']}" + (f" ({info['crs_units']})" if info.get("crs_units") else ""),
        f"  size: {info['width']} x {info['height']} pixels, {info['count']} band(s), dtype {info['dtype']}",
        f"  pixel size: {info['res'][0]:g} x {info['res'][1]:g}",
        f"  nodata: {info['nodata']}",
        f"  bands used (R G B): {' '.join(map(str, info['bands']))}",
        f"  stretch ({source}): low {lows} -> 0, high {highs} -> 255",
    ]
    if "working_grid" in info:
        grid = info["working_grid"]
        lines.append(f"  read at {args.resolution:g}: {grid['width']} x {grid['height']} pixels")
    print("\n".join(lines))
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """One-line errors for the flags, before any slow work."""
    sources = [bool(args.box or args.point), bool(args.prompts), bool(args.auto)]
    if sum(sources) != 1:
        raise InputError("give exactly one prompt source: --box/--point, --prompts FILE or --auto")
    if args.negative_point and not args.point:
        raise InputError("--negative-point needs at least one --point")
    if args.crs and not (args.box or args.point):
        raise InputError("--crs is for --box/--point (a --prompts file carries its own CRS)")
    output = Path(args.output)
    if output.suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"output must end in .tif or .tiff: {output.name}")
    if not output.parent.is_dir():
        raise InputError(f"output folder does not exist: {output.parent}")
    if args.vector:
        vector = Path(args.vector)
        if vector.suffix.lower() not in _VECTOR_SUFFIXES:
            raise InputError(f"--vector must end in one of {', '.join(_VECTOR_SUFFIXES)}: {vector.name}")
        if not vector.parent.is_dir():
            raise InputError(f"--vector folder does not exist: {vector.parent}")
    if args.simplify is not None and not args.simplify > 0:
        raise InputError(f"--simplify must be a positive distance, got {args.simplify}")
    if args.tile is not None and args.tile < 16:
        raise InputError(f"--tile must be at least 16 pixels, got {args.tile}")
    if args.overlap is not None and args.overlap < 0:
        raise InputError(f"--overlap must be 0 or more, got {args.overlap}")
    if args.points_per_side < 1 or args.points_per_batch < 1 or args.min_area < 0:
        raise InputError("--points-per-side and --points-per-batch must be >= 1, --min-area >= 0")
    if not 0 < args.merge_iou <= 1:
        raise InputError(f"--merge-iou must be in (0, 1], got {args.merge_iou}")
    if not Path(args.input).is_file():
        raise InputError(f"raster not found: {args.input}")
    adapter_dir(args)


def _segment(args: argparse.Namespace) -> int:
    from samadapt.domains.remote_sensing.cache import EmbeddingCache
    from samadapt.domains.remote_sensing.prompts import cli_prompts, vector_prompts
    from samadapt.domains.remote_sensing.raster import GeoRaster
    from samadapt.domains.remote_sensing.segment import segment_auto, segment_prompts
    from samadapt.domains.remote_sensing.tiling import TileGrid
    from samadapt.domains.remote_sensing.writers import GeoTiffWriter

    _check_args(args)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    skipped: list[str] = []
    with GeoRaster.open(args.input, bands=args.bands, resolution=args.resolution) as raster:
        prompts: list[Any] = []
        if args.prompts:
            prompts, skipped = vector_prompts(args.prompts, raster)
            if not prompts:
                raise InputError(
                    f"no feature of {Path(args.prompts).name} lies in the raster ({len(skipped)} skipped)"
                )
        elif not args.auto:
            points = [[*list(p), 1] for p in args.point or []] + [
                [*list(p), 0] for p in args.negative_point or []
            ]
            prompts = cli_prompts(args.box, points or None, args.crs, raster)
        timings["open"] = time.perf_counter() - start
        mark = time.perf_counter()
        predictor, described = load_predictor(args)
        tile = args.tile or int(predictor.profile.input_size)
        overlap = args.overlap if args.overlap is not None else max(tile // 8, 0)
        grid = TileGrid(raster.width, raster.height, tile, overlap)  # checks --tile/--overlap
        cache = EmbeddingCache.for_raster(
            args.cache_dir, raster, predictor.model, predictor.precision, enabled=not args.no_cache
        )
        timings["model"] = time.perf_counter() - mark
        mark = time.perf_counter()
        tags = {
            "software": "samadapt geo segment",
            "model": described,
            "mode": "auto" if args.auto else "prompts",
        }
        progress = not args.no_progress
        if args.auto:
            generator = _generator(predictor, args)
            with GeoTiffWriter(args.output, like=raster, dtype="int32", cog=args.cog, tags=tags) as writer:
                records = segment_auto(
                    generator, raster, grid, writer, cache=cache, merge_iou=args.merge_iou, progress=progress
                )
        else:
            highest = len(prompts)
            dtype = "uint8" if highest < 255 else "uint16" if highest < 65535 else "int32"
            with GeoTiffWriter(args.output, like=raster, dtype=dtype, cog=args.cog, tags=tags) as writer:
                records = segment_prompts(
                    predictor,
                    raster,
                    prompts,
                    writer,
                    zoom=args.zoom,
                    tile=tile,
                    cache=cache,
                    progress=progress,
                )
        timings["segment"] = time.perf_counter() - mark
        crs = raster.crs
    mark = time.perf_counter()
    if args.vector:
        _write_vectors(args, records, crs)
        timings["vectors"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - start
    found = sum(1 for r in records.values() if r["pixels"] > 0)
    summary = {
        "input": str(args.input),
        "output": str(args.output),
        "vector": args.vector,
        "mode": "auto" if args.auto else "prompts",
        "model": described,
        "tile": tile,
        "overlap": overlap,
        "tiles": len(grid) if args.auto else None,
        "prompts": len(prompts),
        "instances": found,
        "skipped": skipped,
        "zoomed": sum(1 for r in records.values() if r.get("zoomed")),
        "cache": {"dir": str(cache.folder), "hits": cache.hits, "misses": cache.misses},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "records": list(records.values()),
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    if skipped:
        print(f"note: skipped {len(skipped)} feature(s) outside the raster: {', '.join(skipped)}")
    if args.auto and not found:
        print(_HINT)
    what = f"{len(grid)} tile(s)" if args.auto else f"{len(prompts)} prompt(s), {summary['zoomed']} zoomed"
    print(
        f"{args.output}: {found} instance(s) from {what} ({described}; embeddings: {cache.hits} cached, "
        f"{cache.misses} computed; {timings['total']:.1f} s)"
    )
    return 0


def _scalar_record(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if v is None or isinstance(v, bool | int | float | str)}


def _write_vectors(args: argparse.Namespace, records: dict[int, dict[str, Any]], crs: Any) -> None:
    from samadapt.domains.remote_sensing.vectors import polygonize, write_vectors

    polygons = polygonize(args.output)
    fields = {
        n: {k: v for k, v in _scalar_record(r).items() if k not in ("pixels", "window")}
        for n, r in records.items()
    }
    write_vectors(args.vector, polygons, fields, crs, simplify=args.simplify)


def _generator(predictor: Any, args: argparse.Namespace) -> Any:
    if predictor.model.prompt_generator is not None:
        raise InputError(
            "--auto on rasters runs the point grid; this adapter's own prompts are not tiled yet"
        )
    return mask_generator(predictor, args)
