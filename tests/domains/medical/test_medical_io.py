"""read_volume / write_volume: exact geometry round trips, real DICOM, bad input, atomic writes."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from samadapt.domains.medical import (
    Volume,
    guess_preset,
    io,
    read_volume,
    reorient_like,
    require_3d,
    write_volume,
)
from samadapt.errors import InputError

FORMATS = [".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd"]


def _one_line_input_error(excinfo: pytest.ExceptionInfo[InputError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_keeps_array_and_geometry(
    tmp_path: Path, suffix: str, reference: Volume, label_array: np.ndarray
) -> None:
    out = tmp_path / f"mask{suffix}"
    write_volume(out, label_array, reference)
    back = read_volume(out)
    assert back.shape == reference.shape == label_array.shape
    np.testing.assert_array_equal(back.array, label_array)
    np.testing.assert_allclose(back.affine, reference.affine, rtol=0, atol=1e-6)
    np.testing.assert_allclose(back.spacing, reference.spacing, rtol=0, atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [out.name] + ([out.name[: -len(".mhd")] + ".zraw"] if suffix == ".mhd" else [])
    )


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_written_geometry_matches_an_independent_reader(
    tmp_path: Path, suffix: str, reference: Volume, label_array: np.ndarray
) -> None:
    """SimpleITK reads our files (its own LPS handling) with the reference's LPS geometry and voxel order."""
    out = tmp_path / f"mask{suffix}"
    write_volume(out, label_array, reference)
    img = sitk.ReadImage(str(out))
    spacing, origin, direction = reference.lps_geometry()
    np.testing.assert_allclose(img.GetSpacing(), spacing, atol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), direction, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), label_array)


def test_nifti_keeps_reference_sform_qform_codes(tmp_path: Path, data_dir: Path) -> None:
    ref = read_volume(data_dir / "example_seg.nii.gz")
    assert ref.meta["nifti"]["qform_code"] == 0 and ref.meta["nifti"]["sform_code"] == 2
    out = tmp_path / "copy.nii.gz"
    write_volume(out, ref.array, ref)
    img: Any = nib.load(str(out))
    assert int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) == 2
    np.testing.assert_array_equal(img.affine, ref.affine)  # sform is float32: exact for a NIfTI reference
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), ref.array)


def test_seg_nrrd_has_slicer_segment_names(
    tmp_path: Path, reference: Volume, label_array: np.ndarray
) -> None:
    out = tmp_path / "mask.seg.nrrd"
    write_volume(out, label_array, reference, labels={1: "liver", 2: "spleen", 7: "absent"})
    header = nrrd.read_header(str(out))
    assert header["Segment0_Name"] == "liver" and header["Segment0_LabelValue"] == "1"
    assert header["Segment1_Name"] == "spleen" and header["Segment1_Layer"] == "0"
    assert header["Segment2_Name"] == "Segment_3"  # present but unnamed
    assert header["Segment3_Name"] == "absent" and header["Segment3_Extent"] == "0 -1 0 -1 0 -1"
    ii, jj, kk = np.nonzero(label_array == 1)
    assert header["Segment0_Extent"] == f"{ii.min()} {ii.max()} {jj.min()} {jj.max()} {kk.min()} {kk.max()}"
    assert header["space"] == "left-posterior-superior"
    back = read_volume(out)
    assert back.meta["labels"] == {1: "liver", 2: "spleen", 3: "Segment_3", 7: "absent"}


