"""Training data layer: layouts, sample counts, geometry against inference preprocessing, splits, errors.

Real data: tests/data/sam_med2d (2D slices with per-organ masks, combined here into label maps) and
tests/data/totalsegmentator (a NIfTI CT, and a DICOM series whose label NIfTI is stored in another voxel
order); plus synthetic MedSAM-style .npz files.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from PIL import Image

import samadapt
from samadapt.domains.images import read_image, read_label_image, read_mask
from samadapt.domains.medical import apply_intensity, guess_preset, read_volume
from samadapt.domains.medical.propagation import slice_image
from samadapt.domains.segmentation_data import SegmentationDataModule, compact_image
from samadapt.domains.segmentation_layouts import find_cases
from samadapt.errors import InputError
from samadapt.preprocess import (
    LITEMEDSAM_PROFILE,
    MEDSAM_PROFILE,
    PreprocessProfile,
    preprocess,
    preprocess_mask,
)

DATA = Path(__file__).resolve().parents[1] / "data"
SAM_MED2D = DATA / "sam_med2d"
TOTALSEG = DATA / "totalsegmentator"


@pytest.fixture(scope="module")
def tiny_profile() -> PreprocessProfile:
    profile = samadapt.build("tiny").profile
    assert profile.input_size == 128 and profile.keep_aspect
    return profile


def _mask_files(stem: str) -> list[Path]:
    return sorted((SAM_MED2D / "masks").glob(f"{stem}_*.png"))


@pytest.fixture(scope="module")
def root_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/images/<stem>.png + ROOT/masks/<stem>.png; each mask a label map 1..n of the organ masks."""
    root = tmp_path_factory.mktemp("root2d")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for image in sorted((SAM_MED2D / "images").glob("*.png")):
        (root / "images" / image.name).symlink_to(image)
        labels = np.zeros(read_image(image).shape[:2], dtype=np.uint8)
        for value, mask_file in enumerate(_mask_files(image.stem), start=1):
            labels[read_mask(mask_file)] = value
        Image.fromarray(labels).save(root / "masks" / f"{image.stem}.png")
    return root


