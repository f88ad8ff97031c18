"""``samadapt geo segment`` / ``geo info`` run as a user runs them, on the solaris sample (16-bit pan,
EPSG:32616, 0.5 m; tests/data/geo/ATTRIBUTION.md) with the tiny random core."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pyogrio = pytest.importorskip("pyogrio")

from cli_helpers import TESTS, run_samadapt, write_tiny_checkpoint  # noqa: E402

RASTER = TESTS / "data" / "geo" / "sample_geotiff.tif"
LABELS = TESTS / "data" / "geo" / "geotiff_labels.geojson"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("geo_ckpt") / "tiny.pt")


def _geo(tmp_path: Path, tiny: Path, *args: str | Path) -> tuple[int, str, str]:
    result = run_samadapt(
        "geo", "segment", RASTER, *args, "--checkpoint", tiny, "--precision", "fp32",
        "--cache-dir", tmp_path / "cache", "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    return result.returncode, result.stdout, result.stderr


def _same_grid(path: Path) -> np.ndarray:
    with rasterio.open(path) as out, rasterio.open(RASTER) as src:
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
        return out.read(1)


def _buildings(count: int) -> list[dict]:
    features = json.loads(LABELS.read_text())["features"][:count]
    for n, feature in enumerate(features):
        feature["properties"] = {"id": f"bldg{n}"}
    return features


def test_geo_info_describes_the_raster(tmp_path: Path) -> None:
    result = run_samadapt("geo", "info", RASTER, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "EPSG:32616" in out and "900 x 900" in out and "uint16" in out and "nodata: 0.0" in out
    assert "stretch (percentiles [2.0, 98.0])" in out


def test_geo_segment_vector_prompts_skips_outside_and_caches(tmp_path: Path, tiny: Path) -> None:
    outside = {
        "type": "Feature",
        "properties": {"id": "far-away"},
        "geometry": {"type": "Point", "coordinates": [100.0, 100.0]},
    }
    collection = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32616"}},
        "features": [*_buildings(4), outside],
    }
    prompts = tmp_path / "prompts.geojson"
    prompts.write_text(json.dumps(collection))
    args = ("--prompts", prompts, "-o", "out.tif", "--vector", "out.gpkg", "--json")
    code, stdout, stderr = _geo(tmp_path, tiny, *args)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["skipped"] == ["far-away"] and summary["prompts"] == 4
    assert summary["cache"]["misses"] == 4 and summary["cache"]["hits"] == 0
    labels = _same_grid(tmp_path / "out.tif")
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    meta, _, _geometry, fields = pyogrio.raw.read(tmp_path / "out.gpkg")
    assert "32616" in meta["crs"] and {"id", "score", "area", "feature_id"} <= set(meta["fields"])
    ids = fields[list(meta["fields"]).index("feature_id")]
    assert set(ids) <= {"bldg0", "bldg1", "bldg2", "bldg3"} and len(ids) == summary["instances"]
    first = labels.copy()
    code, stdout, stderr = _geo(tmp_path, tiny, *args)
    assert code == 0, stderr
    again = json.loads(stdout)
    assert again["cache"] == {**summary["cache"], "hits": 4, "misses": 0}
    assert np.array_equal(_same_grid(tmp_path / "out.tif"), first)  # cached embeddings, same masks


def test_geo_box_in_another_crs_lands_where_it_should(tmp_path: Path, tiny: Path) -> None:
    from rasterio.warp import transform_bounds

    feature = _buildings(1)[0]
    xs = [x for ring in feature["geometry"]["coordinates"] for x, _ in ring]
    ys = [y for ring in feature["geometry"]["coordinates"] for _, y in ring]
    utm = [min(xs), min(ys), max(xs), max(ys)]
    lonlat = transform_bounds("EPSG:32616", "EPSG:4326", *utm, densify_pts=21)
    native = _geo(tmp_path, tiny, "--box", *map(str, utm), "-o", "utm.tif", "--json")
    wgs84 = _geo(tmp_path, tiny, "--box", *map(str, lonlat), "--crs", "EPSG:4326", "-o", "wgs.tif", "--json")
    assert native[0] == 0 and wgs84[0] == 0, native[2] + wgs84[2]
    record_utm = json.loads(native[1])["records"][0]
    record_wgs = json.loads(wgs84[1])["records"][0]
    assert record_utm["zoomed"] == record_wgs["zoomed"]
    # the same window within the few pixels the 4326 envelope of the box adds
    assert np.allclose(record_utm["window"], record_wgs["window"], atol=3), (record_utm, record_wgs)
    with rasterio.open(RASTER) as src:
        t = src.transform
    col0, col1 = (utm[0] - t.c) / t.a, (utm[2] - t.c) / t.a
    row0, row1 = (utm[3] - t.f) / t.e, (utm[1] - t.f) / t.e
    labels = _same_grid(tmp_path / "wgs.tif")
    rows, cols = np.nonzero(labels == 1)
    if rows.size:  # any mask lies in the prompt's window around the building, not elsewhere
        side = max(col1 - col0, row1 - row0) * 2 + 2
        assert abs(cols.mean() - (col0 + col1) / 2) < side and abs(rows.mean() - (row0 + row1) / 2) < side


def test_geo_auto_writes_instances_on_the_input_grid(tmp_path: Path, tiny: Path) -> None:
    args = ("--auto", "--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-thresh", "0")
    code, stdout, stderr = _geo(tmp_path, tiny, *args, "--single-mask", "--tile", "256", "-o", "auto.tif")
    assert code == 0, stderr
    assert "auto.tif:" in stdout and "16 tile(s)" in stdout
    labels = _same_grid(tmp_path / "auto.tif")
    assert labels.dtype == np.int32 and labels.max() >= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-o", "x.tif"), "exactly one prompt source"),
        (("--auto", "--box", "1", "2", "3", "4", "-o", "x.tif"), "exactly one prompt source"),
        (("--auto", "-o", "x.png"), "must end in .tif"),
        (("--box", "0", "0", "1", "1", "-o", "x.tif"), "outside the raster"),
        (("--auto", "--tile", "64", "--overlap", "64", "-o", "x.tif"), "--overlap"),
    ],
)
def test_geo_errors_are_one_line(tmp_path: Path, tiny: Path, args: tuple[str, ...], message: str) -> None:
    code, _stdout, stderr = _geo(tmp_path, tiny, *args)
    assert code != 0 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "x.tif").exists()


def test_geo_resolution_and_cog_keep_the_input_grid(tmp_path: Path, tiny: Path) -> None:
    """Read at 1 m (the file has 0.5 m): the output is resampled back to the input's grid, as a COG."""
    feature = _buildings(1)[0]
    xs = [x for ring in feature["geometry"]["coordinates"] for x, _ in ring]
    ys = [y for ring in feature["geometry"]["coordinates"] for _, y in ring]
    box = [str(v) for v in (min(xs), min(ys), max(xs), max(ys))]
    code, _stdout, stderr = _geo(tmp_path, tiny, "--box", *box, "--resolution", "1", "--cog", "-o", "r.tif")
    assert code == 0, stderr
    labels = _same_grid(tmp_path / "r.tif")
    assert set(np.unique(labels)) <= {0, 1}
    with rasterio.open(tmp_path / "r.tif") as out:
        assert out.overviews(1) or max(out.shape) <= 512  # COG layout (overviews when big enough)