def test_real_dicom_series_matches_its_nifti_label_map(data_dir: Path) -> None:
    ct = read_volume(data_dir / "example_ct_dicom")
    seg = read_volume(data_dir / "example_seg_dicom.nii.gz")
    assert ct.shape == seg.shape == (512, 512, 20)
    assert ct.meta["modality"] == "CT" and ct.array.dtype == np.int16
    np.testing.assert_allclose(ct.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    # ITK keeps the DICOM row order (j runs posterior); dcm2niix flipped it (j runs anterior).
    flip_j = np.eye(4)
    flip_j[1, 1], flip_j[1, 3] = -1, ct.shape[1] - 1
    np.testing.assert_allclose(ct.affine @ flip_j, seg.affine, rtol=0, atol=1e-4)
    aligned = reorient_like(ct, seg)
    np.testing.assert_allclose(aligned.affine, seg.affine, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(aligned.array, ct.array[:, ::-1, :])
    names = {
        int(k): v
        for k, v in json.loads((data_dir / "class_map_total_and_total_mr.json").read_text())["total"].items()
    }
    assert names[5] == "liver" and names[32] == "vertebrae_T12"
    # On the aligned grid the labels sit on the right tissue: liver ~ soft tissue HU, vertebra ~ bone HU.
    assert 40 < aligned.array[seg.array == 5].mean() < 140
    assert aligned.array[seg.array == 32].mean() > 180
    assert ct.array[seg.array == 5].mean() < 0  # misaligned grid would put the liver label on other tissue
    assert guess_preset(ct) == "ct-soft"


def test_single_dcm_file_reads_as_single_slice(tmp_path: Path) -> None:
    img = sitk.GetImageFromArray(np.arange(6 * 4, dtype=np.int16).reshape(6, 4))  # 2D: [j, i]
    img.SetSpacing((0.5, 0.75))
    path = tmp_path / "slice.dcm"
    sitk.WriteImage(img, str(path))
    vol = read_volume(path)
    assert vol.shape == (4, 6, 1)
    np.testing.assert_array_equal(vol.array[:, :, 0], np.arange(24).reshape(6, 4).T)
    np.testing.assert_allclose(vol.spacing[:2], (0.5, 0.75))
    with pytest.raises(InputError, match="single slice"):
        require_3d(vol)


def test_4d_needs_a_channel(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6 * 3, dtype=np.int16).reshape(4, 5, 6, 3)
    path = tmp_path / "multi.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    assert (
        _one_line_input_error(excinfo) == "volume is 4D (shape (4, 5, 6, 3)); pick a channel with --channel N"
    )
    np.testing.assert_array_equal(read_volume(path, channel=2).array, data[..., 2])
    with pytest.raises(InputError, match=r"channel 3 out of range: volume has 3 channels \(0..2\)"):
        read_volume(path, channel=3)


def test_nan_voxels_are_refused_with_a_count(tmp_path: Path) -> None:
    data = np.zeros((4, 4, 4), dtype=np.float32)
    data[0, 0, 0], data[1, 2, 3], data[3, 3, 3] = np.nan, np.nan, np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    assert "3 NaN/inf voxels" in _one_line_input_error(excinfo)


def test_empty_volume_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.nrrd"
    nrrd.write(str(path), np.zeros((4, 0, 3), dtype=np.uint8), index_order="F")
    with pytest.raises(InputError) as excinfo:
        read_volume(path)
    assert "volume is empty (shape (4, 0, 3))" in _one_line_input_error(excinfo)


def test_missing_corrupt_and_unsupported_files(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(InputError) as excinfo:
        read_volume(tmp_path / "nope.nii.gz")
    assert _one_line_input_error(excinfo).startswith("file not found:")

    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes((data_dir / "example_seg.nii.gz").read_bytes()[:2000])
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header" * 30))
    for bad in (truncated, garbage):
        with pytest.raises(InputError) as excinfo:
            read_volume(bad)
        assert _one_line_input_error(excinfo).startswith(f"cannot read {bad.name}:")

    png = tmp_path / "slice.png"
    png.write_bytes(b"\x89PNG")
    with pytest.raises(InputError) as excinfo:
        read_volume(png)
    assert "unsupported volume format '.png'" in _one_line_input_error(excinfo)

    with pytest.raises(InputError, match="no DICOM series found"):
        read_volume(tmp_path)


def test_write_refuses_bad_requests(tmp_path: Path, reference: Volume, label_array: np.ndarray) -> None:
    with pytest.raises(
        InputError, match=r"array shape \(7, 9, 4\) differs from the reference grid \(7, 9, 5\)"
    ):
        write_volume(tmp_path / "a.nii.gz", label_array[:, :, :4], reference)
    with pytest.raises(InputError, match="unsupported volume format"):
        write_volume(tmp_path / "a.png", label_array, reference)
    with pytest.raises(InputError, match="writing DICOM is not supported"):
        write_volume(tmp_path / "a.dcm", label_array, reference)
    with pytest.raises(InputError, match="output folder does not exist"):
        write_volume(tmp_path / "missing" / "a.nii.gz", label_array, reference)
    shifted = reference.affine.copy()
    shifted[:3, 3] += 0.5
    moved = Volume(label_array, shifted, {})
    with pytest.raises(InputError, match="label grid mismatch"):
        write_volume(tmp_path / "a.nii.gz", moved, reference)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".mhd"])
def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Volume, label_array: np.ndarray, suffix: str
) -> None:
    out = tmp_path / f"mask{suffix}"
    write_volume(out, label_array, reference)  # an older file that must survive the failed write
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_write(path: Path, arr: np.ndarray, ref: Volume) -> None:
        path.write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(io, "_write_nifti", half_write)
    monkeypatch.setattr(io, "_write_itk", half_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_volume(out, label_array + 1, reference)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    np.testing.assert_array_equal(read_volume(out).array, label_array)

    fresh = tmp_path / f"fresh{suffix}"
    with pytest.raises(RuntimeError):
        write_volume(fresh, label_array, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_multi_layer_seg_nrrd_in_ras_space(tmp_path: Path) -> None:
    """A Slicer-style 4D .seg.nrrd (list axis first, overlapping segments in two layers), RAS space."""
    layers = np.zeros((2, 4, 5, 3), dtype=np.uint8)  # [layer, i, j, k] in NRRD (Fortran) order
    layers[0, 1:3, 1:4, 1] = 1
    layers[1, 0:2, 0:2, 0:2] = 1
    header = {
        "space": "right-anterior-superior",
        "space directions": np.array([[np.nan] * 3, [0, 2.0, 0], [1.5, 0, 0], [0, 0, -3.0]]),
        "space origin": np.array([1.0, 2.0, 3.0]),
        "kinds": ["list", "domain", "domain", "domain"],
        "Segment0_Name": "liver",
        "Segment0_LabelValue": "1",
        "Segment0_Layer": "0",
        "Segment1_Name": "tumour",
        "Segment1_LabelValue": "1",
        "Segment1_Layer": "1",
    }
    path = tmp_path / "two_layers.seg.nrrd"
    nrrd.write(str(path), layers, header, index_order="F")
    with pytest.raises(InputError, match=r"volume is 4D \(shape \(4, 5, 3, 2\)\)"):
        read_volume(path)
    vol = read_volume(path, channel=1)
    np.testing.assert_array_equal(vol.array, layers[1])
    assert vol.meta["labels"] == {1: "tumour"}
    expected = np.array([[0, 1.5, 0, 1.0], [2.0, 0, 0, 2.0], [0, 0, -3.0, 3.0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(vol.affine, expected)
    assert read_volume(path, channel=0).meta["labels"] == {1: "liver"}
