"""Tiled inference on rasters: tile grid, embedding cache, stitching and cross-tile instance merging.

Two named test doubles stand in for SAM where the check is about stitching, not about a model:

- :func:`constant_model`: every prompt decodes to the same positive logits everywhere, so a correct
  stitcher must give ONE instance covering the whole raster, borders included, with no seams.
- :func:`brightness_model`: the mask of any prompt is "the bright pixels of this tile", so a bright
  square crossing tile borders is seen in pieces by several tiles and must come out as one id.

The tiny random core (``samadapt.build("tiny")``) runs the real encoder/decoder where a model is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402
from rasterio.windows import Window  # noqa: E402

import samadapt  # noqa: E402
from samadapt.automatic import AutomaticMaskGenerator  # noqa: E402
from samadapt.domains.remote_sensing.cache import EmbeddingCache, model_fingerprint  # noqa: E402
from samadapt.domains.remote_sensing.prompts import MapPrompt  # noqa: E402
from samadapt.domains.remote_sensing.raster import GeoRaster  # noqa: E402
from samadapt.domains.remote_sensing.segment import prompt_window, segment_auto, segment_prompts  # noqa: E402
from samadapt.domains.remote_sensing.tiling import (  # noqa: E402
    TileGrid,
    UnionFind,
    encoder_input,
    overlap_pairs,
)
from samadapt.domains.remote_sensing.vectors import polygonize  # noqa: E402
from samadapt.domains.remote_sensing.writers import GeoTiffWriter  # noqa: E402
from samadapt.errors import InputError  # noqa: E402
from samadapt.predictor import Predictor  # noqa: E402

ORIGIN = (500000.0, 4000000.0)  # UTM metres, top-left corner
PIXEL = (2.0, 3.0)  # non-square pixels: x 2 m, y 3 m


# ---------------------------------------------------------------------------------------- doubles
def _count(prompts: object) -> int:
    for name in ("points", "boxes"):
        value = getattr(prompts, name)
        if value is not None:
            return int(value.shape[0])
    return 1


def constant_model(value: float = 8.0) -> samadapt.SamModel:
    """Tiny core whose decoder returns ``value`` logits everywhere (IoU 1) for every prompt."""
    model = samadapt.build("tiny")
    side = model.prompt_encoder.mask_input_size

    def decode_prompts(encoded, prompts, *, multimask_output=False):
        n, k = _count(prompts), 3 if multimask_output else 1
        return torch.full((n, k, *side), value), torch.ones(n, k)

    model.decode_prompts = decode_prompts  # type: ignore[method-assign]
    return model


def brightness_model() -> samadapt.SamModel:
    """Tiny core whose 'embedding' is the input image and whose masks are its bright pixels.

    The low-res logits have the encoder frame's full size, so masks are exact to the pixel.
    """
    model = samadapt.build("tiny")

    def encode(images, feature_indexes=None):
        return samadapt.modeling.EncoderOutput(images.mean(dim=1, keepdim=True), [], None)

    def decode_prompts(encoded, prompts, *, multimask_output=False):
        n, k = _count(prompts), 3 if multimask_output else 1
        logits = torch.where(encoded.embedding[:1] > 0.5, 8.0, -8.0)  # (1, 1, S, S)
        return logits.expand(n, k, -1, -1).clone(), torch.ones(n, k)

    model.encode = encode  # type: ignore[method-assign]
    model.decode_prompts = decode_prompts  # type: ignore[method-assign]
    return model


def write_raster(path: Path, data: np.ndarray, nodata: float | None = None) -> Path:
    """A (B, H, W) GeoTIFF in EPSG:32616 with non-square pixels at ORIGIN."""
    count, height, width = data.shape
    transform = Affine(PIXEL[0], 0.0, ORIGIN[0], 0.0, -PIXEL[1], ORIGIN[1])
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name,
        crs="EPSG:32616", transform=transform, nodata=nodata, tiled=True, blockxsize=64, blockysize=64,
    ) as dst:  # fmt: skip
        dst.write(data)
    return path


def run_auto(model: samadapt.SamModel, raster_path: Path, out: Path, tile: int, overlap: int, **kw):
    generator = AutomaticMaskGenerator(Predictor(model, precision="fp32"), points_per_side=4, **kw)
    with GeoRaster.open(raster_path, value_range=(0, 255)) as raster:
        grid = TileGrid(raster.width, raster.height, tile, overlap)
        with GeoTiffWriter(out, like=raster, dtype="int32") as writer:
            records = segment_auto(generator, raster, grid, writer, progress=False)
    with rasterio.open(out) as src:
        return records, src.read(1), src


# ---------------------------------------------------------------------------------------- grid
@pytest.mark.parametrize(
    ("width", "height", "tile", "overlap"), [(300, 200, 64, 16), (64, 64, 64, 8), (50, 130, 64, 0)]
)
def test_tile_cores_partition_the_raster(width: int, height: int, tile: int, overlap: int) -> None:
    grid = TileGrid(width, height, tile, overlap)
    owner = np.zeros((height, width), dtype=int)
    for r, c, window in grid:
        assert window.width == window.height == tile
        core = grid.core(r, c)
        assert window.col_off <= core.col_off and core.col_off + core.width <= window.col_off + window.width
        assert window.row_off <= core.row_off and core.row_off + core.height <= window.row_off + window.height
        owner[core.toslices()] += 1
    assert (owner == 1).all()  # every pixel owned by exactly one tile
    if width >= tile:  # last column snapped inside, no overhang
        assert grid.col_starts[-1] == width - tile


def test_tile_grid_refuses_bad_overlap() -> None:
    with pytest.raises(InputError, match="overlap"):
        TileGrid(100, 100, 64, 64)


def test_encoder_input_keeps_the_global_stretch() -> None:
    """A dark uniform tile stays dark (no per-tile min-max) for the LiteMedSAM profile."""
    from samadapt.preprocess import LITEMEDSAM_PROFILE

    tensor, resized = encoder_input(np.full((64, 64, 3), 51, dtype=np.uint8), LITEMEDSAM_PROFILE)
    assert tensor.shape == (1, 3, 256, 256) and resized == (256, 256)
    assert torch.allclose(tensor, torch.full_like(tensor, 0.2))


def test_overlap_pairs_and_union_find() -> None:
    a = np.array([[1, 1, 0, 2], [1, 1, 0, 2]])
    b = np.array([[7, 7, 0, 0], [7, 7, 0, 9]])
    assert overlap_pairs(a, b) == [(1, 7), (2, 9)]
    assert overlap_pairs(a, b, merge_iou=0.9) == [(1, 7)]
    union = UnionFind()
    union.union(5, 3)
    union.union(3, 9)
    assert union.find(9) == union.find(5) == 3


def test_prompt_window_zooms_small_boxes_only() -> None:
    small, zoomed = prompt_window(np.array([100, 100, 109, 119]), "box", 256, 256, (1000, 1000), "auto")
    assert zoomed and small.width == 40  # 2x the long side (20 px)
    plain, zoomed = prompt_window(np.array([100, 100, 109, 119]), "box", 256, 256, (1000, 1000), "off")
    assert not zoomed and plain.width == 256
    big, zoomed = prompt_window(np.array([0, 0, 399, 99]), "box", 256, 256, (1000, 1000), "auto")
    assert not zoomed and big.width == 500 and big.col_off == 0  # moved inside the raster


# ---------------------------------------------------------------------------------------- cache
def test_cache_round_trip_and_keys(tmp_path: Path) -> None:
    model = samadapt.build("tiny")
    cache = EmbeddingCache(tmp_path, model_fingerprint(model), "abc", {"bands": [1]})
    encoded = samadapt.modeling.EncoderOutput(torch.randn(1, 32, 8, 8), [torch.randn(1, 4, 4)], None)
    assert cache.load((0, 0, 64, 64)) is None
    stored = cache.store((0, 0, 64, 64), encoded)
    loaded = cache.load((0, 0, 64, 64))
    assert loaded is not None and torch.equal(loaded.embedding, stored.embedding)
    assert torch.equal(loaded.features[0], stored.features[0])
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.key((0, 0, 64, 64)) != cache.key((8, 0, 64, 64))
    other_bands = EmbeddingCache(tmp_path, cache.model_key, "abc", {"bands": [2]})
    assert other_bands.load((0, 0, 64, 64)) is None
    torch.manual_seed(1)
    assert model_fingerprint(samadapt.build("tiny")) != cache.model_key
    cache.path((0, 0, 64, 64)).write_bytes(b"damaged")
    assert cache.load((0, 0, 64, 64)) is None  # a damaged entry is a miss, not a crash


# ---------------------------------------------------------------------------------------- stitching
def test_constant_model_gives_one_seamless_instance(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 255, (3, 150, 230), dtype=np.uint8)
    src = write_raster(tmp_path / "in.tif", data)
    records, labels, out = run_auto(constant_model(), src, tmp_path / "out.tif", tile=64, overlap=16)
    assert (labels == 1).all()  # one id everywhere, borders and tile seams included
    assert list(records) == [1] and records[1]["pixels"] == 150 * 230 and records[1]["tiles"] > 1
    with rasterio.open(src) as reference:
        assert (out.crs, out.transform, out.shape) == (reference.crs, reference.transform, reference.shape)


def test_nodata_is_skipped_and_written_as_nodata(tmp_path: Path) -> None:
    data = np.full((1, 140, 140), 100, dtype=np.uint16)
    data[0, :, :70] = 0  # left half is nodata (a whole column of tiles)
    src = write_raster(tmp_path / "in.tif", data, nodata=0)
    records, labels, out = run_auto(constant_model(), src, tmp_path / "out.tif", tile=64, overlap=16)
    assert (labels[:, :70] == out.nodata).all()
    assert (labels[:, 70:] == 1).all() and records[1]["pixels"] == 140 * 70


def test_object_crossing_tile_borders_is_one_instance(tmp_path: Path) -> None:
    data = np.zeros((3, 200, 200), dtype=np.uint8)
    data[:, 40:100, 30:110] = 255  # crosses the column and row borders of 64-pixel tiles
    data[:, 170:190, 170:190] = 255  # a second, separate object
    src = write_raster(tmp_path / "in.tif", data)
    records, labels, _out = run_auto(brightness_model(), src, tmp_path / "out.tif", tile=64, overlap=16)
    square = labels[40:100, 30:110]
    assert len(np.unique(square)) == 1 and square[0, 0] > 0
    assert len(records) == 2 and labels[180, 180] not in (0, square[0, 0])
    assert set(np.unique(labels)) == {0, *records}
    polygons = polygonize(tmp_path / "out.tif")
    shape = polygons[int(square[0, 0])]
    assert shape.geom_type == "Polygon"  # one polygon, at its known map coordinates
    x0, y0 = ORIGIN[0] + 30 * PIXEL[0], ORIGIN[1] - 100 * PIXEL[1]
    assert np.allclose(shape.bounds, (x0, y0, x0 + 80 * PIXEL[0], y0 + 60 * PIXEL[1]))


def test_prompts_paste_masks_by_id_and_zoom(tmp_path: Path) -> None:
    data = np.zeros((3, 300, 300), dtype=np.uint8)
    data[:, 100:110, 50:60] = 255  # a small building
    data[:, 150:250, 150:260] = 255  # a big one
    src = write_raster(tmp_path / "in.tif", data)

    def box(c0: int, r0: int, c1: int, r1: int) -> MapPrompt:
        x0, x1 = ORIGIN[0] + c0 * PIXEL[0], ORIGIN[0] + c1 * PIXEL[0]
        y0, y1 = ORIGIN[1] - r1 * PIXEL[1], ORIGIN[1] - r0 * PIXEL[1]
        return MapPrompt("box", (x0, y0, x1, y1), feature_id=f"b{c0}")

    prompts = [box(48, 98, 62, 112), box(148, 148, 262, 252)]
    predictor = Predictor(brightness_model(), precision="fp32")
    cache_dir = tmp_path / "cache"
    results = []
    for _ in range(2):
        with GeoRaster.open(src, value_range=(0, 255)) as raster:
            cache = EmbeddingCache.for_raster(cache_dir, raster, predictor.model, predictor.precision)
            with GeoTiffWriter(tmp_path / "out.tif", like=raster, dtype="uint8") as writer:
                records = segment_prompts(
                    predictor, raster, prompts, writer, tile=128, cache=cache, progress=False
                )
        with rasterio.open(tmp_path / "out.tif") as out:
            results.append((records, out.read(1), cache.hits))
    (records, labels, hits_first), (_, labels_again, hits_second) = results
    assert records[1]["zoomed"] and not records[2]["zoomed"] and records[1]["feature_id"] == "b48"
    assert (labels[100:110, 50:60] == 1).all() and (labels[150:250, 150:260] == 2).all()
    assert records[1]["pixels"] == 100 and records[2]["pixels"] == 100 * 110
    assert hits_first == 0 and hits_second == 2 and np.array_equal(labels, labels_again)


def test_tiny_core_auto_runs_with_cache(tmp_path: Path) -> None:
    """The real tiny encoder/decoder end to end: second run served from the cache, same output."""
    data = np.random.default_rng(1).integers(0, 255, (3, 100, 160), dtype=np.uint8)
    src = write_raster(tmp_path / "in.tif", data)
    torch.manual_seed(0)
    predictor = Predictor(samadapt.build("tiny"), precision="fp32")
    generator = AutomaticMaskGenerator(
        predictor, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0, multimask_output=False
    )
    outputs = []
    for _ in range(2):
        with GeoRaster.open(src) as raster:
            cache = EmbeddingCache.for_raster(tmp_path / "cache", raster, predictor.model, "fp32")
            grid = TileGrid(raster.width, raster.height, 64, 16)
            with GeoTiffWriter(tmp_path / "out.tif", like=raster, dtype="int32") as writer:
                segment_auto(generator, raster, grid, writer, cache=cache, progress=False)
        with rasterio.open(tmp_path / "out.tif") as out:
            outputs.append((out.read(1), cache.hits, cache.misses))
    assert outputs[0][1:] == (0, len(grid)) and outputs[1][1:] == (len(grid), 0)
    assert np.array_equal(outputs[0][0], outputs[1][0])


def test_window_outside_is_not_read(tmp_path: Path) -> None:
    """A raster smaller than one tile: one boundless tile, output still the raster's shape."""
    data = np.full((1, 40, 30), 200, dtype=np.uint8)
    src = write_raster(tmp_path / "in.tif", data)
    _records, labels, _out = run_auto(constant_model(), src, tmp_path / "out.tif", tile=64, overlap=8)
    assert labels.shape == (40, 30) and (labels == 1).all()
    assert TileGrid(30, 40, 64, 8).window(0, 0) == Window(0, 0, 64, 64)


