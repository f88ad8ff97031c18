"""3D patches for the volumetric adapter: a LightningDataModule over image/label volume pairs.

Cases come from :func:`samadapt.domains.segmentation_layouts.find_cases` (MSD ``dataset.json``,
``imagesTr``/``labelsTr``, ``images``/``labels``; NIfTI, NRRD, MHA or DICOM series) and are read with
their geometry by :func:`samadapt.domains.medical.io.read_volume`. Each case is prepared once with
MONAI dictionary transforms: ``Orientationd`` (RAS), ``Spacingd`` (``spacing`` mm; bilinear image,
nearest label), intensity clip + z-score (:func:`normalise_intensity`, the same function inference
uses), the label made binary (``labels``: the values that form the object), ``SpatialPadd`` to the
patch. Training samples are random ``RandCropByPosNegLabeld`` patches, foreground- or
background-centred with ratio ``pos:neg``; validation patches are foreground-centred with a fixed seed.

Samples: ``image`` (1, S0, S1, S2) float32 and ``mask`` (1, S0, S1, S2) {0, 1} float32, slices along
the last axis, plus ``meta`` (the case name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from samadapt.domains.medical.io import read_volume
from samadapt.domains.segmentation_data import split_cases
from samadapt.domains.segmentation_layouts import LAYOUTS, Case, find_cases
from samadapt.errors import InputError

__all__ = ["VolumeCases", "VolumePatches", "VolumetricDataModule", "normalise_intensity", "prepare_case"]


def normalise_intensity(
    image: np.ndarray | torch.Tensor,
    clip: Sequence[float] | None,
    mean: float | None = None,
    std: float | None = None,
) -> torch.Tensor:
    """Clip to ``clip`` (lo, hi) then z-score with ``mean``/``std`` (None: the clipped volume's own).

    The reference clips to a per-dataset window and z-scores with dataset foreground statistics; the
    per-volume default needs no labels, so inference can repeat it exactly.
    """
    x = torch.as_tensor(image, dtype=torch.float32)
    if clip is not None:
        x = x.clamp(float(clip[0]), float(clip[1]))
    m = float(x.mean()) if mean is None else float(mean)
    s = float(x.std()) if std is None else float(std)
    return (x - m) / max(s, 1e-6)


def _transforms(spacing: Sequence[float] | None) -> Any:
    from monai.transforms import Compose, Orientationd, Spacingd

    steps: list[Any] = [
        Orientationd(keys=["image", "mask"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
    ]
    if spacing is not None:
        steps.append(Spacingd(keys=["image", "mask"], pixdim=tuple(spacing), mode=("bilinear", "nearest")))
    return Compose(steps)


def prepare_case(
    case: Case,
    *,
    spacing: Sequence[float] | None,
    clip: Sequence[float] | None,
    mean: float | None,
    std: float | None,
    labels: Sequence[int] | None,
    patch: Sequence[int],
    keep_values: bool = False,
) -> dict[str, torch.Tensor]:
    """One case read, reoriented (RAS), resampled, normalised, label made binary (or, with ``keep_values``,
    the chosen label values kept), padded to ``patch``.

    Returns:
        ``image`` and ``mask``, each (1, S0, S1, S2) float32 tensors.
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialPad

    image = read_volume(case.image)
    label = read_volume(case.label)
    if image.shape != label.shape:
        raise InputError(f"{case.name}: image {image.shape} and label {label.shape} grids differ")
    affine = torch.as_tensor(image.affine)
    data = {
        "image": MetaTensor(torch.as_tensor(image.array, dtype=torch.float32)[None], affine=affine),
        "mask": MetaTensor(
            torch.as_tensor(np.asarray(label.array), dtype=torch.float32)[None], affine=affine
        ),
    }
    data = _transforms(spacing)(data)
    values = _plain(data["mask"]).round()
    if labels is None:
        mask = values.clamp(min=0) if keep_values else (values > 0).float()
    else:
        chosen = torch.isin(values, torch.tensor([float(v) for v in labels]))
        mask = values * chosen if keep_values else chosen.float()
    img = normalise_intensity(_plain(data["image"]), clip, mean, std)
    pad = SpatialPad(spatial_size=tuple(patch), mode="constant")
    background = float(img.min())
    return {"image": _plain(pad(img - background)) + background, "mask": _plain(pad(mask))}


def _plain(x: Any) -> torch.Tensor:
    """A MONAI MetaTensor (or tensor) as a plain float32 tensor."""
    return (x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)).float()