@pytest.fixture(scope="module")
def root_msd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MSD dataset.json over the NIfTI CT and the DICOM series (its label is stored with rows flipped)."""
    root = tmp_path_factory.mktemp("msd")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    (root / "imagesTr" / "ct.nii.gz").symlink_to(TOTALSEG / "example_ct_sm.nii.gz")
    (root / "labelsTr" / "ct.nii.gz").symlink_to(TOTALSEG / "example_seg.nii.gz")
    (root / "imagesTr" / "dicom").symlink_to(TOTALSEG / "example_ct_dicom")
    (root / "labelsTr" / "dicom.nii.gz").symlink_to(TOTALSEG / "example_seg_dicom.nii.gz")
    training = [
        {"image": "./imagesTr/ct.nii.gz", "label": "./labelsTr/ct.nii.gz"},
        {"image": "./imagesTr/dicom", "label": "./labelsTr/dicom.nii.gz"},
    ]
    (root / "dataset.json").write_text(json.dumps({"name": "test", "training": training}))
    return root


def _module(root: Path, profile: PreprocessProfile, **kwargs) -> SegmentationDataModule:
    kwargs.setdefault("val_fraction", 0.0)
    kwargs.setdefault("augment", False)
    dm = SegmentationDataModule(str(root), **kwargs)
    dm.profile = profile
    dm.setup("fit")
    return dm


def _expected_2d(min_area: int) -> int:
    """(image, object) pairs counted from the original per-organ mask files (they do not overlap)."""
    return sum(int(read_mask(m).sum()) >= min_area for m in (SAM_MED2D / "masks").glob("*.png"))


def _expected_volume(label_file: Path, axis: int, min_area: int) -> int:
    """(slice, label) pairs with >= min_area voxels, from the raw label file."""
    labels = np.asarray(read_volume(label_file).array)
    total = 0
    for index in range(labels.shape[axis]):
        values, counts = np.unique(np.take(labels, index, axis=axis), return_counts=True)
        total += int(np.sum((values != 0) & (counts >= min_area)))
    return total


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


# ---------------------------------------------------------------------------------------------------- 2D


def test_2d_counts_shapes_and_inference_pixels(root_2d: Path, tiny_profile: PreprocessProfile) -> None:
    dm = _module(root_2d, tiny_profile)
    assert dm.train_set is not None and dm.val_set is not None
    assert len(dm.train_set) == _expected_2d(16) == 30 and len(dm.val_set) == 0
    assert dm.val_dataloader() == []
    assert len(_module(root_2d, tiny_profile, min_area=100).train_set or []) == _expected_2d(100) < 30
    seen = set()
    for n in range(len(dm.train_set)):
        sample = dm.train_set[n]
        meta = sample["meta"]
        seen.add((meta["case"], meta["object"]))
        assert sample["image"].shape == (3, 128, 128) and sample["image"].dtype == torch.float32
        assert sample["mask"].shape == (1, 128, 128) and sample["mask"].dtype == torch.float32
        assert set(torch.unique(sample["mask"]).tolist()) <= {0.0, 1.0} and sample["mask"].sum() > 0
        assert meta["slice"] == -1 and Path(meta["source"]).stem == meta["case"]
        expected, resized = preprocess(read_image(meta["source"]), tiny_profile)
        assert torch.equal(sample["image"], expected[0])  # the very pixels inference feeds the encoder
        assert tuple(meta["valid_size"].tolist()) == resized
        h, w = resized
        assert sample["mask"][:, h:].sum() == 0 and sample["mask"][:, :, w:].sum() == 0
    assert len(seen) == 30
    # s0114_111 is 258 x 181: longest side 258 -> 128, so 181 -> 90 rows, padded below
    odd = next(dm.train_set[n] for n in range(30) if dm.train_set[n]["meta"]["case"] == "s0114_111")
    assert odd["meta"]["valid_size"].tolist() == [90, 128]
    assert odd["image"][:, 90:].abs().sum() == 0


@pytest.mark.parametrize("profile", [LITEMEDSAM_PROFILE, MEDSAM_PROFILE], ids=["litemedsam", "medsam"])
def test_2d_mask_lands_on_the_object(root_2d: Path, profile: PreprocessProfile) -> None:
    dm = _module(root_2d, profile, max_samples=8)
    assert dm.train_set is not None and len(dm.train_set) == 8
    for n in range(8):
        sample = dm.train_set[n]
        meta = sample["meta"]
        labels = read_label_image(root_2d / "masks" / f"{meta['case']}.png")
        mask = labels == meta["object"]
        (height, width), (h, w) = mask.shape, tuple(meta["valid_size"].tolist())
        assert (h, w) == profile.resized_size((height, width))
        r0, r1, c0, c1 = _bbox(mask)
        f0, f1, g0, g1 = _bbox(sample["mask"][0].numpy() > 0)
        sy, sx = h / height, w / width  # the profile's resize factors (equal when the aspect is kept)
        assert abs(f0 - r0 * sy) <= 1 and abs(f1 + 1 - (r1 + 1) * sy) <= 1
        assert abs(g0 - c0 * sx) <= 1 and abs(g1 + 1 - (c1 + 1) * sx) <= 1
        area = sample["mask"].sum().item()
        assert area == pytest.approx(mask.sum() * sy * sx, rel=0.2, abs=12)


def test_split_by_image_is_seeded_and_disjoint(root_2d: Path, tiny_profile: PreprocessProfile) -> None:
    dm = _module(root_2d, tiny_profile, val_fraction=0.5, seed=3)
    assert dm.train_set is not None and dm.val_set is not None
    train, val = dm.train_set.store.cases, dm.val_set.store.cases
    assert train and val and not train & val
    assert train | val == {p.stem for p in (SAM_MED2D / "images").glob("*.png")}
    assert len(dm.train_set) + len(dm.val_set) == 30
    again = _module(root_2d, tiny_profile, val_fraction=0.5, seed=3)
    assert again.val_set is not None and again.val_set.store.cases == val
    batch = next(iter(dm.val_dataloader()))  # default collate on the meta dict
    assert batch["image"].shape == (4, 3, 128, 128) and batch["mask"].shape == (4, 1, 128, 128)
    assert isinstance(batch["meta"]["case"], list) and batch["meta"]["valid_size"].shape == (4, 2)
    assert len(next(iter(dm.predict_dataloader()))["image"]) == 4
    assert len(next(iter(dm.test_dataloader()))["image"]) == 4


def test_max_samples_is_a_seeded_subset(root_2d: Path, tiny_profile: PreprocessProfile) -> None:
    a = _module(root_2d, tiny_profile, max_samples=5, seed=1)
    b = _module(root_2d, tiny_profile, max_samples=5, seed=1)
    assert a.train_set is not None and b.train_set is not None
    assert len(a.train_set) == 5
    key = [(a.train_set[n]["meta"]["case"], a.train_set[n]["meta"]["object"]) for n in range(5)]
    assert key == [(b.train_set[n]["meta"]["case"], b.train_set[n]["meta"]["object"]) for n in range(5)]
    assert len(a.train_set.store.planes) <= 4  # only the planes the kept samples use


# ----------------------------------------------------------------------------------------------- volumes


def test_msd_volumes_counts_and_inference_pixels(root_msd: Path) -> None:
    dm = _module(root_msd, LITEMEDSAM_PROFILE)
    assert dm.train_set is not None
    store = dm.train_set.store
    expected = {
        "ct": _expected_volume(TOTALSEG / "example_seg.nii.gz", 2, 16),
        "dicom": _expected_volume(TOTALSEG / "example_seg_dicom.nii.gz", 2, 16),
    }
    counts = {case: sum(store.planes[p].case == case for p, _ in store.entries) for case in expected}
    assert counts == expected and min(expected.values()) > 0
    # The stored planes preprocess to exactly what `samadapt segment VOLUME` feeds the encoder.
    for case, source in (("ct", "example_ct_sm.nii.gz"), ("dicom", "example_ct_dicom")):
        volume = read_volume(TOTALSEG / source)
        mapped = apply_intensity(volume.array, preset=guess_preset(volume))
        mine = [n for n, (p, _) in enumerate(store.entries) if store.planes[p].case == case]
        for n in (mine[0], mine[-1]):
            sample = dm.train_set[n]
            meta = sample["meta"]
            assert Path(meta["source"]).name == ("ct.nii.gz" if case == "ct" else "dicom")
            reference, _ = preprocess(slice_image(mapped, "axial", meta["slice"]), LITEMEDSAM_PROFILE)
            assert torch.equal(sample["image"], reference[0])
            assert sample["image"].shape == (3, 256, 256)
            assert 0 <= sample["image"].min() <= sample["image"].max() <= 1
    assert all(store.planes[p].image.dtype == np.uint8 for p, _ in store.entries)  # quantising profile


def test_dicom_label_is_reoriented_onto_the_series(root_msd: Path, tiny_profile: PreprocessProfile) -> None:
    dm = _module(root_msd, tiny_profile)
    assert dm.train_set is not None
    planes = [p for p in dm.train_set.store.planes if p.case == "dicom"]
    assert planes and all(p.image.dtype == np.float32 for p in planes)
    liver = np.concatenate([p.image[p.labels == 5] for p in planes])  # ct-soft: (HU + 160) / 400
    vertebra = np.concatenate([p.image[p.labels == 32] for p in planes])
    assert 0.45 < liver.mean() < 0.8 and vertebra.mean() > 0.82


def test_split_by_case_for_volumes(root_msd: Path, tiny_profile: PreprocessProfile) -> None:
    dm = _module(root_msd, tiny_profile, val_fraction=0.2, max_samples=6)
    assert dm.train_set is not None and dm.val_set is not None
    assert len(dm.train_set.store.cases) == 1 and len(dm.val_set.store.cases) == 1
    assert not dm.train_set.store.cases & dm.val_set.store.cases
    assert len(dm.train_set) == 6 and len(dm.val_set) > 6  # the cap is on training samples only


def test_paired_volume_folders_and_axes(tmp_path: Path, tiny_profile: PreprocessProfile) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "ct_0000.nii.gz").symlink_to(TOTALSEG / "example_ct_sm.nii.gz")  # nnU-Net naming
    (tmp_path / "labels" / "ct.nii.gz").symlink_to(TOTALSEG / "example_seg.nii.gz")
    for axis, number in (("coronal", 1), ("sagittal", 0)):
        dm = _module(tmp_path, tiny_profile, axis=axis, min_area=30)
        assert dm.train_set is not None
        assert len(dm.train_set) == _expected_volume(TOTALSEG / "example_seg.nii.gz", number, 30)
        meta = dm.train_set[0]["meta"]
        labels = read_volume(TOTALSEG / "example_seg.nii.gz").array
        plane = slice_image(labels, axis, meta["slice"]) == meta["object"]
        sample_mask = dm.train_set[0]["mask"][0].numpy() > 0
        scale = 128 / max(plane.shape)
        assert sample_mask.sum() == pytest.approx(plane.sum() * scale**2, rel=0.3, abs=12)


# --------------------------------------------------------------------------------------------------- npz


def _blobs(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Rectangles of labels 1 and 2 in asymmetric positions."""
    gts = np.zeros(shape, dtype=np.uint8)
    gts[..., 4:14, 3:9] = 1
    gts[..., 20:30, 25:38] = 2
    return gts


