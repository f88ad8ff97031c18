"""The map picture of docs/remote_sensing.md: `samadapt geo segment` polygons over the solaris raster.

Runs exactly

    samadapt geo segment tests/data/geo/sample_geotiff.tif --prompts tests/data/geo/geotiff_labels.geojson
        -o OUT/buildings.tif --vector OUT/buildings.gpkg --json [--cache-dir DIR]

then draws the stretched 16-bit pan raster in map coordinates (EPSG:32616), the output polygons (orange)
and the manual building outlines (cyan), and prints the mean building IoU (prompt n = feature n).

    .venv/bin/python docs/scripts/geo_figures.py [--out docs/img/geo_buildings.png] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RASTER = REPO / "tests/data/geo/sample_geotiff.tif"
LABELS = REPO / "tests/data/geo/geotiff_labels.geojson"


def building_ious(labels_tif: Path) -> np.ndarray:
    """IoU of instance n of ``labels_tif`` with building feature n (rasterized on the same grid)."""
    import pyogrio.raw
    import rasterio
    import shapely
    from rasterio.features import rasterize

    _, _, wkb, _ = pyogrio.raw.read(LABELS)
    with rasterio.open(labels_tif) as src:
        ids, transform = src.read(1), src.transform
    ious = []
    for n, geom in enumerate(shapely.from_wkb(wkb), start=1):
        truth = rasterize([(geom, 1)], out_shape=ids.shape, transform=transform).astype(bool)
        pred = ids == n
        ious.append((truth & pred).sum() / max((truth | pred).sum(), 1))
    return np.asarray(ious)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs/img/geo_buildings.png")
    parser.add_argument("--cache-dir", type=Path, help="embedding cache (reused by a second run)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyogrio.raw
    import rasterio
    import shapely

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        command = [
            str(Path(sys.executable).with_name("samadapt")), "geo", "segment", str(RASTER),
            "--prompts", str(LABELS), "-o", str(out / "buildings.tif"),
            "--vector", str(out / "buildings.gpkg"), "--json", "--no-progress",
        ]  # fmt: skip
        if args.cache_dir:
            command += ["--cache-dir", str(args.cache_dir)]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        summary = json.loads(proc.stdout)
        ious = building_ious(out / "buildings.tif")
        _, _, pred_wkb, _ = pyogrio.raw.read(out / "buildings.gpkg")
        _, _, label_wkb, _ = pyogrio.raw.read(LABELS)
        with rasterio.open(RASTER) as src:
            pan = src.read(1).astype(np.float64)
            bounds = src.bounds
        low, high = np.percentile(pan[pan > 0], (2, 98))
        shown = np.clip((pan - low) / (high - low), 0, 1)
        fig, ax = plt.subplots(figsize=(8, 8))
        ax.imshow(shown, cmap="gray", extent=(bounds.left, bounds.right, bounds.bottom, bounds.top))
        for wkb, color, width in ((label_wkb, "#00d0ff", 1.0), (pred_wkb, "#ff8c00", 1.4)):
            for geom in shapely.from_wkb(wkb):
                for part in getattr(geom, "geoms", [geom]):
                    x, y = part.exterior.xy
                    ax.plot(x, y, color=color, linewidth=width)
        ax.set_xlabel("easting (m, EPSG:32616)")
        ax.set_ylabel("northing (m)")
        ax.ticklabel_format(useOffset=False, style="plain")
        ax.set_title(
            f"samadapt geo segment, LiteMedSAM, {len(ious)} building boxes (--zoom auto): "
            f"mean IoU {ious.mean():.3f}\norange = output polygons, cyan = manual outlines",
            fontsize=9,
        )
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=80)
        plt.close(fig)
    print(
        f"mean building IoU {ious.mean():.3f} (median {np.median(ious):.3f}); {summary['instances']} found"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
