"""Instance tiles for RsPrompter: connected components, polygons rasterized tile by tile (reprojected), COCO
polygons, the split by region, batches, and the data module on the solaris GeoTIFF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform

import samadapt
from samadapt.domains.remote_sensing.instances import (
    InstanceDataModule,
    InstanceSamples,
    Tile,
    coco_tiles,
    collate,
    components,
    raster_tiles,
)
from samadapt.errors import InputError

GEO = Path(__file__).resolve().parents[2] / "data" / "geo"
UTM = CRS.from_epsg(32616)
ORIGIN = (733600.0, 3725200.0)  # top-left corner, metres; 0.5 m pixels, north-up


def _geotiff(path: Path, data: np.ndarray, nodata: float | None = None) -> Path:
    transform = Affine(0.5, 0, ORIGIN[0], 0, -0.5, ORIGIN[1])
    bands = data[None] if data.ndim == 2 else data
    with rasterio.open(
        path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
        dtype=bands.dtype, crs=UTM, transform=transform, nodata=nodata,
    ) as dst:  # fmt: skip
        dst.write(bands)
    return path


def _square(col0: int, row0: int, side: int) -> list[list[float]]:
    """A pixel square as a closed ring in map coordinates (UTM metres)."""
    x0, y0 = ORIGIN[0] + 0.5 * col0, ORIGIN[1] - 0.5 * row0
    x1, y1 = x0 + 0.5 * side, y0 - 0.5 * side
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_components_split_values_and_drop_small_parts() -> None:
    labels = np.zeros((20, 20), np.uint8)
    labels[1:5, 1:5] = 1  # object A (16 px)
    labels[10:15, 2:6] = 1  # object B (20 px), separate component
    labels[10:15, 6:9] = 2  # touches B but has another value: its own object (15 px)
    labels[18, 18] = 1  # one pixel: dropped
    ids, classes = components(labels, None, min_area=4)
    assert len(classes) == 3 and set(classes.values()) == {0}
    assert sorted(int((ids == k).sum()) for k in classes) == [15, 16, 20]
    assert ids[18, 18] == 0
    ids, classes = components(labels, [2, 1], min_area=4)  # value 2 -> class 0, value 1 -> class 1
    assert sorted(classes.values()) == [0, 1, 1]
    assert {classes[int(ids[11, 7])], classes[int(ids[2, 2])]} == {0, 1} and classes[int(ids[11, 7])] == 0
    _, only = components(labels, [2], min_area=4)
    assert list(only.values()) == [0]


def test_polygons_in_another_crs_land_on_their_pixels_and_split_by_region(tmp_path: Path) -> None:
    image = _geotiff(tmp_path / "scene.tif", (np.arange(200 * 200) % 251).astype(np.uint16).reshape(200, 200))
    squares = {"a": (20, 30, 24), "b": (150, 100, 20), "c": (90, 160, 16)}  # col0, row0, side
    features = []
    for name, (col, row, side) in squares.items():
        ring = _square(col, row, side)
        xs, ys = warp_transform(UTM, CRS.from_epsg(4326), [p[0] for p in ring], [p[1] for p in ring])
        coords = [[x, y] for x, y in zip(xs, ys, strict=True)]
        geometry = {"type": "Polygon", "coordinates": [coords]}
        features.append({"type": "Feature", "properties": {"kind": name}, "geometry": geometry})
    vectors = tmp_path / "objects.geojson"
    vectors.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    train, val = raster_tiles(image, vectors=vectors, tile=64, val_fraction=0.25, min_area=4)
    split = 150  # the eastern quarter of 200 columns is held out
    assert all(
        t.window[0] + t.window[2] <= split or (t.ids[:, split - t.window[0] :] == 0).all() for t in train
    )
    assert all(t.window[0] >= split for t in val)

    # object b lies in the validation strip only; a and c only in training tiles
    def found(tiles, col, row):
        return [
            t for t in tiles
            if t.window[0] <= col < t.window[0] + 64 and t.window[1] <= row < t.window[1] + 64
            and t.ids[row - t.window[1], col - t.window[0]] > 0
        ]  # fmt: skip

    assert found(val, 160, 110) and not found(train, 160, 110)
    assert found(train, 30, 40) and not found(val, 30, 40)
    tile = next(t for t in train if t.window[:2] == (0, 0))
    obj = tile.ids == tile.ids[40, 30]
    rows, cols = np.nonzero(obj)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (30, 53, 20, 43)  # 24 x 24 px, exact
    # classes from an attribute, in the given order
    train, _ = raster_tiles(
        image, vectors=vectors, tile=64, val_fraction=0.0, class_field="kind", classes=["c", "a"]
    )
    kept = {c for t in train for c in t.classes.values()}
    assert kept == {0, 1}  # b is not among the classes
    with pytest.raises(InputError, match="no field 'type'"):
        raster_tiles(image, vectors=vectors, tile=64, class_field="type")
    with pytest.raises(InputError, match="exactly one"):
        raster_tiles(image, tile=64)


def test_label_raster_nodata_is_no_object(tmp_path: Path) -> None:
    pixels = np.full((96, 96), 100, np.uint16)
    pixels[:, 80:] = 0  # nodata strip
    image = _geotiff(tmp_path / "img.tif", pixels, nodata=0)
    labels = np.zeros((96, 96), np.uint8)
    labels[10:30, 10:30] = 1
    labels[40:60, 70:90] = 1  # half of it on nodata pixels
    label_path = _geotiff(tmp_path / "labels.tif", labels)
    train, val = raster_tiles(image, labels=label_path, tile=96, val_fraction=0.0, min_area=4)
    assert val == [] and len(train) == 1
    tile = train[0]
    assert len(tile.classes) == 2
    assert (tile.ids[:, 80:] == 0).all() and (tile.image[:, 80:] == 0).all()
    with pytest.raises(InputError, match="aligned"):
        raster_tiles(image, labels=_geotiff(tmp_path / "small.tif", labels[:50]), tile=96)


def test_coco_polygons_categories_and_image_split(tmp_path: Path) -> None:
    annotations, images = [], []
    for i in range(3):
        Image.fromarray(np.full((64, 80, 3), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": 80, "height": 64})
        annotations.append({"id": 10 * i + 1, "image_id": i + 1, "category_id": 7, "iscrowd": 0,
                            "segmentation": [[4, 4, 24, 4, 24, 20, 4, 20]]})  # fmt: skip
        annotations.append({"id": 10 * i + 2, "image_id": i + 1, "category_id": 3, "iscrowd": 0,
                            "segmentation": [[40, 30, 60, 30, 60, 50]]})  # fmt: skip
    path = tmp_path / "ann.json"
    categories = [{"id": 3, "name": "tank"}, {"id": 7, "name": "roof"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    train, val = coco_tiles(path, tile=64, val_fraction=0.34, min_area=4)
    assert len({t.source for t in val}) == 1 and not {t.source for t in val} & {t.source for t in train}
    tile = next(t for t in train if t.window[:2] == (0, 0))
    roof = tile.ids == tile.ids[10, 10]
    assert tile.classes[int(tile.ids[10, 10])] == 1  # category 7 is the second id -> class 1
    assert int(roof.sum()) == 20 * 16  # x 4..24, y 4..20
    assert tile.classes[int(tile.ids[35, 55])] == 0
    annotations[0]["segmentation"] = {"counts": "abc", "size": [64, 80]}
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    with pytest.raises(InputError, match="RLE"):
        coco_tiles(path, tile=64)


def test_data_module_on_the_solaris_buildings() -> None:
    data = InstanceDataModule(
        image=str(GEO / "sample_geotiff.tif"), vectors=str(GEO / "geotiff_labels.geojson"), val_fraction=0.3,
        tile=256, min_area=16, batch_size=3, augment=False,
    )  # fmt: skip
    data.profile = samadapt.build("tiny").profile  # 128 px encoder frame: 256 px tiles are halved
    data.setup()
    assert data.train_set is not None and data.val_set is not None
    assert len(data.train_set) == 12 and len(data.val_set) == 8
    assert all(t.window[0] >= 630 for t in data.val_set.tiles)  # 900 - 270 columns held out
    batch = next(iter(data._loader(data.train_set, shuffle=False)))
    most = max(len(t.classes) for t in data.train_set.tiles[:3])
    assert batch["image"].shape == (3, 3, 128, 128) and batch["instances"].shape == (3, most, 128, 128)
    counts = (batch["instance_classes"] >= 0).sum(1).tolist()
    assert counts == [len(t.classes) for t in data.train_set.tiles[:3]]  # padding is class -1
    union = batch["instances"].amax(1, keepdim=True)
    assert torch.equal(union, batch["mask"])
    assert set(batch["instances"].unique().tolist()) <= {0.0, 1.0}


def test_root_folder_of_images_and_label_maps(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(2):
        Image.fromarray(np.full((128, 128, 3), 90, np.uint8)).save(tmp_path / "images" / f"t{i}.png")
        labels = np.zeros((128, 128), np.uint8)
        labels[10 + i : 40, 10:40] = 1
        labels[60:90, 60:100] = 2
        Image.fromarray(labels).save(tmp_path / "labels" / f"t{i}.png")
    data = InstanceDataModule(root=str(tmp_path), val_fraction=0.5, augment=False)
    data.profile = samadapt.build("tiny").profile
    data.setup()
    assert data.train_set is not None and data.val_set is not None
    assert len(data.train_set) == 1 and len(data.val_set) == 1  # split by whole image
    sample = data.train_set[0]
    assert sample["instances"].shape == (2, 128, 128) and sample["instance_classes"].tolist() == [0, 0]
    with pytest.raises(InputError, match="neither images"):
        InstanceDataModule(root=str(tmp_path / "images"))._tiles(128)


def test_collate_pads_objects_and_flips_keep_pixels_and_objects_together() -> None:
    tile_ids = np.zeros((128, 128), np.int32)
    tile_ids[0:10, 0:20] = 1
    image = np.zeros((128, 128, 3), np.uint8)
    image[tile_ids > 0] = 255
    tile = Tile(image, tile_ids, {1: 0}, "x", (0, 0, 128, 128))
    torch.manual_seed(3)
    samples = InstanceSamples([tile], samadapt.build("tiny").profile, augment=True)
    for _ in range(4):
        s = samples[0]
        assert torch.equal(s["image"][0] > 0.5, s["instances"][0] > 0.5)
    empty = dict(s, instances=torch.zeros(0, 128, 128), instance_classes=torch.zeros(0, dtype=torch.long))
    batch = collate([s, empty])
    assert batch["instances"].shape == (2, 1, 128, 128) and batch["instance_classes"].tolist() == [[0], [-1]]