def test_npz_volume_and_2d(tmp_path: Path, tiny_profile: PreprocessProfile) -> None:
    rng = np.random.default_rng(0)
    gts3 = _blobs((5, 40, 48), rng)
    gts3[0] = 0  # an empty slice is skipped
    gts3[4, 20:30, 25:38] = 0
    shades = np.array([10, 100, 200], dtype=np.uint8)  # background, object 1, object 2
    np.savez(tmp_path / "vol.npz", imgs=shades[gts3], gts=gts3)
    gts2 = _blobs((40, 48), rng)
    np.savez(tmp_path / "flat.npz", imgs=np.repeat(shades[gts2][:, :, None], 3, axis=2), gts=gts2)
    assert sorted(c.kind for c in find_cases(tmp_path)) == ["npz", "npz"]
    dm = _module(tmp_path, tiny_profile, augment=True)
    assert dm.train_set is not None
    slices = sorted(
        (s["meta"]["case"], s["meta"]["slice"], s["meta"]["object"])
        for s in (dm.train_set[n] for n in range(len(dm.train_set)))
    )
    expected_vol = [("vol", k, v) for k in range(1, 5) for v in (1, 2) if (gts3[k] == v).any()]
    assert slices == sorted([("flat", -1, 1), ("flat", -1, 2), *expected_vol])
    # Flips move image and mask together: the mask always lies on the object's shade.
    torch.manual_seed(0)
    corners = set()
    for _ in range(4):
        for n in range(len(dm.train_set)):
            sample = dm.train_set[n]
            meta = sample["meta"]
            plane = gts2 if meta["slice"] < 0 else gts3[meta["slice"]]
            present = shades[np.unique(plane)].astype(float)
            level = (shades[meta["object"]] - present.min()) / (present.max() - present.min())
            inside = sample["mask"][0] > 0
            on_shade = (sample["image"][0][inside] - level).abs() < 0.1
            assert on_shade.float().mean() > 0.8
            corners.add(_bbox(inside.numpy())[:3:2] if meta["object"] == 1 else None)
    assert len(corners - {None}) == 4  # all four flip combinations were drawn


