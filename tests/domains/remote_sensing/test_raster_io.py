"""GeoRaster: geometry, band selection, the global stretch, nodata/masks, boundless windows, resolution.

Real files: the SpaceNet 16-bit pan tile (solaris) and rasterio's 8-bit RGB Landsat subset with a nodata
border (tests/data/geo, see ATTRIBUTION.md). Synthetic rasters are written in tmp_path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402
from rasterio.crs import CRS  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from samadapt.domains.remote_sensing.raster import GeoRaster, Stretch  # noqa: E402
from samadapt.errors import InputError, SamadaptError  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "data" / "geo"
PAN = DATA / "sample_geotiff.tif"
RGB = DATA / "RGB.byte.tif"
# Equirectangular on WGS84, a projected CRS with no EPSG code: x = a * lon + 500 km, y = a * lat (radians).
# False easting 500 km keeps it off EPSG:4087.
EQC = "+proj=eqc +lat_ts=0 +lat_0=0 +lon_0=0 +x_0=500000 +y_0=0 +datum=WGS84 +units=m +no_defs"


def _write(path: Path, data: np.ndarray, transform: Affine, crs: str | None = EQC, **profile: object) -> Path:
    """Write a (B, h, w) array as a tiled GeoTIFF."""
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        tiled=True,
        blockxsize=64,
        blockysize=64,
        **profile,
    ) as dst:
        dst.write(data)
    return path


def _expected_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (values.astype(np.float64) - low) * 255.0 / (high - low)
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


# ---------------------------------------------------------------------- real files
def test_pan_16bit_geometry_and_global_stretch() -> None:
    with GeoRaster.open(PAN) as raster:
        assert (raster.width, raster.height, raster.count, raster.dtype) == (900, 900, 1, "uint16")
        assert raster.crs == CRS.from_epsg(32616)
        assert raster.transform == Affine(0.5, 0.0, 733601.0, 0.0, -0.5, 3725139.0)
        assert raster.res == (0.5, 0.5)
        assert raster.nodata == 0.0
        assert raster.bands == (1,)
        assert raster.bounds == pytest.approx((733601.0, 3724689.0, 734051.0, 3725139.0))
        with rasterio.open(PAN) as src:
            full = src.read(1)
        # 900 px < 1024: the statistics read is the full raster, nodata (0) left out.
        low, high = np.percentile(full[full != 0].astype(np.float64), [2, 98])
        assert raster.stretch.low[0] == pytest.approx(low)
        assert raster.stretch.high[0] == pytest.approx(high)
        assert (low, high) == (126.0, 1109.0)
        image, valid = raster.read(Window(100, 200, 64, 48))
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert valid.all()
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # gray copied to R, G, B
    np.testing.assert_array_equal(image[..., 0], _expected_uint8(full[200:248, 100:164], low, high))


def test_rgb_byte_nodata_border_is_invalid_and_black() -> None:
    with rasterio.open(RGB) as src:
        data = src.read()
    with GeoRaster.open(RGB) as raster:
        assert raster.crs == CRS.from_epsg(32618)
        assert (raster.width, raster.height, raster.count, raster.bands) == (791, 718, 3, (1, 2, 3))
        assert raster.nodata == 0.0
        image, valid = raster.read(Window(0, 0, 791, 718))
        for band in range(3):
            values = data[band][data[band] != 0].astype(np.float64)
            assert raster.stretch.low[band] == pytest.approx(np.percentile(values, 2))
    expected_valid = (data != 0).any(axis=0)
    np.testing.assert_array_equal(valid, expected_valid)
    assert int(valid.sum()) == 383_115  # of 791 x 718 = 567,938: about a third is the nodata border
    assert not image[~valid].any()
    assert image[valid].any()


def test_band_order_selection_and_errors() -> None:
    window = Window(300, 300, 32, 32)
    with GeoRaster.open(RGB) as rgb, GeoRaster.open(RGB, bands=[3, 2, 1]) as bgr:
        a, _ = rgb.read(window)
        b, _ = bgr.read(window)
        assert bgr.bands == (3, 2, 1)
        np.testing.assert_array_equal(b, a[..., ::-1])
    with GeoRaster.open(RGB, bands=[2, 3]) as two:
        c, _ = two.read(window)
        np.testing.assert_array_equal(c[..., 0], c[..., 2])  # (b2, b3, b2)
        np.testing.assert_array_equal(c[..., 0], a[..., 1])
    with pytest.raises(InputError, match="band 4 does not exist"):
        GeoRaster.open(RGB, bands=[4])
    with pytest.raises(InputError, match="at most 3"):
        GeoRaster.open(RGB, bands=[1, 2, 3, 1])


def test_boundless_window_is_padded_and_invalid_outside() -> None:
    with GeoRaster.open(PAN) as raster:
        inside, _ = raster.read(Window(880, 870, 20, 30))
        image, valid = raster.read(Window(880, 870, 64, 64))
        far, far_valid = raster.read(Window(-500, -500, 16, 16))
    assert image.shape == (64, 64, 3)
    assert valid[:30, :20].all() and not valid[30:].any() and not valid[:, 20:].any()
    np.testing.assert_array_equal(image[:30, :20], inside)
    assert not image[30:].any()
    assert far.shape == (16, 16, 3) and not far_valid.any()


def test_stretch_is_global_not_per_tile() -> None:
    """The same pixel read through two different windows has the same value (no per-tile min-max)."""
    with GeoRaster.open(PAN) as raster:
        a, _ = raster.read(Window(0, 0, 300, 300))
        b, _ = raster.read(Window(250, 250, 100, 100))
    np.testing.assert_array_equal(a[250:300, 250:300], b[:50, :50])


def test_content_key_info_and_blocks() -> None:
    with GeoRaster.open(PAN) as raster:
        assert raster.content_key() == hashlib.sha256(PAN.read_bytes()).hexdigest()
        info = raster.info_dict()
        windows = list(raster.block_windows())
        assert raster.window_transform(Window(10, 20, 5, 5)) == Affine(
            0.5, 0.0, 733606.0, 0.0, -0.5, 3725129.0
        )
    json.dumps(info, allow_nan=False)
    assert info["crs"] == "EPSG:32616" and info["crs_units"] == "metre"
    assert (info["width"], info["height"], info["dtype"], info["nodata"]) == (900, 900, "uint16", 0.0)
    assert info["stretch"] == {"percentiles": [2.0, 98.0], "low": [126.0], "high": [1109.0]}
    assert sum(int(w.width * w.height) for w in windows) == 900 * 900


def test_user_errors_are_one_line_samadapt_errors(tmp_path: Path) -> None:
    with pytest.raises(SamadaptError, match="not found"):
        GeoRaster.open(tmp_path / "missing.tif")
    junk = tmp_path / "junk.tif"
    junk.write_text("not a raster")
    with pytest.raises(InputError) as caught:
        GeoRaster.open(junk)
    assert "\n" not in str(caught.value) and "junk.tif" in str(caught.value)
    with pytest.raises(InputError, match="percentiles"):
        GeoRaster.open(PAN, stretch_percentiles=(98.0, 2.0))


# ---------------------------------------------------------------------- synthetic rasters
def test_float_raster_with_nodata_nan_and_custom_crs(tmp_path: Path) -> None:
    """Nodata (-9999) and NaN are invalid and stay out of the stretch; the custom CRS round-trips."""
    data = np.tile(np.linspace(0.0, 1.0, 100, dtype=np.float32), (1, 80, 1))  # (1, 80, 100)
    data[0, :20] = -9999.0  # nodata rows
    data[0, 30, 40] = np.nan
    transform = Affine(2.0, 0.0, 1000.0, 0.0, -3.0, 5000.0)  # north-up, non-square pixels
    path = _write(tmp_path / "float.tif", data, transform, nodata=-9999.0)
    with GeoRaster.open(path) as raster:
        assert raster.crs == CRS.from_proj4(EQC) and raster.crs.to_epsg() is None
        assert raster.res == (2.0, 3.0) and raster.transform == transform
        values = data[0, 20:].astype(np.float64)
        low, high = np.nanpercentile(values, [2, 98])
        assert raster.stretch.low[0] == pytest.approx(low) and raster.stretch.high[0] == pytest.approx(high)
        image, valid = raster.read(Window(0, 0, 100, 80))
        info = raster.info_dict()
    assert not valid[:20].any() and not valid[30, 40]
    assert int(valid.sum()) == 60 * 100 - 1
    assert not image[:20].any()
    assert image[21, 99, 0] == 255 and image[21, 0, 0] == 0
    assert info["crs"].startswith("PROJCS") or info["crs"].startswith("PROJCRS")


def test_internal_mask_is_honoured(tmp_path: Path) -> None:
    data = np.full((1, 64, 64), 500, dtype=np.uint16)
    data[0, :, 32:] = 1500
    path = _write(tmp_path / "masked.tif", data, Affine(1, 0, 0, 0, -1, 64))
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as dst:
        mask = np.full((64, 64), 255, dtype=np.uint8)
        mask[:10] = 0
        dst.write_mask(mask)
    with GeoRaster.open(path) as raster:
        _, valid = raster.read(Window(0, 0, 64, 64))
    assert not valid[:10].any() and valid[10:].all()


def test_all_nodata_raster_is_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "empty.tif", np.zeros((1, 16, 16), np.uint8), Affine(1, 0, 0, 0, -1, 16), nodata=0
    )
    with pytest.raises(InputError, match="no valid pixels"):
        GeoRaster.open(path)


def test_value_range_overrides_percentiles() -> None:
    with GeoRaster.open(RGB, value_range=(0, 255)) as raster:
        image, _ = raster.read(Window(300, 300, 16, 16))
        assert isinstance(raster.stretch, Stretch) and raster.stretch.percentiles is None
    with rasterio.open(RGB) as src:
        raw = src.read(window=Window(300, 300, 16, 16))
    np.testing.assert_array_equal(image, np.moveaxis(raw, 0, -1))  # identity for 8-bit data


def test_resolution_resamples_the_working_grid(tmp_path: Path) -> None:
    data = np.zeros((1, 100, 120), dtype=np.uint8)
    data[0, 40:60, 50:70] = 200
    transform = Affine(1.0, 0.0, 5000.0, 0.0, -1.0, 9000.0)
    path = _write(tmp_path / "fine.tif", data, transform)
    with GeoRaster.open(path, resolution=2.0) as raster:
        assert raster.resampled
        assert (raster.width, raster.height) == (60, 50)
        assert raster.transform == Affine(2.0, 0.0, 5000.0, 0.0, -2.0, 9000.0)
        assert (raster.source_width, raster.source_height, raster.source_transform) == (120, 100, transform)
        samples, valid = raster.read_raw(Window(0, 0, 60, 50))
        assert raster.info_dict()["working_grid"]["width"] == 60
    assert valid.all()
    assert (samples[0, 20:30, 25:35] == 200).all() and samples[0, :19].max() == 0
    geographic = _write(tmp_path / "geo.tif", data, Affine(0.1, 0, 0, 0, -0.1, 10), crs="EPSG:4326")
    with pytest.raises(InputError, match="geographic"):
        GeoRaster.open(geographic, resolution=10.0)
    with pytest.raises(InputError, match="positive"):
        GeoRaster.open(path, resolution=-1.0)


@pytest.mark.parametrize(
    ("dtype", "nodata"), [("uint8", 0), ("int16", -9999), ("uint16", 65535), ("float64", -1e30)]
)
def test_every_sample_type_gets_the_same_global_stretch(tmp_path: Path, dtype: str, nodata: float) -> None:
    """A ramp 10..209 in any dtype maps to the same uint8 image; the nodata block is invalid and black."""
    ramp = np.tile(np.arange(10, 210, dtype=np.float64), (4, 50, 1)).astype(dtype)  # (4, 50, 200)
    ramp[:, :10, :10] = nodata
    path = _write(tmp_path / f"{dtype}.tif", ramp, Affine(1, 0, 0, 0, -1, 50), nodata=nodata)
    with GeoRaster.open(path) as raster:
        assert raster.dtype == dtype and raster.count == 4 and raster.bands == (1, 2, 3)  # first three
        image, valid = raster.read(Window(0, 0, 200, 50))
        low, high = raster.stretch.low[0], raster.stretch.high[0]
    values = ramp[0][ramp[0] != nodata].astype(np.float64)
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [2, 98])))
    assert not valid[:10, :10].any() and int(valid.sum()) == 200 * 50 - 100
    assert not image[:10, :10].any()
    np.testing.assert_array_equal(image[20, :, 1], _expected_uint8(np.arange(10, 210), low, high))
