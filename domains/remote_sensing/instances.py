"""Instance-segmentation training data from GeoTIFFs or COCO JSON: tiles, objects and a DataModule.

Three sources of objects (one per :class:`InstanceDataModule` call, or a ``root`` folder):

- a GeoTIFF and an aligned **label raster** (``labels``): each connected component (4-connectivity, as
  RsPrompter's ``whu2coco.py``) of each label value is one object;
- a GeoTIFF and a **polygon file** (``vectors``: GeoJSON, GeoPackage, Shapefile, FlatGeobuf): each feature,
  reprojected to the raster's CRS, is one object, rasterized tile by tile with
  :func:`rasterio.features.rasterize` (never for the whole raster at once);
- **COCO JSON** (``coco``) with polygon segmentations (RLE is refused): each annotation is one object;
  image paths relative to the JSON file.

Rasters are read through :class:`~samadapt.domains.remote_sensing.raster.GeoRaster` (global stretch, band
selection, nodata) in tiles of the model's input side (``tile``, default ``profile.input_size``: the model
sees native resolution) and turned into encoder inputs exactly as ``samadapt geo segment`` does
(:func:`~samadapt.domains.remote_sensing.tiling.encoder_input`).

Split by region, never by random pixels or overlapping tiles: each raster's last ``val_fraction`` of
columns (the eastern strip of a north-up raster) is the validation region, the rest the training region;
tiles are cut inside each region separately, so no training tile sees a validation pixel (objects crossing
the split line are cut in two). COCO images (and ``root`` image/label pairs when there are several) are
split by whole image.

Samples: ``image`` (3, S, S), ``instances`` (M, S, S) {0, 1}, ``instance_classes`` (M,) class indexes,
``mask`` (1, S, S) their union, ``meta``; batches pad M with empty masks of class -1 (:func:`collate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from samadapt.domains.remote_sensing.instance_sources import (
    IMAGE_SUFFIXES,
    LABEL_FOLDERS,
    Tile,
    coco_tiles,
    components,
    raster_tiles,
)
from samadapt.domains.remote_sensing.tiling import encoder_input
from samadapt.domains.segmentation_data import trainer_profile
from samadapt.errors import InputError
from samadapt.preprocess import PreprocessProfile, preprocess_mask

__all__ = [
    "InstanceDataModule",
    "InstanceSamples",
    "Tile",
    "coco_tiles",
    "collate",
    "components",
    "raster_tiles",
]


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples, padding ``instances`` to the batch's largest M (empty masks of class -1)."""
    most = max(s["instances"].shape[0] for s in samples)
    size = samples[0]["image"].shape[-1]
    masks = torch.zeros(len(samples), most, size, size)
    classes = torch.full((len(samples), most), -1, dtype=torch.long)
    for b, s in enumerate(samples):
        m = s["instances"].shape[0]
        masks[b, :m], classes[b, :m] = s["instances"], s["instance_classes"]
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "instances": masks,
        "instance_classes": classes,
        "meta": {
            "source": [s["meta"]["source"] for s in samples],
            "window": torch.stack([s["meta"]["window"] for s in samples]),
        },
    }


class InstanceSamples(Dataset):
    """Tiles as samples (see the module docstring); ``augment``: random flips of image and objects."""

    def __init__(
        self, tiles: list[Tile], profile: PreprocessProfile, augment: bool = False, max_instances: int = 100
    ):
        self.tiles, self.profile, self.augment, self.max_instances = tiles, profile, augment, max_instances

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> dict[str, Any]:
        tile = self.tiles[index]
        image, ids = tile.image, tile.ids
        if self.augment:
            flip_x, flip_y = (torch.rand(2) < 0.5).tolist()
            if flip_x:
                image, ids = image[:, ::-1], ids[:, ::-1]
            if flip_y:
                image, ids = image[::-1], ids[::-1]
        tensor, _ = encoder_input(np.ascontiguousarray(image), self.profile)  # (1, 3, S, S)
        present = [k for k in sorted(tile.classes) if (ids == k).any()][: self.max_instances]
        size = self.profile.input_size
        masks = (
            torch.cat([preprocess_mask(ids == k, self.profile)[0] for k in present])
            if present
            else torch.zeros(0, size, size)
        )  # (M, S, S)
        return {
            "image": tensor[0],
            "instances": masks,
            "instance_classes": torch.tensor([tile.classes[k] for k in present], dtype=torch.long),
            "mask": masks.amax(0, keepdim=True) if present else torch.zeros(1, size, size),
            "meta": {"source": tile.source, "window": torch.tensor(tile.window, dtype=torch.int64)},
        }


