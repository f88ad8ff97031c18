"""Training data for ``samadapt fit``: a LightningDataModule over 2D images, volumes or MedSAM ``.npz``.

Every sample is one object on one 2D plane (an image, or a slice of a volume), preprocessed exactly as
inference preprocesses it, so a model trains on the pixels it will later see:

- 2D images are used as read (:func:`~samadapt.domains.images.read_image`);
- volumes are intensity-mapped as ``samadapt segment VOLUME`` maps them and sliced along ``axis``
  (:mod:`samadapt.domains.medical.slices`);
- ``.npz`` images are used as stored;
- then :func:`samadapt.preprocess.preprocess` with the model's profile gives the (3, S, S) input and
  :func:`samadapt.preprocess.preprocess_mask` puts the object's mask on the same pixels.

Files are decoded once per :meth:`SegmentationDataModule.setup`; only planes holding an object are kept.
For profiles that quantise to 8 bits (LiteMedSAM) a float plane is stored as the very uint8 pixels that
``preprocess`` would compute from it, which preprocesses to an identical tensor at a quarter of the memory.

Layouts are described in :mod:`samadapt.domains.segmentation_layouts`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from samadapt.domains.images import read_image, read_label_image
from samadapt.domains.medical.intensity import PRESETS
from samadapt.domains.medical.propagation import AXES
from samadapt.domains.medical.slices import labelled_planes, plane_objects, read_npz_pair, read_volume_pair
from samadapt.domains.segmentation_layouts import LAYOUTS, Case, find_cases
from samadapt.errors import InputError
from samadapt.preprocess import PreprocessProfile, preprocess, preprocess_mask, to_rgb_float

__all__ = [
    "Plane",
    "SampleStore",
    "SegmentationDataModule",
    "SegmentationSamples",
    "compact_image",
    "load_samples",
    "split_cases",
]


def compact_image(image: np.ndarray, profile: PreprocessProfile) -> np.ndarray:
    """The smallest array that :func:`preprocess` turns into the same tensor as ``image``.

    For a quantising min-max profile a non-uint8 image becomes the uint8 pixels ``preprocess`` computes
    from it (same float32 arithmetic); anything else is kept as is. Flips commute with this mapping.

    Args:
        image: (H, W) or (H, W, C) plane.
        profile: the preprocessing profile.

    Returns:
        (H, W) or (H, W, C) array (uint8 after quantisation; gray stays single-channel).
    """
    array = np.asarray(image)
    if not (profile.quantize and profile.normalize == "minmax") or array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    gray = array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1)
    rgb = torch.from_numpy(to_rgb_float(array))
    lowest, highest = float(rgb.min()), float(rgb.max())
    quantised = torch.round((rgb - lowest) / max(highest - lowest, 1e-8) * 255.0).to(torch.uint8).numpy()
    return np.ascontiguousarray(quantised[:, :, 0] if gray else quantised)


@dataclass
class Plane:
    """One decoded 2D plane and its labels.

    Attributes:
        image: (H, W) or (H, W, C) pixels in stored form (see :func:`compact_image`).
        labels: (H, W) integer label map, 0 = background.
        case: case name.
        source: image file (or DICOM folder) it came from.
        index: slice index along the sampling axis, -1 for a 2D image.
    """

    image: np.ndarray
    labels: np.ndarray
    case: str
    source: str
    index: int


@dataclass
class SampleStore:
    """Decoded planes and the samples on them: ``entries[n] = (plane index, object label value)``."""

    planes: list[Plane] = field(default_factory=list)
    entries: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def subset(self, picks: Sequence[int]) -> SampleStore:
        """A store with only the samples ``picks`` and the planes they use."""
        out = SampleStore()
        remap: dict[int, int] = {}
        for pick in picks:
            plane, value = self.entries[pick]
            if plane not in remap:
                remap[plane] = len(out.planes)
                out.planes.append(self.planes[plane])
            out.entries.append((remap[plane], value))
        return out

    @property
    def cases(self) -> set[str]:
        return {self.planes[p].case for p, _ in self.entries}


def _case_planes(
    case: Case, axis: str, preset: str | None, min_area: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray, list[int]]]:
    """(index, image plane, label plane, object values) for each plane of ``case`` holding an object."""
    if case.kind == "volume":
        image, labels, _ = read_volume_pair(case.image, case.label, preset)
        yield from labelled_planes(image, labels, axis, min_area)
        return
    if case.kind == "npz":
        imgs, gts = read_npz_pair(case.image)
        if gts.ndim == 3:
            yield from labelled_planes(imgs, gts, None, min_area)
            return
        flat, labels = imgs, gts
    else:
        flat, labels = read_image(case.image), read_label_image(case.label)
    if flat.shape[:2] != labels.shape:
        raise InputError(
            f"mask {case.label.name} is {labels.shape[1]}x{labels.shape[0]} but image {case.image.name} is "
            f"{flat.shape[1]}x{flat.shape[0]}"
        )
    objects = plane_objects(labels, min_area)
    if objects:
        yield -1, flat, labels, objects


def load_samples(
    cases: Sequence[Case],
    profile: PreprocessProfile,
    axis: str = "axial",
    preset: str | None = None,
    min_area: int = 16,
) -> SampleStore:
    """Decode ``cases`` into planes and list one sample per (plane, object with >= ``min_area`` pixels).

    Raises:
        InputError: unreadable files, label/image mismatches.
    """
    store = SampleStore()
    for case in cases:
        for index, image, labels, objects in _case_planes(case, axis, preset, min_area):
            plane = len(store.planes)
            store.planes.append(
                Plane(compact_image(image, profile), labels, case.name, str(case.image), index)
            )
            store.entries.extend((plane, value) for value in objects)
    return store


def split_cases(cases: Sequence[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Seeded split by case: ``round(n * val_fraction)`` cases (at least 1 when the fraction is > 0 and
    there are two or more cases, at most n - 1) go to validation."""
    n = len(cases)
    n_val = 0 if val_fraction <= 0 or n < 2 else min(max(round(n * val_fraction), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(int(i) for i in order[:n_val])
    return [c for i, c in enumerate(cases) if i not in val], [cases[i] for i in val]


class SegmentationSamples(Dataset):
    """Samples of a :class:`SampleStore` as dicts ``image``, ``mask``, ``meta``.

    ``image``: (3, S, S) float32 from :func:`preprocess`; ``mask``: (1, S, S) float32 in {0, 1} on the same
    pixels; ``meta``: ``case`` (str), ``source`` (str), ``object`` (int label value), ``slice`` (int, -1 for
    2D), ``valid_size`` ((2,) int64 tensor: the resized (h, w) region at the frame's top-left).

    Args:
        store: decoded planes and samples.
        profile: preprocessing profile of the model being trained.
        augment: random horizontal and vertical flips (image and mask together, before preprocessing),
            drawn from torch's generator (seeded per DataLoader worker).
    """

    def __init__(self, store: SampleStore, profile: PreprocessProfile, augment: bool = False) -> None:
        self.store, self.profile, self.augment = store, profile, augment

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, Any]:
        plane_index, value = self.store.entries[index]
        plane = self.store.planes[plane_index]
        image, mask = plane.image, plane.labels == value
        if self.augment:
            flip_x, flip_y = (torch.rand(2) < 0.5).tolist()
            if flip_x:
                image, mask = image[:, ::-1], mask[:, ::-1]
            if flip_y:
                image, mask = image[::-1], mask[::-1]
        tensor, resized = preprocess(image, self.profile)  # (1, 3, S, S)
        return {
            "image": tensor[0],
            "mask": preprocess_mask(mask, self.profile)[0],  # (1, S, S)
            "meta": {
                "case": plane.case,
                "source": plane.source,
                "object": int(value),
                "slice": int(plane.index),
                "valid_size": torch.tensor(resized, dtype=torch.int64),
            },
        }


def trainer_profile(datamodule: Any) -> PreprocessProfile:
    """The preprocessing profile of the model a data module's trainer trains (the task's ``profile``)."""
    trainer = datamodule.trainer
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    found = getattr(module, "profile", None)
    if isinstance(found, dict):
        found = PreprocessProfile.from_dict(found)
    if not isinstance(found, PreprocessProfile):
        raise InputError("the data module needs a preprocessing profile: set .profile or train a model")
    return found


class SegmentationDataModule(lightning.LightningDataModule):
    """2D segmentation samples for ``samadapt fit/validate/test/predict`` (see the module docstring).

    Args:
        root: data folder (``--data.root DIR``); layouts in :mod:`samadapt.domains.segmentation_layouts`.
        val_root: separate validation folder (same layouts); otherwise ``val_fraction`` of the cases of
            ``root`` (whole images / volumes / .npz files, never single slices) are held out.
        val_fraction: share of cases held out when ``val_root`` is not given.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        axis: slicing axis of volumes: ``axial``, ``coronal`` or ``sagittal``.
        preset: intensity preset for volume files (``None``: guessed per volume, as ``samadapt segment``).
        min_area: objects smaller than this (pixels on the plane) are skipped.
        augment: random flips of training samples.
        max_samples: keep a seeded random subset of this many training samples (quick runs).
        labels: keep only objects with these label values (e.g. one organ of a label map, for a
            per-class model such as AutoSAM); None keeps every object.
        seed: seed of the case split and of the ``max_samples`` subset.

    Attributes:
        profile: preprocessing profile; when not set explicitly, ``setup`` takes the trained module's
            ``profile``.
        train_set, val_set: the datasets after ``setup`` (``val_set`` may be empty).
    """

    def __init__(
        self,
        root: str | None = None,
        val_root: str | None = None,
        val_fraction: float = 0.2,
        batch_size: int = 4,
        num_workers: int = 0,
        axis: str = "axial",
        preset: str | None = None,
        min_area: int = 16,
        augment: bool = True,
        max_samples: int | None = None,
        labels: list[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if axis not in AXES:
            raise InputError(f"unknown --data.axis {axis!r}; choose from {', '.join(AXES)}")
        if preset is not None and preset not in PRESETS:
            raise InputError(f"unknown --data.preset {preset!r}; valid: {', '.join(PRESETS)}")
        if not 0.0 <= val_fraction < 1.0:
            raise InputError(f"--data.val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1 or num_workers < 0 or min_area < 0:
            raise InputError("--data.batch_size must be >= 1, num_workers and min_area >= 0")
        if max_samples is not None and max_samples < 1:
            raise InputError(f"--data.max_samples must be >= 1, got {max_samples}")
        self.root, self.val_root, self.val_fraction = root, val_root, val_fraction
        self.batch_size, self.num_workers, self.axis, self.preset = batch_size, num_workers, axis, preset
        self.min_area, self.augment, self.max_samples, self.seed = min_area, augment, max_samples, seed
        self.labels = None if labels is None else [int(v) for v in labels]
        self.profile: PreprocessProfile | None = None
        self.train_set: SegmentationSamples | None = None
        self.val_set: SegmentationSamples | None = None
        self._built_for: PreprocessProfile | None = None

    def _resolve_profile(self) -> PreprocessProfile:
        if self.profile is None:
            self.profile = trainer_profile(self)
        return self.profile

    def setup(self, stage: str | None = None) -> None:
        """Find the cases, split them and decode every plane that holds an object (once per profile)."""
        if self.root is None:
            raise InputError(f"no training data: pass --data.root DIR (a folder with {LAYOUTS})")
        profile = self._resolve_profile()
        if self._built_for == profile and self.train_set is not None:
            return
        cases = find_cases(self.root)
        if self.val_root is not None:
            train_cases, val_cases = cases, find_cases(self.val_root)
        else:
            train_cases, val_cases = split_cases(cases, self.val_fraction, self.seed)
        train = self._selected(load_samples(train_cases, profile, self.axis, self.preset, self.min_area))
        if not len(train):
            which = "no object" if self.labels is None else f"no object with a label in {self.labels}"
            raise InputError(
                f"no training samples in {self.root}: {which} has at least {self.min_area} pixels on a "
                "plane (lower --data.min_area?)"
            )
        if self.max_samples is not None and len(train) > self.max_samples:
            picks = np.random.default_rng(self.seed).choice(len(train), self.max_samples, replace=False)
            train = train.subset(sorted(int(i) for i in picks))
        val = self._selected(load_samples(val_cases, profile, self.axis, self.preset, self.min_area))
        self.train_set = SegmentationSamples(train, profile, augment=self.augment)
        self.val_set = SegmentationSamples(val, profile, augment=False)
        self._built_for = profile

    def _selected(self, store: SampleStore) -> SampleStore:
        """Only the samples whose label value is in ``labels`` (all when ``labels`` is None)."""
        if self.labels is None:
            return store
        keep = set(self.labels)
        return store.subset([i for i, (_, value) in enumerate(store.entries) if value in keep])

    def _loader(self, dataset: SegmentationSamples, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _require(self) -> tuple[SegmentationSamples, SegmentationSamples]:
        if self.train_set is None or self.val_set is None:
            self.setup()
        assert self.train_set is not None and self.val_set is not None
        return self.train_set, self.val_set

    def train_dataloader(self) -> DataLoader:
        train, _ = self._require()
        return self._loader(train, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation batches; an empty list (Lightning then skips validation) when no case is held out."""
        _, val = self._require()
        return self._loader(val, shuffle=False) if len(val) else []

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The validation samples, or the training samples (without augmentation) when there are none."""
        train, val = self._require()
        return self._loader(
            val if len(val) else SegmentationSamples(train.store, train.profile), shuffle=False
        )
