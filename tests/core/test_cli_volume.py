"""Volume CLI on real data: liver propagation on TotalSegmentator CT, evaluate, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import write_tiny_checkpoint

from samadapt.cli import main
from samadapt.domains.medical import Volume, read_volume, write_volume

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator"
CT = DATA / "example_ct_sm.nii.gz"
SEG = DATA / "example_seg.nii.gz"
LIVER = 5  # class_map_total_and_total_mr.json: "5": "liver"


def _liver_box() -> tuple[int, list[str]]:
    liver = read_volume(SEG).array == LIVER
    k = int(liver.sum(axis=(0, 1)).argmax())
    ii, jj = np.nonzero(liver[:, :, k])
    return k, [str(v) for v in (ii.min(), jj.min(), ii.max(), jj.max())]


@pytest.fixture(scope="module")
def liver_run(cli_liver_run: dict) -> tuple[Path, Path, str]:
    """The session's one CLI liver propagation (tests/conftest.py): (label map, its folder, slice)."""
    assert cli_liver_run["ct"] == CT and cli_liver_run["label"] == LIVER
    return cli_liver_run["out"], cli_liver_run["overlay"].parent, str(cli_liver_run["slice"])


def test_liver_propagates_to_a_3d_mask_with_dice_above_085(liver_run, capsys) -> None:
    out, _, _ = liver_run
    pred, truth = read_volume(out), read_volume(SEG)
    assert pred.shape == truth.shape
    np.testing.assert_array_equal(pred.affine, read_volume(CT).affine)
    liver = truth.array == LIVER
    mask = pred.array == LIVER
    dice = 2 * (mask & liver).sum() / (mask.sum() + liver.sum())
    print(f"liver Dice (LiteMedSAM propagation, ct-soft, bf16/auto): {dice:.4f}")
    assert dice >= 0.85
    assert set(np.unique(pred.array)) == {0, LIVER}