class InstanceDataModule(lightning.LightningDataModule):
    """Instance tiles for ``samadapt fit`` with the RsPrompter adapters (see the module docstring).

    Give one source: ``image`` + ``labels`` (label raster), ``image`` + ``vectors`` (polygons),
    ``coco`` (COCO JSON), or ``root``: a folder with ``images/`` and ``labels/`` (or ``masks/``) label
    rasters of the same stems, or one ``*.json`` COCO file.

    Args:
        image: the GeoTIFF. labels: its label raster (same grid). vectors: its polygon file.
        coco: a COCO JSON file. root: a folder (layouts above).
        class_field: attribute of the polygons naming their class (default: every polygon is class 0).
        classes: the class of each index: label values (label rasters), ``class_field`` values
            (polygons) or category ids (COCO); None: one class from every object (label rasters, polygons)
            or every category (COCO).
        bands: 1-based bands of the rasters (at most three; default the first three).
        tile: tile side in pixels (default: the model's input side, native resolution).
        overlap: pixels shared by neighbouring training tiles.
        val_fraction: share of each raster's columns (eastern strip) held out, or of COCO images.
        min_area: smaller objects (pixels in a tile) are dropped.
        max_instances: objects kept per tile (the query adapter's ``num_queries`` should be at least this).
        batch_size, num_workers: DataLoader settings. augment: random flips of training tiles.
        seed: seed of COCO's image split.

    Attributes:
        profile: preprocessing profile (taken from the trained module at ``setup`` when not set).
        train_set, val_set: :class:`InstanceSamples` after ``setup``.
    """

    def __init__(
        self,
        image: str | None = None,
        labels: str | None = None,
        vectors: str | None = None,
        coco: str | None = None,
        root: str | None = None,
        class_field: str | None = None,
        classes: list[Any] | None = None,
        bands: list[int] | None = None,
        tile: int | None = None,
        overlap: int = 0,
        val_fraction: float = 0.2,
        min_area: int = 16,
        max_instances: int = 100,
        batch_size: int = 2,
        num_workers: int = 0,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise InputError(f"--data.val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1 or num_workers < 0 or min_area < 1 or max_instances < 1:
            raise InputError("--data.batch_size, min_area and max_instances must be >= 1, num_workers >= 0")
        self.image, self.labels, self.vectors, self.coco, self.root = image, labels, vectors, coco, root
        self.class_field, self.classes, self.bands, self.tile = class_field, classes, bands, tile
        self.overlap, self.val_fraction, self.min_area = overlap, val_fraction, min_area
        self.max_instances, self.batch_size, self.num_workers = max_instances, batch_size, num_workers
        self.augment, self.seed = augment, seed
        self.profile: PreprocessProfile | None = None
        self.train_set: InstanceSamples | None = None
        self.val_set: InstanceSamples | None = None

    def _resolve_profile(self) -> PreprocessProfile:
        if self.profile is None:
            self.profile = trainer_profile(self)
        return self.profile

    def _tiles(self, tile: int) -> tuple[list[Tile], list[Tile]]:
        common: dict[str, Any] = {
            "classes": self.classes,
            "bands": self.bands,
            "tile": tile,
            "min_area": self.min_area,
        }
        if self.coco is not None:
            return coco_tiles(
                self.coco, val_fraction=self.val_fraction, overlap=self.overlap, seed=self.seed, **common
            )
        if self.image is not None:
            return raster_tiles(
                self.image, labels=self.labels, vectors=self.vectors, class_field=self.class_field,
                overlap=self.overlap, val_fraction=self.val_fraction, **common,
            )  # fmt: skip
        if self.root is None:
            raise InputError("no training data: pass --data.image with --data.labels or --data.vectors, "
                             "--data.coco FILE.json, or --data.root DIR")  # fmt: skip
        return self._root_tiles(tile, common)

    def _root_tiles(self, tile: int, common: dict[str, Any]) -> tuple[list[Tile], list[Tile]]:
        root = Path(self.root)  # type: ignore[arg-type]
        if not root.is_dir():
            raise InputError(f"--data.root is not a folder: {root}")
        jsons = sorted(root.glob("*.json"))
        if len(jsons) == 1 and not (root / "images").is_dir():
            return coco_tiles(
                jsons[0], val_fraction=self.val_fraction, overlap=self.overlap, seed=self.seed, **common
            )
        folder = next((root / f for f in LABEL_FOLDERS if (root / f).is_dir()), None)
        if not (root / "images").is_dir() or folder is None:
            raise InputError(f"{root} holds neither images/ with labels/ (or masks/) nor one COCO *.json")
        pairs = []
        for path in sorted((root / "images").iterdir()):
            label = next(
                (p for p in sorted(folder.glob(path.stem + ".*")) if p.suffix.lower() in IMAGE_SUFFIXES), None
            )
            if path.suffix.lower() in IMAGE_SUFFIXES and label is not None:
                pairs.append((path, label))
        if not pairs:
            raise InputError(f"no image in {root / 'images'} has a label raster of the same name in {folder}")
        order = np.random.default_rng(self.seed).permutation(len(pairs))
        n_val = (
            0 if self.val_fraction <= 0 or len(pairs) < 2 else max(1, round(len(pairs) * self.val_fraction))
        )
        val = {int(i) for i in order[:n_val]}
        out: tuple[list[Tile], list[Tile]] = ([], [])
        for i, (path, label) in enumerate(pairs):
            fraction = self.val_fraction if len(pairs) == 1 else 0.0  # one pair: split it by region
            train, held = raster_tiles(
                path, labels=label, overlap=self.overlap, val_fraction=fraction, **common
            )
            out[1 if i in val else 0].extend(train)
            out[1].extend(held)
        return out

    def setup(self, stage: str | None = None) -> None:
        """Read the tiles that hold objects (once per profile) and split them by region."""
        profile = self._resolve_profile()
        if self.train_set is not None and self.train_set.profile == profile:
            return
        train, val = self._tiles(self.tile or profile.input_size)
        if not train:
            raise InputError(f"no training tile holds an object of at least {self.min_area} pixels")
        self.train_set = InstanceSamples(train, profile, self.augment, self.max_instances)
        self.val_set = InstanceSamples(val, profile, False, self.max_instances)

    def _loader(self, dataset: InstanceSamples, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            collate_fn=collate, persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def _require(self) -> tuple[InstanceSamples, InstanceSamples]:
        if self.train_set is None or self.val_set is None:
            self.setup()
        assert self.train_set is not None and self.val_set is not None
        return self.train_set, self.val_set

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._require()[0], shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation tiles; an empty list (Lightning skips validation) when none is held out."""
        val = self._require()[1]
        return self._loader(val, shuffle=False) if len(val) else []

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        train, val = self._require()
        return self._loader(val if len(val) else InstanceSamples(train.tiles, train.profile), shuffle=False)
