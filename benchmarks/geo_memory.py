"""Memory and speed of tiled raster segmentation (``samadapt geo segment --auto``) on synthetic GeoTIFFs.

Three measurements, each case in its own subprocess (peak RSS from ``ru_maxrss`` of that process only):

1. **memory**: the tiled, streamed automatic mode on a synthetic ``--size`` x ``--size`` 3-band uint8
   raster (default 20000 x 20000, written tiled + deflate with rasterio, block by block), then on the
   same raster with twice the rows (twice the pixels). Target: peak RSS < 2 GB and flat (the working
   set is one tile row: it grows with the raster's width, not its height or area).
2. **throughput**: megapixels per second of the streamed mode against a naive whole-image approach (the
   whole raster read into memory, per-tile min-max, the label raster allocated in full and written at
   the end, as samgeo's ``generate_masks_tiled``) on a ``--naive-size`` raster both can hold, same model
   and tiles. The naive peak RSS grows with the raster.
3. **cache**: box prompts from ``tests/data/geo/geotiff_labels.geojson`` (43 buildings) on the solaris
   16-bit pan ``sample_geotiff.tif`` (the path of ``samadapt geo segment --prompts``), twice, with the
   ``--cache-model`` (default LiteMedSAM) and an empty cache folder: the second run reads every
   embedding from disk. Target: >= 5x faster. (The automatic mode gains less from the cache on CPU:
   its point grid costs LiteMedSAM's decoder about as much as the encoder.)

Times are wall seconds and, because the machine may be shared, CPU seconds of the process too.

The memory and throughput cases use ``--model tiny`` by default (the tiny random core, 128-pixel input,
``--tile 1024``, a 2 x 2 point grid per tile): the point is memory and I/O, and LiteMedSAM on
20000 x 20000 pixels (~6000 tiles of 256) takes hours on 2 CPU cores. Pass ``--model litemedsam`` on a
machine that can afford it.

    .venv/bin/python benchmarks/geo_memory.py [--size 20000] [--naive-size 4096] [--cache-model litemedsam]
        [--model tiny|litemedsam] [--tile 1024] [--points 2] [--workdir DIR] [--json out.json]
    .venv/bin/python benchmarks/geo_memory.py --quick   # 2048-pixel rasters: a one-minute smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("GDAL_CACHEMAX", "256")
DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "geo"
RASTER, PROMPTS = DATA / "sample_geotiff.tif", DATA / "geotiff_labels.geojson"


def make_raster(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A (3, height, width) uint8 GeoTIFF of bright rectangles ('buildings') on a textured ground.

    Written 512 x 512 block by block (memory bounded), tiled and deflate-compressed, EPSG:32616, 0.5 m.
    """
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8",
        "crs": "EPSG:32616", "transform": Affine(0.5, 0, 300000.0, 0, -0.5, 4000000.0), "tiled": True,
        "blockxsize": 512, "blockysize": 512, "compress": "deflate", "BIGTIFF": "IF_SAFER",
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, height, 512):
            for col in range(0, width, 512):
                h, w = min(512, height - row), min(512, width - col)
                rng = np.random.default_rng(seed + row * 7919 + col)
                block = rng.integers(40, 90, (3, h, w), dtype=np.uint8)
                for _ in range(6):
                    r0, c0 = rng.integers(0, max(h - 8, 1)), rng.integers(0, max(w - 8, 1))
                    rh, rw = rng.integers(8, 60, 2)
                    block[:, r0 : r0 + rh, c0 : c0 + rw] = rng.integers(150, 250)
                dst.write(block, window=Window(col, row, w, h))
    return path


def _predictor(model: str) -> Any:
    import torch

    import samadapt
    from samadapt import Predictor

    if model == "tiny":
        torch.manual_seed(0)
        return Predictor(samadapt.build("tiny"), precision="fp32")
    from samadapt.checkpoint import load_model
    from samadapt.weights import verified_default_checkpoint

    return Predictor(load_model(verified_default_checkpoint()), precision="auto")