def test_npz_errors(tmp_path: Path, tiny_profile: PreprocessProfile) -> None:
    np.savez(tmp_path / "bad.npz", imgs=np.zeros((4, 5, 6)), gts=np.zeros((4, 5, 7), dtype=np.uint8))
    with pytest.raises(InputError, match="do not match"):
        _module(tmp_path, tiny_profile)
    np.savez(tmp_path / "bad.npz", imgs=np.zeros((4, 5, 6)))
    with pytest.raises(InputError, match="lacks gts"):
        _module(tmp_path, tiny_profile)


# ------------------------------------------------------------------------------------------------ errors


def test_errors(tmp_path: Path, root_2d: Path, tiny_profile: PreprocessProfile) -> None:
    with pytest.raises(InputError, match=r"--data\.root DIR"):
        SegmentationDataModule().setup("fit")
    with pytest.raises(InputError, match="not found"):
        _module(tmp_path / "missing", tiny_profile)
    with pytest.raises(InputError, match=r"no training data found .*images/ \+ masks/"):
        _module(tmp_path, tiny_profile)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        _module(tmp_path, tiny_profile)
    (tmp_path / "images" / "a.png").symlink_to(root_2d / "images" / "s0619_32.png")
    (tmp_path / "images" / "b.png").symlink_to(root_2d / "images" / "s0114_111.png")
    (tmp_path / "masks" / "a.png").symlink_to(root_2d / "masks" / "s0619_32.png")
    (tmp_path / "masks" / "c.png").symlink_to(root_2d / "masks" / "s0114_111.png")
    with pytest.raises(InputError, match=r"unpaired files .*b\.png.*c\.png"):
        _module(tmp_path, tiny_profile)
    (tmp_path / "masks" / "c.png").rename(tmp_path / "masks" / "b.png")
    (tmp_path / "masks" / "a.png").unlink()
    (tmp_path / "masks" / "a.png").symlink_to(root_2d / "masks" / "s0114_111.png")  # wrong size
    with pytest.raises(InputError, match=r"is 258x181 but image a\.png is 225x155"):
        _module(tmp_path, tiny_profile)
    with pytest.raises(InputError, match="axis"):
        SegmentationDataModule(str(tmp_path), axis="oblique")
    with pytest.raises(InputError, match="preset"):
        SegmentationDataModule(str(tmp_path), preset="ct-nope")
    with pytest.raises(InputError, match="profile"):
        SegmentationDataModule(str(tmp_path)).setup("fit")


