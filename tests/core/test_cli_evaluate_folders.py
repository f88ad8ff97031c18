"""``samadapt evaluate PRED_DIR GT_DIR``: pairing by name, skipped mismatches, means and the CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samadapt.cli import main
from samadapt.domains.images import read_label_image
from samadapt.domains.medical import Volume, dice, read_volume, write_volume

DATA = Path(__file__).resolve().parents[1] / "data"
SEG = DATA / "totalsegmentator" / "example_seg.nii.gz"
MASKS = DATA / "sam_med2d" / "masks"
LIVER, SPLEEN = 5, 1


def _table(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path, Volume, np.ndarray]:
    """pred/ and truth/ of TotalSegmentator label maps: a, b (other grid), c (.nii vs .nii.gz), d, e alone."""
    truth = read_volume(SEG)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "truth"
    pred_dir.mkdir()
    gt_dir.mkdir()
    worse = truth.array.copy()
    worse[:, :, :10][worse[:, :, :10] == LIVER] = 0  # the liver's lowest slices are missed
    write_volume(gt_dir / "a.nii.gz", truth.array, truth)
    write_volume(pred_dir / "a.nii.gz", truth.array, truth)
    write_volume(gt_dir / "b.nii.gz", truth.array, truth)
    write_volume(pred_dir / "b.nii.gz", truth.array, Volume(truth.array, np.diag([1.0, 1.0, 1.0, 1.0])))
    write_volume(gt_dir / "c.nii.gz", truth.array, truth)
    write_volume(pred_dir / "c.nii", worse, truth)
    write_volume(pred_dir / "d.nii.gz", truth.array, truth)
    write_volume(gt_dir / "e.nrrd", truth.array, truth)
    (pred_dir / "notes.txt").write_text("ignored")
    return pred_dir, gt_dir, truth, worse


def test_folders_pair_by_name_skip_a_mismatch_and_write_the_csv(folders, tmp_path: Path, capsys) -> None:
    pred_dir, gt_dir, truth, worse = folders
    report, summary = tmp_path / "scores.csv", tmp_path / "scores.json"
    labels = ["--labels", str(SPLEEN), str(LIVER)]
    code = main(
        ["evaluate", str(pred_dir), str(gt_dir), *labels, "--csv", str(report), "--json", str(summary)]
    )
    captured = capsys.readouterr()
    assert code == 1  # case b was skipped
    err = captured.err.strip().splitlines()
    assert len(err) == 3, captured.err
    assert any(line.startswith("samadapt evaluate: case b skipped: label grid mismatch") for line in err)
    assert "samadapt evaluate: unpaired prediction d.nii.gz (no ground truth of that name)" in err
    assert "samadapt evaluate: unpaired ground truth e.nrrd (no prediction of that name)" in err
    assert (
        "2 case(s) evaluated, 1 skipped, 1 unpaired prediction(s), 1 unpaired ground truth(s)" in captured.out
    )
    rows = _table(report)
    assert [(r["case"], r["label"]) for r in rows] == [
        ("a", "1"), ("a", "5"), ("c", "1"), ("c", "5"), ("mean", "1"), ("mean", "5"), ("mean", "all"),
    ]  # fmt: skip
    by = {(r["case"], r["label"]): r for r in rows}
    liver_c = dice(worse == LIVER, truth.array == LIVER)
    assert 0.3 < liver_c < 0.99
    assert float(by["a", "5"]["dice"]) == 1.0 and float(by["c", "1"]["dice"]) == 1.0
    assert float(by["c", "5"]["dice"]) == pytest.approx(liver_c)
    assert by["c", "5"]["prediction"].endswith("c.nii") and by["c", "5"]["ground_truth"].endswith("c.nii.gz")
    assert int(by["c", "5"]["gt_voxels"]) == int((truth.array == LIVER).sum())
    assert float(by["mean", "5"]["dice"]) == pytest.approx((1.0 + liver_c) / 2)
    assert float(by["mean", "all"]["dice"]) == pytest.approx((3.0 + liver_c) / 4)
    assert by["mean", "all"]["cases"] == "4" and float(by["mean", "1"]["hd95"]) == 0.0
    report_json = json.loads(summary.read_text())
    assert [c["case"] for c in report_json["cases"]] == ["a", "c"]
    assert report_json["unpaired_ground_truths"] == ["e.nrrd"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".scores")]


def test_two_files_still_evaluate_and_write_the_csv(folders, tmp_path: Path, capsys) -> None:
    pred_dir, gt_dir, truth, worse = folders
    report = tmp_path / "one.csv"
    assert main(["evaluate", str(pred_dir / "c.nii"), str(gt_dir / "c.nii.gz"), "--csv", str(report)]) == 0
    rows = _table(report)
    liver = next(r for r in rows if r["case"] == "" and r["label"] == str(LIVER))
    assert float(liver["dice"]) == pytest.approx(dice(worse == LIVER, truth.array == LIVER))
    assert rows[-1]["case"] == "mean" and rows[-1]["label"] == "all"


def test_ambiguous_names_are_skipped(folders, capsys) -> None:
    pred_dir, gt_dir, truth, _ = folders
    write_volume(pred_dir / "a.nrrd", truth.array, truth)
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--labels", str(LIVER)]) == 1
    assert "case a skipped: ambiguous in" in capsys.readouterr().err


def test_no_pairs_is_an_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    assert main(["evaluate", str(tmp_path / "p"), str(tmp_path / "g")]) == 1
    assert "pairs by name" in capsys.readouterr().err


def test_2d_mask_folders(tmp_path: Path, capsys) -> None:
    """PNG masks pair by name too; 0/255 and 0/1 masks are both label 1; pixels are the unit."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "truth"
    pred_dir.mkdir()
    gt_dir.mkdir()
    liver = read_label_image(MASKS / "amos_0006_90_liver_000.png") > 0
    aorta = read_label_image(MASKS / "amos_0004_75_aorta_000.png") > 0
    shifted = np.roll(liver, 6, axis=1)
    (gt_dir / "amos_0006_90.png").write_bytes((MASKS / "amos_0006_90_liver_000.png").read_bytes())
    Image.fromarray(shifted.astype(np.uint8)).save(pred_dir / "amos_0006_90.png")  # values 0/1
    Image.fromarray(aorta.astype(np.uint8) * 255).save(gt_dir / "amos_0004_75.png")
    Image.fromarray(aorta.astype(np.uint8) * 255).save(pred_dir / "amos_0004_75.tif")  # .tif pairs with .png
    Image.fromarray(aorta[:100].astype(np.uint8) * 255).save(pred_dir / "small.png")
    Image.fromarray(aorta.astype(np.uint8) * 255).save(gt_dir / "small.png")
    report = tmp_path / "r.csv"
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--csv", str(report)]) == 1
    assert "case small skipped: label grid mismatch: prediction 512x100 pixels" in capsys.readouterr().err
    by = {r["case"]: r for r in _table(report) if r["label"] == "1"}
    assert float(by["amos_0004_75"]["dice"]) == 1.0 and float(by["amos_0004_75"]["hd95"]) == 0.0
    assert float(by["amos_0006_90"]["dice"]) == pytest.approx(dice(shifted, liver))
    assert float(by["amos_0006_90"]["hd95"]) == pytest.approx(6.0, abs=0.5)  # a 6-pixel shift