def test_evaluate_prints_dice_nsd_hd95(liver_run, capsys, tmp_path: Path) -> None:
    out, _, _ = liver_run
    report = tmp_path / "report.json"
    assert main(["evaluate", str(out), str(SEG), "--labels", str(LIVER), "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "Dice" in text and "HD95" in text and "NSD@2mm" in text
    import json

    rows = json.loads(report.read_text())
    assert rows[0]["label"] == LIVER and rows[0]["dice"] >= 0.85
    assert 0 < rows[0]["hd95"] < 30


def test_overlay_written(liver_run) -> None:
    _, out_dir, _ = liver_run
    from PIL import Image

    assert Image.open(out_dir / "liver.png").size[0] >= 4 * 101


def _write(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    path = tmp_path / name
    reference = Volume(np.zeros(array.shape[:3]), np.diag([2.0, 2.0, 3.0, 1.0]))
    if array.ndim == 4:
        import nibabel as nib

        nib.save(nib.Nifti1Image(array, reference.affine), str(path))
    else:
        write_volume(path, array, reference)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("4d", "4D"),
        ("nan", "NaN"),
        ("single-slice", "slice"),
        ("slice-outside", "outside the volume"),
        ("box-outside", "outside"),
        ("box-reversed", "reversed"),
        ("no-slice", "--slice"),
        ("bad-output", "must end in"),
        ("missing", "not found"),
    ],
)
def test_volume_bad_input_one_line_no_output(case: str, message: str, tmp_path: Path, capsys) -> None:
    volume = np.random.default_rng(0).normal(0, 100, (20, 20, 6)).astype(np.float32)
    source = _write(tmp_path, "ct.nii.gz", volume)
    out = tmp_path / ("seg.txt" if case == "bad-output" else "seg.nii.gz")
    prompt = ["--box", "2", "2", "10", "10", "--slice", "3"]
    if case == "4d":
        source = _write(tmp_path, "ct4d.nii.gz", np.stack([volume, volume], axis=-1))
    elif case == "nan":
        volume[1, 1, 1] = np.nan
        source = _write(tmp_path, "nan.nii.gz", volume)
    elif case == "single-slice":
        source = _write(tmp_path, "one.nii.gz", volume[:, :, :1])
        prompt = ["--box", "2", "2", "10", "10", "--slice", "0"]
    elif case == "slice-outside":
        prompt = ["--box", "2", "2", "10", "10", "--slice", "6"]
    elif case == "box-outside":
        prompt = ["--box", "2", "2", "25", "10", "--slice", "3"]
    elif case == "box-reversed":
        prompt = ["--box", "10", "2", "2", "10", "--slice", "3"]
    elif case == "no-slice":
        prompt = ["--box", "2", "2", "10", "10"]
    elif case == "missing":
        source = tmp_path / "nope.nii.gz"
    code = main(["segment", str(source), *prompt, "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert message in err, err
    assert len(err.splitlines()) == 1, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".seg")]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight model, saved as a checkpoint (fast stand-in for LiteMedSAM)."""

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")


def _ct_crop(slices: int = 6) -> Volume:
    """The bundled CT cut to a few axial slices around the liver's largest one (geometry kept)."""
    ct = read_volume(CT)
    k, _ = _liver_box()
    first = k - slices // 2
    affine = ct.affine.copy()
    affine[:3, 3] = ct.affine[:3, :3] @ [0, 0, first] + ct.affine[:3, 3]
    return Volume(ct.array[:, :, first : first + slices].copy(), affine)


def test_four_d_volume_output_follows_the_chosen_channel(tmp_path: Path, tiny_ckpt: Path, capsys) -> None:
    """Two different channels (CT, mirrored CT): --channel N segments exactly what channel N alone gives."""
    ct = _ct_crop()
    channels = [ct.array, ct.array[::-1].copy()]
    import nibabel as nib

    four_d = tmp_path / "ct4d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack(channels, axis=-1), ct.affine), str(four_d))
    prompt = ["--box", "44", "27", "104", "81", "--slice", "3", "--window", "40", "400", "--no-progress"]
    model = ["--checkpoint", str(tiny_ckpt), "--precision", "fp32"]
    results = []
    for n, array in enumerate(channels):
        alone = tmp_path / f"channel{n}.nii.gz"
        write_volume(alone, array, ct)
        from_4d, from_3d = tmp_path / f"seg4d_{n}.nrrd", tmp_path / f"seg3d_{n}.nrrd"
        assert main(["segment", str(four_d), "--channel", str(n), *prompt, *model, "-o", str(from_4d)]) == 0
        assert main(["segment", str(alone), *prompt, *model, "-o", str(from_3d)]) == 0
        result = read_volume(from_4d)
        assert result.shape == ct.shape
        np.testing.assert_allclose(result.affine, ct.affine, atol=1e-4)
        np.testing.assert_array_equal(result.array, read_volume(from_3d).array)
        results.append(result.array)
    assert not np.array_equal(results[0], results[1])  # the channels differ, and so do their masks
    assert main(["segment", str(four_d), *prompt, *model, "-o", str(tmp_path / "x.nrrd")]) == 1
    assert "pick a channel with --channel N" in capsys.readouterr().err


def test_nhdr_with_a_detached_header_segments_as_a_volume(tmp_path: Path, tiny_ckpt: Path, capsys) -> None:
    """A .nhdr + raw data pair (written by pynrrd from the bundled CT) goes down the volume path."""
    import nrrd

    from samadapt.domains.medical import lps_from_affine

    ct = _ct_crop()
    spacing, origin, direction = lps_from_affine(ct.affine)
    header = {
        "space": "left-posterior-superior",
        "space directions": (direction @ np.diag(spacing)).T,
        "space origin": origin,
        "kinds": ["domain", "domain", "domain"],
        "encoding": "raw",
    }
    source = tmp_path / "ct.nhdr"
    nrrd.write(str(source), ct.array, header, detached_header=True, index_order="F")
    assert "data file:" in source.read_text() and len(list(tmp_path.iterdir())) == 2
    read = read_volume(source)
    np.testing.assert_array_equal(read.array, ct.array)
    np.testing.assert_allclose(read.affine, ct.affine, atol=1e-4)
    out = tmp_path / "seg.nii.gz"
    args = ["segment", str(source), "--box", "44", "27", "104", "81", "--slice", "3", "-o", str(out)]
    assert main([*args, "--checkpoint", str(tiny_ckpt), "--precision", "fp32", "--no-progress"]) == 0
    assert "object(s) from axial slice 3" in capsys.readouterr().out
    seg = read_volume(out)
    assert seg.shape == ct.shape
    np.testing.assert_allclose(seg.affine, ct.affine, atol=1e-4)


def test_volume_coordinates_run_to_the_last_voxel_index(tmp_path: Path, tiny_ckpt: Path, capsys) -> None:
    """On a 20x20 axial slice, X and Y run 0..19 (as in 2D): 19 is a valid corner, 20 is outside."""
    source = _write(tmp_path, "ct.nii.gz", np.random.default_rng(0).normal(0, 100, (20, 20, 4)))
    model = ["--checkpoint", str(tiny_ckpt), "--precision", "fp32", "--no-progress", "--slice", "1"]
    inside, outside = tmp_path / "inside.nii.gz", tmp_path / "outside.nii.gz"
    assert main(["segment", str(source), "--box", "0", "0", "19", "19", *model, "-o", str(inside)]) == 0
    assert main(["segment", str(source), "--point", "19", "19", *model, "-o", str(inside)]) == 0
    assert main(["segment", str(source), "--box", "0", "0", "20", "19", *model, "-o", str(outside)]) == 1
    assert "(voxel indexes X 0..19, Y 0..19)" in capsys.readouterr().err
    assert not outside.exists()


def test_volume_points_go_with_the_box_before_them(
    tmp_path: Path, tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from samadapt.domains.medical.propagation import VolumeSegmenter

    prompts = []
    original = VolumeSegmenter.segment

    def spy(self, prompt, roi=None):
        prompts.append(prompt)
        return original(self, prompt, roi)

    monkeypatch.setattr(VolumeSegmenter, "segment", spy)
    source = _write(tmp_path, "ct.nii.gz", np.random.default_rng(0).normal(0, 100, (20, 20, 4)))
    code = main(
        ["segment", str(source), "--box", "1", "1", "8", "8", "--box", "10", "10", "18", "18",
         "--point", "14", "14", "--point", "12", "16", "--negative", "--slice", "1",
         "--checkpoint", str(tiny_ckpt), "--no-progress", "-o", str(tmp_path / "seg.nii.gz")]
    )  # fmt: skip
    assert code == 0
    assert "(points per box: box 1: 0, box 2: 2)" in capsys.readouterr().out
    assert [p.points for p in prompts] == [[], [(14.0, 14.0, 1), (12.0, 16.0, 0)]]


def test_evaluate_refuses_grid_mismatch(tmp_path: Path, capsys) -> None:
    a = _write(tmp_path, "a.nii.gz", np.ones((8, 8, 4), np.uint8))
    path = tmp_path / "b.nii.gz"
    write_volume(
        path, np.ones((8, 8, 4), np.uint8), Volume(np.zeros((8, 8, 4)), np.diag([1.0, 1.0, 1.0, 1.0]))
    )
    assert main(["evaluate", str(a), str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "grid mismatch" in err and len(err.splitlines()) == 1


def test_evaluate_accepts_the_same_grid_in_another_axis_order(tmp_path: Path, capsys) -> None:
    """A label map stored with j flipped (as dcm2niix does for DICOM) still compares voxel for voxel."""
    truth = read_volume(SEG)
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, truth.shape[1] - 1
    flipped = Volume(truth.array[:, ::-1, :].copy(), truth.affine @ flip)
    path = tmp_path / "flipped.nii.gz"
    write_volume(path, flipped.array, flipped)
    report = tmp_path / "r.json"
    assert main(["evaluate", str(path), str(SEG), "--labels", str(LIVER), "1", "--json", str(report)]) == 0
    import json

    rows = json.loads(report.read_text())
    assert [r["dice"] for r in rows] == [1.0, 1.0]
    assert "another axis order" in capsys.readouterr().out


def test_dicom_series_segments_and_evaluates_against_its_nifti_label_map(tmp_path: Path, capsys) -> None:
    """A real JPEG2000 DICOM series in, NIfTI out on the series' grid, scored against dcm2niix's labels."""
    out = tmp_path / "dicom_liver.nii.gz"
    series = DATA / "example_ct_dicom"
    code = main(
        ["segment", str(series), "--box", "107", "199", "278", "374", "--slice", "16", "--label", str(LIVER),
         "-o", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    written, source = read_volume(out), read_volume(series)
    assert written.shape == source.shape == (512, 512, 20)
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    report = tmp_path / "r.json"
    assert (
        main(
            [
                "evaluate",
                str(out),
                str(DATA / "example_seg_dicom.nii.gz"),
                "--labels",
                "5",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    import json

    dice = json.loads(report.read_text())[0]["dice"]
    print(f"DICOM liver Dice: {dice:.4f}")
    assert dice >= 0.9


def test_named_segments_in_seg_nrrd(tmp_path: Path, capsys) -> None:
    volume = np.zeros((24, 24, 5), np.float32)
    volume[6:18, 6:18, :] = 200.0
    source = _write(tmp_path, "ct.nii.gz", volume)
    out = tmp_path / "seg.seg.nrrd"
    args = ["segment", str(source), "--box", "5", "5", "18", "18", "--slice", "2", "--window", "100", "400"]
    assert main([*args, "--label", "5", "--name", "liver", "-o", str(out), "--no-progress"]) == 0
    assert read_volume(out).meta["labels"] == {5: "liver"}
    bad = tmp_path / "bad.seg.nrrd"
    assert main([*args, "--name", "a", "--name", "b", "-o", str(bad), "--no-progress"]) == 1
    assert "one --name per object" in capsys.readouterr().err and not bad.exists()