def test_volume_layout_errors(tmp_path: Path, tiny_profile: PreprocessProfile) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(InputError, match="'training' list"):
        _module(tmp_path, tiny_profile)
    entry = {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [entry]}))
    with pytest.raises(InputError, match=r"lists \./imagesTr/x\.nii\.gz, which does not exist"):
        _module(tmp_path, tiny_profile)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "imagesTr" / "x.nii.gz").symlink_to(TOTALSEG / "example_ct_sm.nii.gz")
    (tmp_path / "labelsTr" / "x.nii.gz").symlink_to(TOTALSEG / "example_seg_dicom.nii.gz")  # other grid
    with pytest.raises(InputError, match="not on the voxel grid"):
        _module(tmp_path, tiny_profile)


# ------------------------------------------------------------------------------------- preprocess_mask


@pytest.mark.parametrize("profile", [LITEMEDSAM_PROFILE, MEDSAM_PROFILE], ids=["pad", "stretch"])
def test_preprocess_mask_geometry(profile: PreprocessProfile) -> None:
    mask = np.zeros((60, 100), dtype=bool)
    mask[30:60, 50:100] = True  # the bottom-right quarter
    out = preprocess_mask(mask, profile)
    assert out.shape == (1, 1, profile.input_size, profile.input_size) and out.dtype == torch.float32
    h, w = profile.resized_size((60, 100))
    expected = torch.zeros_like(out)
    expected[..., h // 2 : h, w // 2 : w] = 1
    assert torch.equal(out, expected)


def test_compact_image_is_lossless_for_quantising_profiles() -> None:
    rng = np.random.default_rng(1)
    plane = rng.normal(0.4, 0.1, (37, 53)).astype(np.float32)
    stored = compact_image(plane, LITEMEDSAM_PROFILE)
    assert stored.dtype == np.uint8 and stored.shape == plane.shape
    for flip in (lambda a: a, lambda a: a[:, ::-1], lambda a: a[::-1]):
        a, size_a = preprocess(flip(plane), LITEMEDSAM_PROFILE)
        b, size_b = preprocess(flip(stored), LITEMEDSAM_PROFILE)
        assert torch.equal(a, b) and size_a == size_b
    assert compact_image(plane, MEDSAM_PROFILE).dtype == np.float32


def test_read_label_image_colours(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (0, 255, 0)
    rgb[2, 2] = (0, 255, 0)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    labels = read_label_image(tmp_path / "m.png")
    assert labels.shape == (4, 5) and set(np.unique(labels).tolist()) == {0, 1, 2}
    assert labels[1, 1] == labels[2, 2] != labels[0, 0]


# ---------------------------------------------------------------------------------------------- Lightning


class _Probe(lightning.LightningModule):
    """Trains one scalar on the masks; exposes a profile like the real training module."""

    def __init__(self, profile: PreprocessProfile) -> None:
        super().__init__()
        self.profile = profile
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, ...]] = []

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.seen.append(tuple(batch["image"].shape))
        return ((batch["image"].mean() * self.weight - batch["mask"].mean()) ** 2).mean()

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        raise AssertionError("validation must be skipped when no case is held out")

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_takes_the_profile_and_skips_empty_validation(
    tmp_path: Path, tiny_profile: PreprocessProfile
) -> None:
    gts = _blobs((3, 40, 48), np.random.default_rng(0))
    np.savez(tmp_path / "one.npz", imgs=(gts * 100).astype(np.uint8), gts=gts)
    dm = SegmentationDataModule(str(tmp_path), batch_size=2, augment=True)
    module = _Probe(tiny_profile)
    trainer = lightning.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert dm.profile == tiny_profile and module.seen == [(2, 3, 128, 128)] * 2