class VolumeCases:
    """The prepared cases of one split (decoded once)."""

    def __init__(self, names: list[str], volumes: list[dict[str, torch.Tensor]]) -> None:
        self.names = names
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)


class VolumePatches(Dataset):
    """``samples_per_volume`` random patches per case and epoch (``RandCropByPosNegLabeld``).

    Args:
        cases: prepared cases. patch: (S0, S1, S2). pos, neg: foreground/background centre ratio.
        seed: fixed seed (validation: the same patches every epoch); None draws fresh ones.
        one_object: the cases' masks hold label values; each patch's object is one of them (the value at
            the patch centre, else a random one present), so clicks, not the organ, say what to segment.
        intensity_shift, intensity_scale: MONAI ``RandShiftIntensityd`` offsets and ``RandScaleIntensityd``
            factors on the z-scored image (each applied with probability 0.8); 0 turns it off.
    """

    def __init__(
        self,
        cases: VolumeCases,
        patch: Sequence[int],
        pos: float,
        neg: float,
        samples_per_volume: int,
        seed: int | None = None,
        intensity_shift: float = 0.0,
        intensity_scale: float = 0.0,
        one_object: bool = False,
    ) -> None:
        from monai.transforms import Compose, RandCropByPosNegLabeld, RandScaleIntensityd, RandShiftIntensityd

        self.cases, self.samples_per_volume, self.seed = cases, samples_per_volume, seed
        steps: list[Any] = []
        if intensity_shift > 0:
            steps.append(RandShiftIntensityd(keys="image", offsets=float(intensity_shift), prob=0.8))
        if intensity_scale > 0:
            steps.append(RandScaleIntensityd(keys="image", factors=float(intensity_scale), prob=0.8))
        self.augment = Compose(steps) if steps else None
        self.one_object = one_object
        self.crop = RandCropByPosNegLabeld(
            keys=["image", "mask"],
            label_key="mask",
            spatial_size=tuple(patch),
            pos=pos,
            neg=neg,
            num_samples=1,
            allow_smaller=False,
        )

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_volume

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = index // self.samples_per_volume
        if self.seed is not None:
            self.crop.set_random_state(seed=self.seed + index)
        else:
            self.crop.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,))))
        out = self.crop(dict(self.cases.volumes[case]))[0]  # type: ignore[arg-type]
        if self.one_object:  # the object: one label value of the patch (its centre's when it has one)
            values = torch.as_tensor(out["mask"])
            centre = values[(0, *(s // 2 for s in values.shape[1:]))]
            present = [v for v in values.unique().tolist() if v > 0]
            pick = (
                float(centre)
                if centre > 0
                else (present[int(self.crop.R.randint(len(present)))] if present else 0.0)
            )
            out["mask"] = (values == pick).float() if pick > 0 else torch.zeros_like(values)
        if self.augment is not None:  # the crop's random state was just drawn: seed the augmentation from it
            self.augment.set_random_state(seed=int(self.crop.R.randint(0, 2**31 - 1)))
            out = self.augment(out)
        return {
            "image": torch.as_tensor(out["image"]).float().contiguous(),
            "mask": torch.as_tensor(out["mask"]).float().contiguous(),
            "meta": {"case": self.cases.names[case]},
        }


class VolumetricDataModule(lightning.LightningDataModule):
    """3D patches for ``fit``/``validate`` of the volumetric adapter (see the module docstring).

    Args:
        root: data folder ({layouts}).
        val_root: separate validation folder; otherwise ``val_fraction`` of the cases are held out.
        patch: patch size (S0, S1, S2) in voxels after resampling (128^3 for ViT-B at scale 4).
        spacing: target voxel size in mm (the reference: 1, 1, 1); None keeps each volume's own.
        clip: intensity window (lo, hi) before the z-score (CT soft tissue by default); None: no clip.
        mean, std: z-score statistics (None: each volume's own after clipping).
        labels: label values forming the object (e.g. [2, 3] for both kidneys); None: any non-zero.
        one_object: each patch's object is ONE of those label values (the one at the patch centre, else a
            random one present) instead of their union: a click model for many organs, where the clicks say
            which organ; the default trains one object (the union), as the 3DSAM-adapter reference does.
        pos, neg: ratio of foreground- and background-centred training patches (1:1).
        samples_per_volume: training patches per case and epoch.
        intensity_shift: training patches get a random intensity offset in [-x, x] (z-score units; a contrast
            phase moves an organ by about half a standard deviation); 0 turns it off.
        intensity_scale: training patches are scaled by a random factor in [1 - x, 1 + x]; 0 turns it off.
        batch_size, num_workers: DataLoader settings.
        seed: seed of the case split and of the validation patches.
    """

    def __init__(
        self,
        root: str | None = None,
        val_root: str | None = None,
        val_fraction: float = 0.2,
        patch: list[int] | tuple[int, int, int] = (128, 128, 128),
        spacing: list[float] | tuple[float, float, float] | None = (1.0, 1.0, 1.0),
        clip: list[float] | tuple[float, float] | None = (-175.0, 250.0),
        mean: float | None = None,
        std: float | None = None,
        labels: list[int] | None = None,
        pos: float = 1.0,
        neg: float = 1.0,
        samples_per_volume: int = 4,
        intensity_shift: float = 0.1,
        intensity_scale: float = 0.1,
        one_object: bool = False,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(patch) != 3 or min(patch) < 1:
            raise InputError(f"--data.patch needs three positive sizes, got {patch}")
        if not 0.0 <= val_fraction < 1.0:
            raise InputError(f"--data.val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1 or num_workers < 0 or samples_per_volume < 1:
            raise InputError("--data.batch_size and samples_per_volume must be >= 1, num_workers >= 0")
        self.root, self.val_root, self.val_fraction = root, val_root, val_fraction
        self.patch = tuple(int(v) for v in patch)
        self.spacing = None if spacing is None else tuple(float(v) for v in spacing)
        self.clip = None if clip is None else tuple(float(v) for v in clip)
        self.mean, self.std = mean, std
        self.labels = None if labels is None else [int(v) for v in labels]
        self.pos, self.neg, self.samples_per_volume = pos, neg, samples_per_volume
        if intensity_shift < 0 or not 0 <= intensity_scale < 1:
            raise InputError("--data.intensity_shift must be >= 0 and intensity_scale in [0, 1)")
        self.intensity_shift, self.intensity_scale = float(intensity_shift), float(intensity_scale)
        self.one_object = bool(one_object)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set: VolumePatches | None = None
        self.val_set: VolumePatches | None = None

    def _prepare(self, cases: list[Case]) -> VolumeCases:
        volumes = []
        for case in cases:
            if case.kind != "volume":
                raise InputError(
                    f"{case.name}: the volumetric data module needs volumes, not {case.kind} files"
                )
            volumes.append(
                prepare_case(
                    case,
                    spacing=self.spacing,
                    clip=self.clip,
                    mean=self.mean,
                    std=self.std,
                    labels=self.labels,
                    keep_values=self.one_object,
                    patch=self.patch,
                )
            )
        return VolumeCases([c.name for c in cases], volumes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.root is None:
            raise InputError(f"no training data: pass --data.root DIR (a folder with {LAYOUTS})")
        cases = find_cases(self.root)
        if self.val_root is not None:
            train_cases, val_cases = cases, find_cases(self.val_root)
        else:
            train_cases, val_cases = split_cases(cases, self.val_fraction, self.seed)
        train = self._prepare(train_cases)
        if not any(bool(v["mask"].any()) for v in train.volumes):
            raise InputError(f"no object in the training labels of {self.root} (labels {self.labels})")
        self.train_set = VolumePatches(
            train,
            self.patch,
            self.pos,
            self.neg,
            self.samples_per_volume,
            intensity_shift=self.intensity_shift,
            intensity_scale=self.intensity_scale,
            one_object=self.one_object,
        )
        self.val_set = VolumePatches(
            self._prepare(val_cases), self.patch, 1.0, 0.0, 1, seed=self.seed, one_object=self.one_object
        )

    def _loader(self, dataset: VolumePatches, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_set is not None
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation patches; an empty list (Lightning skips validation) when no case is held out."""
        self.setup()
        assert self.val_set is not None
        return self._loader(self.val_set, shuffle=False) if len(self.val_set) else []


if VolumetricDataModule.__doc__:
    VolumetricDataModule.__doc__ = VolumetricDataModule.__doc__.replace("{layouts}", LAYOUTS)
