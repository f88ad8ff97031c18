"""GeoTiffWriter (grid, nodata, atomicity, COG, resolution round trip) and polygonize/write_vectors.

A synthetic square at known map coordinates must polygonize back to exactly those coordinates (north-up,
non-square pixels, a custom projected CRS); the solaris building footprints, rasterized and written,
must come back as polygons with their areas.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
features = pytest.importorskip("rasterio.features")
warp = pytest.importorskip("rasterio.warp")
pyogrio = pytest.importorskip("pyogrio")
import shapely  # noqa: E402
from affine import Affine  # noqa: E402
from rasterio.crs import CRS  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from samadapt.domains.remote_sensing.raster import GeoRaster  # noqa: E402
from samadapt.domains.remote_sensing.vectors import area_of, polygonize, write_vectors  # noqa: E402
from samadapt.domains.remote_sensing.writers import GeoTiffWriter  # noqa: E402
from samadapt.errors import InputError  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "data" / "geo"
PAN = DATA / "sample_geotiff.tif"
RGB = DATA / "RGB.byte.tif"
LABELS = DATA / "geotiff_labels.geojson"
EQC = "+proj=eqc +lat_ts=0 +lat_0=0 +lon_0=0 +x_0=500000 +y_0=0 +datum=WGS84 +units=m +no_defs"
# North-up, pixels 0.5 m wide and 0.75 m tall.
TRANSFORM = Affine(0.5, 0.0, 1000.0, 0.0, -0.75, 2000.0)


@pytest.fixture
def synthetic(tmp_path: Path):
    path = tmp_path / "synthetic.tif"
    data = np.full((1, 300, 400), 100, dtype=np.uint16)
    data[0, 250:, :50] = 0  # nodata corner
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=400,
        height=300,
        count=1,
        dtype="uint16",
        crs=EQC,
        transform=TRANSFORM,
        nodata=0,
    ) as dst:
        dst.write(data)
    with GeoRaster.open(path) as raster:
        yield raster


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------- GeoTiffWriter
def test_output_has_the_inputs_grid_and_nodata_where_input_invalid(tmp_path: Path) -> None:
    out = tmp_path / "mask.tif"
    with GeoRaster.open(RGB) as raster, GeoTiffWriter(out, like=raster, tags={"model": "test"}) as writer:
        for window in raster.block_windows():
            _, valid = raster.read(window)
            h, w = int(window.height), int(window.width)
            writer.write(window, np.ones((h, w), np.uint8), valid=valid)
        assert not out.exists()  # only the temporary file exists until the writer closes
    with rasterio.open(RGB) as src:
        expected_valid = (src.read() != 0).any(axis=0)
        crs, transform, shape = src.crs, src.transform, (src.height, src.width)
    with rasterio.open(out) as dst:
        assert (dst.crs, dst.transform, (dst.height, dst.width)) == (crs, transform, shape)
        assert dst.nodata == 255 and dst.dtypes == ("uint8",) and dst.count == 1
        assert dst.block_shapes[0] == (512, 512) and dst.compression.value == "DEFLATE"
        assert dst.tags()["model"] == "test"
        written = dst.read(1)
        dataset_mask = dst.dataset_mask()
    np.testing.assert_array_equal(written == 1, expected_valid)
    np.testing.assert_array_equal(written == 255, ~expected_valid)
    np.testing.assert_array_equal(dataset_mask > 0, expected_valid)
    assert _files(tmp_path) == ["mask.tif"]


def test_output_file_mode_follows_the_umask_not_the_temp_files_owner_only_mode(
    synthetic: GeoRaster, tmp_path: Path
) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        with GeoTiffWriter(tmp_path / "mask.tif", like=synthetic) as writer:
            writer.write(Window(0, 0, 4, 4), np.ones((4, 4), np.uint8))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "mask.tif").stat().st_mode) == 0o644  # mkstemp alone gives 0o600


def test_windows_past_the_edge_are_clipped_and_read_back(synthetic: GeoRaster, tmp_path: Path) -> None:
    out = tmp_path / "ids.tif"
    with GeoTiffWriter(out, like=synthetic, dtype="uint16", nodata=None) as writer:
        writer.write(Window(380, 280, 64, 64), np.full((64, 64), 7, np.uint16))
        writer.write(Window(-10, -10, 20, 20), np.full((20, 20), 3, np.uint16))
        writer.write(Window(1000, 1000, 8, 8), np.full((8, 8), 9, np.uint16))  # entirely outside: no-op
        back = writer.read(Window(370, 270, 40, 40))
    assert (back[10:30, 10:30] == 7).all() and not back[:10].any() and not back[30:].any()
    with rasterio.open(out) as dst:
        ids = dst.read(1)
        assert dst.nodata is None
    assert int((ids == 7).sum()) == 20 * 20 and int((ids == 3).sum()) == 10 * 10
    assert int((ids > 0).sum()) == 500


def test_error_inside_the_block_leaves_nothing_and_keeps_the_old_output(
    synthetic: GeoRaster, tmp_path: Path
) -> None:
    out = tmp_path / "keep.tif"
    out.write_bytes(b"previous result")
    with pytest.raises(RuntimeError), GeoTiffWriter(out, like=synthetic) as writer:
        writer.write(Window(0, 0, 10, 10), np.ones((10, 10), np.uint8))
        raise RuntimeError("model crashed")
    assert out.read_bytes() == b"previous result"
    assert _files(tmp_path) == ["keep.tif", "synthetic.tif"]


def test_user_errors(synthetic: GeoRaster, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="must end in"):
        GeoTiffWriter(tmp_path / "mask.png", like=synthetic)
    with pytest.raises(InputError, match="folder does not exist"):
        GeoTiffWriter(tmp_path / "missing" / "mask.tif", like=synthetic)
    with pytest.raises(InputError, match="not a valid uint8"):
        GeoTiffWriter(tmp_path / "mask.tif", like=synthetic, nodata=-9999)
    with pytest.raises(InputError, match="dtype"):
        GeoTiffWriter(tmp_path / "mask.tif", like=synthetic, dtype="float32")
    assert _files(tmp_path) == ["synthetic.tif"]


def test_cog_output(tmp_path: Path) -> None:
    out = tmp_path / "mask.tif"
    with GeoRaster.open(PAN) as raster, GeoTiffWriter(out, like=raster, dtype="uint16", cog=True) as writer:
        writer.write(Window(0, 0, 900, 900), np.arange(900 * 900, dtype=np.uint32).reshape(900, 900) % 1000)
    with rasterio.open(out) as dst:
        assert dst.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert dst.overviews(1) == [2]
        assert dst.crs == CRS.from_epsg(32616) and dst.transform == Affine(
            0.5, 0, 733601.0, 0, -0.5, 3725139.0
        )
        assert int(dst.read(1)[899, 899]) == (899 * 900 + 899) % 1000
    assert _files(tmp_path) == ["mask.tif"]


def test_resolution_output_is_resampled_back_to_the_input_grid(synthetic: GeoRaster, tmp_path: Path) -> None:
    out = tmp_path / "coarse.tif"
    with GeoRaster.open(synthetic.path, resolution=1.5) as coarse:
        assert (coarse.width, coarse.height) == (134, 150)  # 200 m x 225 m at 1.5 m
        with GeoTiffWriter(out, like=coarse) as writer:
            mask = np.zeros((coarse.height, coarse.width), np.uint8)
            mask[20:40, 30:50] = 1  # map x 1045..1075, y 1970..1940
            writer.write(Window(0, 0, coarse.width, coarse.height), mask)
    with rasterio.open(out) as dst:
        assert (dst.width, dst.height, dst.transform, dst.crs) == (400, 300, TRANSFORM, synthetic.crs)
        result = dst.read(1)
    rows, cols = np.nonzero(result == 1)
    # x 1045..1075 -> cols 90..150; y 1970..1940 -> rows 40..80 (0.75 m rows)
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (90, 150, 40, 80)


def test_remap_merges_ids(synthetic: GeoRaster, tmp_path: Path) -> None:
    out = tmp_path / "ids.tif"
    with GeoTiffWriter(out, like=synthetic, dtype="int32") as writer:
        labels = np.zeros((300, 400), np.int32)
        labels[:, :200], labels[:, 200:] = 4, 5
        writer.write(
            Window(0, 0, 400, 300), labels, valid=np.asarray(synthetic.read(Window(0, 0, 400, 300))[1])
        )
        writer.remap({5: 4})
        writer.remap(np.array([0, 1, 2, 3, 1, 2]))
    with rasterio.open(out) as dst:
        ids = dst.read(1)
        assert dst.nodata == 2**31 - 1
    assert set(np.unique(ids)) == {1, 2**31 - 1}
    assert int((ids == 2**31 - 1).sum()) == 50 * 50


# ---------------------------------------------------------------------- vectors
def test_square_polygonizes_to_its_map_coordinates(synthetic: GeoRaster, tmp_path: Path) -> None:
    """A square at x 1010..1030, y 1955..1970 (40 x 20 pixels of 0.5 x 0.75 m) comes back exactly."""
    out = tmp_path / "square.tif"
    with GeoTiffWriter(out, like=synthetic, dtype="uint16") as writer:
        labels = np.zeros((300, 400), np.uint16)
        labels[40:60, 20:60] = 12
        writer.write(Window(0, 0, 400, 300), labels)
    polygons = polygonize(out)
    assert list(polygons) == [12]
    assert polygons[12].bounds == (1010.0, 1955.0, 1030.0, 1970.0)
    assert polygons[12].area == pytest.approx(20.0 * 15.0)
    assert polygons[12].equals(shapely.box(1010.0, 1955.0, 1030.0, 1970.0))
    from_array = polygonize(labels[30:70, 10:70], TRANSFORM, Window(10, 30, 60, 40))
    assert from_array[12].equals(polygons[12])


def test_object_across_chunks_is_one_polygon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from samadapt.domains.remote_sensing import vectors

    monkeypatch.setattr(vectors, "_CHUNK", 32)  # 16 x 16 blocks -> 32 x 32 chunks
    labels = np.zeros((100, 100), np.uint16)
    yy, xx = np.mgrid[:100, :100]
    labels[(yy - 50) ** 2 + (xx - 45) ** 2 < 30**2] = 3  # a disc over nine chunks
    labels[5:10, 90:99] = 8
    path = tmp_path / "disc.tif"
    profile = {"driver": "GTiff", "width": 100, "height": 100, "count": 1, "dtype": "uint16", "crs": EQC}
    with rasterio.open(
        path, "w", transform=TRANSFORM, tiled=True, blockxsize=16, blockysize=16, **profile
    ) as dst:
        dst.write(labels, 1)
    polygons = polygonize(path)
    assert sorted(polygons) == [3, 8]
    assert isinstance(polygons[3], shapely.Polygon) and len(polygons[3].interiors) == 0
    assert polygons[3].area == pytest.approx(int((labels == 3).sum()) * 0.5 * 0.75)
    whole = polygonize(labels, TRANSFORM)
    assert whole[3].equals(polygons[3]) and whole[8].equals(polygons[8])


@pytest.mark.parametrize("suffix", [".gpkg", ".fgb", ".shp"])
def test_write_vectors_formats_fields_and_crs(tmp_path: Path, suffix: str) -> None:
    polygons = {1: shapely.box(1010, 1955, 1030, 1970), 2: shapely.box(1100, 1900, 1101, 1902)}
    records = {1: {"score": 0.9, "feature_id": "house-1"}, 2: {"score": 0.5, "feature_id": "tree"}}
    out = tmp_path / f"out{suffix}"
    write_vectors(out, polygons, records, CRS.from_proj4(EQC))
    meta, _, wkb, fields = pyogrio.raw.read(out)
    assert CRS.from_user_input(meta["crs"]) == CRS.from_proj4(EQC)
    names = [str(n) for n in meta["fields"]]
    assert names[:4] == ["id", "score", "area", "feature_id"]
    order = np.argsort(fields[0])
    assert list(fields[0][order]) == [1, 2]
    np.testing.assert_allclose(fields[1][order], [0.9, 0.5])
    np.testing.assert_allclose(fields[2][order], [300.0, 2.0])
    assert list(fields[3][order]) == ["house-1", "tree"]
    geometries = shapely.from_wkb(wkb)[order]
    assert geometries[0].bounds == (1010, 1955, 1030, 1970)
    assert geometries[0].geom_type == ("Polygon" if suffix == ".shp" else "MultiPolygon")  # shp has no Multi
    assert not [n for n in _files(tmp_path) if n.startswith(".")]
    if suffix == ".shp":
        assert _files(tmp_path) == ["out.cpg", "out.dbf", "out.prj", "out.shp", "out.shx"]


def test_geojson_keeps_an_epsg_crs_and_reprojects_a_custom_one_to_wgs84(tmp_path: Path) -> None:
    polygons = {1: shapely.box(733700, 3724800, 733710, 3724820)}
    write_vectors(tmp_path / "utm.geojson", polygons, {1: {"score": 0.7}}, CRS.from_epsg(32616))
    meta, _, wkb, fields = pyogrio.raw.read(tmp_path / "utm.geojson")
    assert meta["crs"] == "EPSG:32616" and shapely.from_wkb(wkb[0]).bounds == (
        733700,
        3724800,
        733710,
        3724820,
    )
    assert fields[2][0] == pytest.approx(200.0)
    albers = CRS.from_proj4(
        "+proj=aea +lat_0=23 +lon_0=-96 +lat_1=29.5 +lat_2=45.5 +datum=WGS84 +units=m +no_defs"
    )
    square = {1: shapely.box(-670000.0, 2120000.0, -669000.0, 2121000.0)}  # 1 km, like solaris' Albers tile
    write_vectors(tmp_path / "albers.geojson", square, {}, albers)
    meta, _, wkb, fields = pyogrio.raw.read(tmp_path / "albers.geojson")
    assert meta["crs"] == "EPSG:4326"  # reprojected, not mislabelled
    xs, ys = warp.transform(albers, "EPSG:4326", [-670000.0, -669000.0], [2120000.0, 2121000.0])
    corners = shapely.get_coordinates(shapely.from_wkb(wkb[0]))
    assert any(np.allclose(c, (xs[0], ys[0]), atol=1e-7) for c in corners)
    assert any(np.allclose(c, (xs[1], ys[1]), atol=1e-7) for c in corners)
    assert fields[2][0] == pytest.approx(1e6)  # area measured in the raster's CRS (metres)


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson", ".fgb"])
def test_nothing_found_writes_an_empty_valid_file(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"empty{suffix}"
    write_vectors(out, {}, {}, CRS.from_epsg(32616))
    meta, _, wkb, _ = pyogrio.raw.read(out)
    assert len(wkb) == 0 and CRS.from_user_input(meta["crs"]) == CRS.from_epsg(32616)
    if suffix != ".geojson":  # a GeoJSON file takes its fields from its features
        assert [str(n) for n in meta["fields"]][:3] == ["id", "score", "area"]


def test_simplify_and_geographic_area(tmp_path: Path) -> None:
    yy, xx = np.mgrid[:200, :200]
    disc = ((yy - 100) ** 2 + (xx - 100) ** 2 < 80**2).astype(np.uint8)
    (polygon,) = polygonize(disc, Affine(1, 0, 0, 0, -1, 200)).values()
    out = tmp_path / "simple.gpkg"
    write_vectors(out, {1: polygon}, {1: {"score": 1.0}}, CRS.from_epsg(32616), simplify=2.0)
    _, _, wkb, _ = pyogrio.raw.read(out)
    simple = shapely.from_wkb(wkb[0])
    assert shapely.get_num_coordinates(simple) < shapely.get_num_coordinates(polygon) / 5
    assert simple.area == pytest.approx(polygon.area, rel=0.02)
    # 0.01 x 0.01 degree at the equator: 1113.2 m x 1105.7 m (WGS84)
    area = area_of(shapely.box(0.0, 0.0, 0.01, 0.01), CRS.from_epsg(4326))
    assert area == pytest.approx(1113.19 * 1105.74, rel=2e-3)
    feet = CRS.from_epsg(2263)  # NAD83 / New York Long Island (ftUS)
    assert area_of(shapely.box(0, 0, 100, 100), feet) == pytest.approx(10000 * 0.3048006**2, rel=1e-6)
    with pytest.raises(InputError, match="must end in"):
        write_vectors(tmp_path / "out.kml", {}, {}, None)


def test_solaris_buildings_round_trip_through_raster_and_vectors(tmp_path: Path) -> None:
    """Rasterize the 43 footprints as ids, write, polygonize, write GeoPackage: same ids, areas within 5%."""
    collection = json.loads(LABELS.read_text())
    footprints = {i + 1: shapely.geometry.shape(f["geometry"]) for i, f in enumerate(collection["features"])}
    out = tmp_path / "buildings.tif"
    with GeoRaster.open(PAN) as raster, GeoTiffWriter(out, like=raster, dtype="uint16") as writer:
        ids = features.rasterize(
            [(g, i) for i, g in footprints.items()],
            out_shape=(900, 900),
            transform=raster.transform,
            dtype="uint16",
        )
        for window in writer.block_windows():
            r, c = int(window.row_off), int(window.col_off)
            writer.write(window, ids[r : r + int(window.height), c : c + int(window.width)])
    polygons = polygonize(out)
    assert sorted(polygons) == sorted(i for i in footprints if (ids == i).any())
    for i, polygon in polygons.items():
        assert polygon.area == pytest.approx(int((ids == i).sum()) * 0.25)
        assert polygon.area == pytest.approx(footprints[i].area, rel=0.05, abs=4.0)
        assert footprints[i].intersection(polygon).area / footprints[i].union(polygon).area > 0.8
    vectors_out = tmp_path / "buildings.gpkg"
    write_vectors(
        vectors_out, polygons, {i: {"score": 1.0, "feature_id": str(i - 1)} for i in polygons}, "EPSG:32616"
    )
    info = pyogrio.read_info(vectors_out)
    assert info["features"] == len(polygons) and info["crs"] == "EPSG:32616"
    left, bottom, right, top = info["total_bounds"]
    assert left >= 733601.0 and right <= 734051.0 and bottom >= 3724689.0 and top <= 3725139.0