def test_prompt_masks_skip_nodata(tmp_path: Path) -> None:
    """A box over bright pixels half inside a nodata area: the nodata half is written as nodata."""
    data = np.full((1, 120, 120), 200, dtype=np.uint16)
    data[0, :, :60] = 0  # nodata
    src = write_raster(tmp_path / "in.tif", data, nodata=0)
    x0, x1 = ORIGIN[0] + 40 * PIXEL[0], ORIGIN[0] + 80 * PIXEL[0]
    y0, y1 = ORIGIN[1] - 80 * PIXEL[1], ORIGIN[1] - 40 * PIXEL[1]
    predictor = Predictor(constant_model(), precision="fp32")
    box = MapPrompt("box", (x0, y0, x1, y1))
    with (
        GeoRaster.open(src, value_range=(0, 255)) as raster,
        GeoTiffWriter(tmp_path / "out.tif", like=raster, dtype="uint8") as writer,
    ):
        records = segment_prompts(predictor, raster, [box], writer, tile=64, progress=False)
    with rasterio.open(tmp_path / "out.tif") as out:
        labels = out.read(1)
        assert (labels[:, :60] == out.nodata).all()
    assert (labels[:, 60:] <= 1).all() and records[1]["pixels"] == int((labels == 1).sum()) > 0