def _generator(predictor: Any, points: int) -> Any:
    from samadapt.automatic import AutomaticMaskGenerator

    return AutomaticMaskGenerator(
        predictor,
        points_per_side=points,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        multimask_output=False,
    )


def case_streamed(args: argparse.Namespace) -> dict[str, Any]:
    """The library path of ``samadapt geo segment --auto``: GeoRaster -> tiles -> GeoTiffWriter."""
    from samadapt.domains.remote_sensing.cache import EmbeddingCache
    from samadapt.domains.remote_sensing.raster import GeoRaster
    from samadapt.domains.remote_sensing.segment import segment_auto
    from samadapt.domains.remote_sensing.tiling import TileGrid
    from samadapt.domains.remote_sensing.writers import GeoTiffWriter

    predictor = _predictor(args.model)
    start, cpu = time.perf_counter(), time.process_time()
    with GeoRaster.open(args.raster) as raster:
        cache = EmbeddingCache.for_raster(
            args.cache_dir, raster, predictor.model, predictor.precision, enabled=args.cache_dir is not None
        )
        grid = TileGrid(raster.width, raster.height, args.tile, args.tile // 8)
        with GeoTiffWriter(args.out, like=raster, dtype="int32") as writer:
            records = segment_auto(
                _generator(predictor, args.points), raster, grid, writer, cache=cache, progress=False,
                workdir=Path(args.out).parent,
            )  # fmt: skip
        pixels = raster.width * raster.height
    seconds = time.perf_counter() - start
    return {
        "tiles": len(grid),
        "instances": len(records),
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,
        "mp_per_s": pixels / 1e6 / seconds,
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
    }


def case_prompts(args: argparse.Namespace) -> dict[str, Any]:
    """The library path of ``samadapt geo segment --prompts FILE`` with the embedding cache."""
    from samadapt.domains.remote_sensing.cache import EmbeddingCache
    from samadapt.domains.remote_sensing.prompts import vector_prompts
    from samadapt.domains.remote_sensing.raster import GeoRaster
    from samadapt.domains.remote_sensing.segment import segment_prompts
    from samadapt.domains.remote_sensing.writers import GeoTiffWriter

    predictor = _predictor(args.model)
    start, cpu = time.perf_counter(), time.process_time()
    with GeoRaster.open(args.raster) as raster:
        prompts, _ = vector_prompts(args.prompts, raster)
        cache = EmbeddingCache.for_raster(args.cache_dir, raster, predictor.model, predictor.precision)
        with GeoTiffWriter(args.out, like=raster, dtype="uint8") as writer:
            records = segment_prompts(predictor, raster, prompts, writer, cache=cache, progress=False)
    return {
        "prompts": len(prompts),
        "instances": sum(1 for r in records.values() if r["pixels"]),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
    }


def case_naive(args: argparse.Namespace) -> dict[str, Any]:
    """Whole raster in RAM, per-tile min-max, full label array in RAM, one write at the end."""
    import rasterio

    from samadapt.domains.remote_sensing.tiling import TileGrid

    predictor = _predictor(args.model)
    generator = _generator(predictor, args.points)
    start, cpu = time.perf_counter(), time.process_time()
    with rasterio.open(args.raster) as src:
        image = src.read().transpose(1, 2, 0)  # (H, W, 3): the whole raster
        profile = src.profile
    height, width = image.shape[:2]
    labels = np.zeros((height, width), dtype=np.int32)
    grid = TileGrid(width, height, args.tile, args.tile // 8)
    next_id = 0
    for _, _, window in grid:
        r0, c0 = int(window.row_off), int(window.col_off)
        tile = image[r0 : r0 + args.tile, c0 : c0 + args.tile].astype(np.float32)
        tile = ((tile - tile.min()) / max(float(np.ptp(tile)), 1e-6) * 255).astype(
            np.uint8
        )  # per-tile min-max
        local = generator.generate(tile).label_map()
        labels[r0 : r0 + tile.shape[0], c0 : c0 + tile.shape[1]] = np.where(local > 0, local + next_id, 0)
        next_id += int(local.max())
    profile.update(count=1, dtype="int32", compress="deflate", tiled=True)
    with rasterio.open(args.out, "w", **profile) as dst:
        dst.write(labels, 1)
    seconds = time.perf_counter() - start
    return {
        "tiles": len(grid),
        "instances": next_id,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,
        "mp_per_s": width * height / 1e6 / seconds,
    }


def run_case(
    case: str, raster: Path, out: Path, args: argparse.Namespace, model: str, cache_dir: Path | None = None
) -> dict[str, Any]:
    """One case in a fresh subprocess; its result plus peak RSS in MB."""
    command = [sys.executable, __file__, "--case", case, "--raster", str(raster), "--out", str(out),
               "--model", model, "--tile", str(args.tile), "--points", str(args.points),
               "--prompts", str(PROMPTS)]  # fmt: skip
    if cache_dir is not None:
        command += ["--cache-dir", str(cache_dir)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {case:<9} {raster.name}: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--naive-size", type=int, default=4096)
    parser.add_argument("--model", choices=("tiny", "litemedsam"), default="tiny")
    parser.add_argument("--cache-model", choices=("tiny", "litemedsam"), default="litemedsam")
    parser.add_argument("--tile", type=int, default=1024, help="tile side of the memory/throughput cases")
    parser.add_argument("--points", type=int, default=2, help="grid points per tile side")
    parser.add_argument("--workdir", help="where the synthetic rasters go (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="2048-pixel rasters: a smoke run")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--raster", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process
        cases = {"streamed": case_streamed, "naive": case_naive, "prompts": case_prompts}
        result = cases[args.case](args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    if args.quick:
        args.size, args.naive_size = 2048, 1024
    work = Path(args.workdir or tempfile.mkdtemp(prefix="geo-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"model": args.model, "tile": args.tile, "points_per_side": args.points}
    try:
        sizes = f"{args.size} x {args.size} and {args.size} x {2 * args.size}"
        print(f"memory: {sizes} ({args.model}, tile {args.tile})")
        small = make_raster(work / "single.tif", args.size, args.size)
        double = make_raster(work / "double.tif", args.size, 2 * args.size, seed=1)
        results["memory"] = {
            "single": run_case("streamed", small, work / "out_single.tif", args, args.model),
            "double": run_case("streamed", double, work / "out_double.tif", args, args.model),
        }
        for name in ("single", "double", "out_single", "out_double"):
            (work / f"{name}.tif").unlink(missing_ok=True)
        print(f"throughput: {args.naive_size} x {args.naive_size}, streamed vs naive whole-image")
        both = make_raster(work / "both.tif", args.naive_size, args.naive_size, seed=2)
        results["throughput"] = {
            "streamed": run_case("streamed", both, work / "out_streamed.tif", args, args.model),
            "naive": run_case("naive", both, work / "out_naive.tif", args, args.model),
        }
        print(f"cache: {RASTER.name} + {PROMPTS.name} twice ({args.cache_model})")
        cache_dir = work / "cache"
        first = run_case("prompts", RASTER, work / "out_c1.tif", args, args.cache_model, cache_dir)
        second = run_case("prompts", RASTER, work / "out_c2.tif", args, args.cache_model, cache_dir)
        results["cache"] = {
            "first": first,
            "second": second,
            "speedup": first["seconds"] / second["seconds"],
            "cpu_speedup": first["cpu_seconds"] / second["cpu_seconds"],
        }
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    memory, speed = results["memory"], results["throughput"]
    print(
        f"peak RSS {memory['single']['peak_rss_mb']:.0f} MB -> {memory['double']['peak_rss_mb']:.0f} MB "
        f"with twice the pixels; streamed {speed['streamed']['mp_per_s']:.2f} MP/s "
        f"({speed['streamed']['peak_rss_mb']:.0f} MB) vs naive "
        f"{speed['naive']['mp_per_s']:.2f} MP/s ({speed['naive']['peak_rss_mb']:.0f} MB); "
        f"cached second run {results['cache']['speedup']:.1f}x faster "
        f"({results['cache']['cpu_speedup']:.1f}x in CPU time)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
