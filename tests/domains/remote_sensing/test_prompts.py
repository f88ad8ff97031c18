"""Map-coordinate prompts: command line in any CRS, vector files (4 formats), pixels on any affine grid.

The synthetic raster uses an equirectangular projection on WGS84 (x = a * lon + 500 km, y = a * lat, in
radians, a = 6378137 m), so where a prompt given in EPSG:4326 must land is known in closed form.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pyogrio = pytest.importorskip("pyogrio")
import shapely  # noqa: E402
from affine import Affine  # noqa: E402

from samadapt.domains.remote_sensing.prompts import (  # noqa: E402
    MapPrompt,
    cli_prompts,
    to_pixels,
    vector_prompts,
)
from samadapt.domains.remote_sensing.raster import GeoRaster  # noqa: E402
from samadapt.errors import InputError  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "data" / "geo"
PAN = DATA / "sample_geotiff.tif"
LABELS = DATA / "geotiff_labels.geojson"
A = 6378137.0
EQC = "+proj=eqc +lat_ts=0 +lat_0=0 +lon_0=0 +x_0=500000 +y_0=0 +datum=WGS84 +units=m +no_defs"
# 200 x 100 pixels of 2 m x 3 m; top-left corner at lon 10 deg, lat 45 deg.
X0 = A * math.radians(10.0) + 500000.0
Y0 = A * math.radians(45.0)
TRANSFORM = Affine(2.0, 0.0, X0, 0.0, -3.0, Y0)


def _eqc(lon: float, lat: float) -> tuple[float, float]:
    return A * math.radians(lon) + 500000.0, A * math.radians(lat)


def _lonlat(col: float, row: float) -> tuple[float, float]:
    x, y = X0 + 2.0 * col, Y0 - 3.0 * row
    return math.degrees((x - 500000.0) / A), math.degrees(y / A)


@pytest.fixture
def raster(tmp_path: Path):
    path = tmp_path / "eqc.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=200, height=100, count=1, dtype="uint8", crs=EQC, transform=TRANSFORM
    ) as dst:
        dst.write(np.arange(200 * 100, dtype=np.uint32).reshape(1, 100, 200).astype(np.uint8) | 1)
    with GeoRaster.open(path) as opened:
        yield opened


def test_point_in_epsg4326_lands_on_its_pixel(raster: GeoRaster) -> None:
    lon, lat = _lonlat(150.5, 20.5)  # centre of pixel (col 150, row 20)
    (prompt,) = cli_prompts(None, [[lon, lat]], "EPSG:4326", raster)
    assert prompt.kind == "point" and prompt.label == 1 and prompt.feature_id is None
    assert prompt.coords == pytest.approx(_eqc(lon, lat), abs=1e-6)
    np.testing.assert_allclose(to_pixels(prompt, raster.transform), [150.5, 20.5], atol=1e-6)
    (background,) = cli_prompts(None, [[lon, lat, 0]], "EPSG:4326", raster)
    assert background.label == 0


def test_box_in_epsg4326_lands_on_its_pixels(raster: GeoRaster) -> None:
    lon0, lat1 = _lonlat(20, 10)
    lon1, lat0 = _lonlat(60, 70)
    (prompt,) = cli_prompts([[lon0, lat0, lon1, lat1]], None, "EPSG:4326", raster)
    assert prompt.kind == "box"
    np.testing.assert_allclose(prompt.coords, [X0 + 40, Y0 - 210, X0 + 120, Y0 - 30], atol=1e-6)
    np.testing.assert_allclose(to_pixels(prompt, raster.transform), [20, 10, 60, 70], atol=1e-6)


def test_box_in_raster_crs_by_default_and_partly_outside_is_not_clipped(raster: GeoRaster) -> None:
    box = [X0 - 100.0, Y0 - 90.0, X0 + 50.0, Y0 + 30.0]  # sticks out to the left and top
    (prompt,) = cli_prompts([box], None, None, raster)
    assert prompt.coords == tuple(box)
    np.testing.assert_allclose(to_pixels(prompt, raster.transform), [-50, -10, 25, 30])


def test_cli_prompts_outside_or_malformed_are_refused(raster: GeoRaster) -> None:
    with pytest.raises(InputError, match=r"--box 1 lies outside the raster"):
        cli_prompts([[0.0, 0.0, 1.0, 1.0]], None, None, raster)
    with pytest.raises(InputError, match=r"--point 1 lies outside"):
        cli_prompts(None, [[11.0, 45.0]], "EPSG:4326", raster)
    with pytest.raises(InputError, match="MINX < MAXX"):
        cli_prompts([[X0 + 10, Y0 - 10, X0, Y0]], None, None, raster)
    with pytest.raises(InputError, match="needs 4 numbers"):
        cli_prompts([[X0, Y0, X0 + 1]], None, None, raster)
    with pytest.raises(InputError, match="unknown CRS"):
        cli_prompts(None, [[X0, Y0]], "EPSG:not-a-code", raster)
    with pytest.raises(InputError, match="label"):
        cli_prompts(None, [[X0 + 1, Y0 - 1, 7]], None, raster)


def _write_features(path: Path, crs: str, geometries: list, ids: list[str], labels: list[int]) -> None:
    driver = {".geojson": "GeoJSON", ".gpkg": "GPKG", ".fgb": "FlatGeobuf", ".shp": "ESRI Shapefile"}[
        path.suffix
    ]
    wkb = np.asarray([None if g is None else shapely.to_wkb(g) for g in geometries], dtype=object)
    pyogrio.raw.write(
        path,
        wkb,
        [np.asarray(ids, dtype=object), np.asarray(labels, dtype=np.int32)],
        ["id", "label"],
        driver=driver,
        crs=crs,
        geometry_type="Unknown" if driver != "ESRI Shapefile" else "Point",
    )


@pytest.mark.parametrize("suffix", [".geojson", ".gpkg", ".fgb"])
def test_vector_file_in_4326_with_one_feature_outside(raster: GeoRaster, tmp_path: Path, suffix: str) -> None:
    lon0, lat1 = _lonlat(10, 5)
    lon1, lat0 = _lonlat(30, 25)
    inside = shapely.box(lon0, lat0, lon1, lat1)
    point = shapely.Point(*_lonlat(100.5, 50.5))
    outside = shapely.box(12.0, 46.0, 12.1, 46.1)  # far to the north-east
    path = tmp_path / f"prompts{suffix}"
    _write_features(path, "EPSG:4326", [inside, point, outside], ["house-1", "tree", "far"], [1, 0, 1])
    prompts, skipped = vector_prompts(path, raster)
    prompts.sort(key=lambda p: p.kind)  # FlatGeobuf's spatial index reorders features
    assert skipped == ["far"]
    assert [(p.kind, p.feature_id, p.label) for p in prompts] == [("box", "house-1", 1), ("point", "tree", 0)]
    np.testing.assert_allclose(to_pixels(prompts[0], raster.transform), [10, 5, 30, 25], atol=1e-6)
    np.testing.assert_allclose(to_pixels(prompts[1], raster.transform), [100.5, 50.5], atol=1e-6)


def test_shapefile_points_in_raster_crs(raster: GeoRaster, tmp_path: Path) -> None:
    path = tmp_path / "points.shp"
    points = [shapely.Point(X0 + 21.0, Y0 - 33.0), shapely.Point(X0 - 5.0, Y0 - 3.0)]
    _write_features(path, EQC, points, ["a", "b"], [1, 1])
    prompts, skipped = vector_prompts(path, raster)
    assert skipped == ["b"]
    assert len(prompts) == 1 and prompts[0].feature_id == "a"
    np.testing.assert_allclose(to_pixels(prompts[0], raster.transform), [10.5, 11.0], atol=1e-6)


def test_features_without_geometry_are_skipped_and_fids_used_without_id_field(
    raster: GeoRaster, tmp_path: Path
) -> None:
    inside = shapely.box(X0 + 10, Y0 - 30, X0 + 20, Y0 - 6)
    path = tmp_path / "fids.geojson"
    features = [
        {"type": "Feature", "properties": {"name": "x"}, "geometry": shapely.geometry.mapping(inside)},
        {"type": "Feature", "properties": {"name": "y"}, "geometry": None},
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with pytest.raises(InputError, match="says its CRS is geographic"):  # no crs member means WGS84
        vector_prompts(path, raster)
    crs = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::4087"}}  # same as EQC minus 500 km
    moved = shapely.affinity.translate(inside, xoff=-500000.0)
    features[0]["geometry"] = shapely.geometry.mapping(moved)
    path.write_text(json.dumps({"type": "FeatureCollection", "crs": crs, "features": features}))
    prompts, skipped = vector_prompts(path, raster)
    assert skipped == ["1"]
    assert [p.feature_id for p in prompts] == ["0"]
    np.testing.assert_allclose(to_pixels(prompts[0], raster.transform), [5, 2, 10, 10], atol=1e-6)


def test_solaris_building_footprints_become_their_bounding_boxes() -> None:
    collection = json.loads(LABELS.read_text())
    expected = [shapely.geometry.shape(f["geometry"]).bounds for f in collection["features"]]
    with GeoRaster.open(PAN) as raster:
        prompts, skipped = vector_prompts(LABELS, raster)
        pixels = np.array([to_pixels(p, raster.transform) for p in prompts])
    assert skipped == [] and len(prompts) == 43
    assert [p.feature_id for p in prompts] == [str(i) for i in range(43)]
    np.testing.assert_allclose([p.coords for p in prompts], expected)
    assert (pixels[:, 0] < pixels[:, 2]).all() and (pixels[:, 1] < pixels[:, 3]).all()
    assert pixels.min() >= 0 and pixels.max() <= 900
    # first building: 733632.95..733644.03 E, 3724892.16..3724917.33 N at 0.5 m
    np.testing.assert_allclose(pixels[0], [63.905, 443.346, 86.053, 493.684], atol=1e-3)


def test_solaris_buildings_from_4326_land_back_within_a_few_centimetres(tmp_path: Path) -> None:
    """The same footprints reprojected to EPSG:4326 and written as GeoPackage give the same boxes."""
    with GeoRaster.open(PAN) as raster:
        native, _ = vector_prompts(LABELS, raster)
        _, _, wkb, _ = pyogrio.raw.read(LABELS)
        geoms = [
            rasterio.warp.transform_geom(raster.crs, "EPSG:4326", shapely.geometry.mapping(g))
            for g in shapely.from_wkb(wkb)
        ]
        path = tmp_path / "buildings.gpkg"
        _write_features(
            path,
            "EPSG:4326",
            [shapely.geometry.shape(g) for g in geoms],
            [str(i) for i in range(43)],
            [1] * 43,
        )
        moved, skipped = vector_prompts(path, raster)
    assert skipped == [] and len(moved) == 43
    np.testing.assert_allclose([p.coords for p in moved], [p.coords for p in native], atol=0.05)


@pytest.mark.parametrize(
    ("transform", "expected"),
    [
        (Affine(2.0, 0.0, 100.0, 0.0, -3.0, 400.0), [5, 10, 15, 20]),  # north-up
        (Affine(2.0, 0.0, 100.0, 0.0, 3.0, 310.0), [5, 10, 15, 20]),  # south-up (positive y step)
        (Affine(-2.0, 0.0, 140.0, 0.0, -3.0, 400.0), [5, 10, 15, 20]),  # mirrored x
    ],
)
def test_to_pixels_orders_corners_on_any_grid(transform: Affine, expected: list[float]) -> None:
    box = MapPrompt("box", (110.0, 340.0, 130.0, 370.0))
    pixels = to_pixels(box, transform)
    np.testing.assert_allclose(pixels, expected, atol=1e-9)
    assert pixels[0] < pixels[2] and pixels[1] < pixels[3]


def test_to_pixels_on_a_rotated_grid_is_the_corner_envelope() -> None:
    transform = Affine(0.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # axes swapped: x = row, y = col
    point = MapPrompt("point", (-3.0, 2.0))
    col, row = to_pixels(point, transform)
    x, y = (
        transform.a * col + transform.b * row + transform.c,
        transform.d * col + transform.e * row + transform.f,
    )
    assert (x, y) == pytest.approx((-3.0, 2.0))
    box = to_pixels(MapPrompt("box", (-4.0, 1.0, -2.0, 5.0)), transform)
    assert box[0] < box[2] and box[1] < box[3]
    assert box[2] - box[0] == pytest.approx(4.0) and box[3] - box[1] == pytest.approx(2.0)


def test_vector_prompt_file_errors(raster: GeoRaster, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        vector_prompts(tmp_path / "missing.gpkg", raster)
    kml = tmp_path / "prompts.kml"
    kml.write_text("<kml/>")
    with pytest.raises(InputError, match="must end in one of"):
        vector_prompts(kml, raster)
    broken = tmp_path / "broken.geojson"
    broken.write_text("{not json")
    with pytest.raises(InputError, match=r"broken\.geojson") as caught:
        vector_prompts(broken, raster)
    assert "\n" not in str(caught.value)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_prompts_in_another_crs_need_a_georeferenced_raster(tmp_path: Path) -> None:
    path = tmp_path / "plain.tif"
    profile = {"driver": "GTiff", "width": 20, "height": 10, "count": 1, "dtype": "uint8"}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ones((1, 10, 20), np.uint8))
    with GeoRaster.open(path) as plain:
        assert plain.crs is None
        (pixel,) = cli_prompts(None, [[5.5, 2.5]], None, plain)  # no CRS: pixel coordinates
        np.testing.assert_allclose(to_pixels(pixel, plain.transform), [5.5, 2.5])
        with pytest.raises(InputError, match="needs a raster with a CRS"):
            cli_prompts(None, [[5.5, 2.5]], "EPSG:4326", plain)
