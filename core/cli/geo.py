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
from pathlib import Path
from typing import Any

from samadapt.cli.common import adapter_dir, add_model_args, load_predictor
from samadapt.errors import InputError

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
    if args.vector and not Path(args.vector).parent.is_dir():
        raise InputError(f"--vector folder does not exist: {Path(args.vector).parent}")
    if not Path(args.input).is_file():
        raise InputError(f"raster not found: {args.input}")
    adapter_dir(args)


def _options(args: argparse.Namespace) -> Any:
    """The flags as the pipeline's options (checked: bad values end in one line before any slow work)."""
    from samadapt.domains.remote_sensing.pipeline import SegmentOptions

    points = [(x, y, 1) for x, y in args.point or []] + [(x, y, 0) for x, y in args.negative_point or []]
    options = SegmentOptions(
        output=args.output,
        vector=args.vector,
        mode="auto" if args.auto else "prompts",
        prompts=args.prompts,
        boxes=tuple(tuple(b) for b in args.box or []),
        points=tuple(points),
        crs=args.crs,
        bands=tuple(args.bands) if args.bands else None,
        resolution=args.resolution,
        tile=args.tile,
        overlap=args.overlap,
        zoom=args.zoom,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        cog=args.cog,
        simplify=args.simplify,
        progress=not args.no_progress,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_thresh=args.stability_thresh,
        stability_offset=args.stability_offset,
        min_area=args.min_area,
        single_mask=args.single_mask,
        merge_iou=args.merge_iou,
    )
    options.check()
    return options


def _segment(args: argparse.Namespace) -> int:
    from samadapt.domains.remote_sensing.pipeline import run_raster

    _check_args(args)
    summary = run_raster(lambda: load_predictor(args), args.input, _options(args))
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    skipped, found, cache = summary["skipped"], summary["instances"], summary["cache"]
    if skipped:
        print(f"note: skipped {len(skipped)} feature(s) outside the raster: {', '.join(skipped)}")
    if args.auto and not found:
        print(_HINT)
    what = (
        f"{summary['tiles']} tile(s)"
        if args.auto
        else f"{summary['prompts']} prompt(s), {summary['zoomed']} zoomed"
    )
    print(
        f"{args.output}: {found} instance(s) from {what} ({summary['model']}; embeddings: {cache['hits']} "
        f"cached, {cache['misses']} computed; {summary['timings']['total']:.1f} s)"
    )
    return 0
