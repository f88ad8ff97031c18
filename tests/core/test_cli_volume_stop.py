"""``samadapt segment VOLUME`` stop flags: --stop, --max-slices, --verbose, --report (and their errors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import write_tiny_checkpoint

from samadapt.cli import main
from samadapt.domains.medical import Volume, read_volume, write_volume
from samadapt.domains.medical.stopping import SIGNALS

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator"
KIDNEY_RIGHT = 2  # class_map_total_and_total_mr.json, task "total"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight model, saved as a checkpoint (fast stand-in for LiteMedSAM)."""

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    path = tmp_path / "ct.nii.gz"
    array = np.random.default_rng(0).normal(0, 100, (20, 20, 8)).astype(np.float32)
    write_volume(path, array, Volume(np.zeros(array.shape), np.diag([2.0, 2.0, 3.0, 1.0])))
    return path


def _segment_args(volume: Path, checkpoint: Path) -> list[str]:
    """``samadapt segment`` with a box on slice 4 of the test volume and the tiny checkpoint."""
    return [
        "segment",
        str(volume),
        "--box",
        "2",
        "2",
        "15",
        "15",
        "--slice",
        "4",
        "--checkpoint",
        str(checkpoint),
    ]


def test_stop_flags_write_the_report_and_print_the_table(
    tmp_path: Path, volume: Path, tiny_ckpt, capsys
) -> None:
    report = tmp_path / "signals.json"
    out = tmp_path / "seg.nii.gz"
    args = _segment_args(volume, tiny_ckpt)
    args += ["--precision", "fp32", "--no-progress", "-o", str(out), "--stop", "vanish", "--max-slices", "1"]
    assert main([*args, "--verbose", "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    document = json.loads(report.read_text())
    assert document["stop"] == "vanish" and document["max_slices"] == 1
    (obj,) = document["objects"]
    assert obj["label"] == 1 and obj["prompt_slice"] == 4 and obj["rule"]["mode"] == "vanish"
    assert obj["slices"][0]["slice_index"] == 4 and obj["slices"][0]["direction"] == 0
    assert all(set(SIGNALS) <= set(row) for row in obj["slices"])
    assert len(obj["slices"]) <= 3  # the prompted slice and at most one more each way
    assert set(obj["ends"]) <= {"+1", "-1"}
    reached = np.flatnonzero(read_volume(out).array.any(axis=(0, 1)))
    assert reached.size == 0 or (reached.min() >= 3 and reached.max() <= 5)
    assert "iou_prev" in printed and "kept" in printed and "label 1: " in printed and "(ended " in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-slices", "-1"], "--max-slices must be 0 or more"),
        (["--max-slices", "two"], "invalid int value"),
        (["--stop", "never"], "invalid choice"),
        (["--report", "signals.txt"], "--report must end in .json"),
        (["--report", "missing/signals.json"], "--report folder does not exist"),
    ],
)
def test_bad_stop_flags_one_line_no_output(
    extra: list[str], message: str, tmp_path: Path, volume: Path, tiny_ckpt, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "seg.nii.gz"
    args = _segment_args(volume, tiny_ckpt)
    try:
        code = main([*args, "--no-progress", "-o", str(out), *extra])
    except SystemExit as exc:  # argparse refuses a malformed value before the command runs
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err, err
    assert len(err.splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob("*.json"))


@pytest.mark.slow
def test_real_kidney_stops_at_its_end_by_default(tmp_path: Path, capsys) -> None:
    labels = read_volume(DATA / "example_seg.nii.gz").array
    kidney = labels == KIDNEY_RIGHT  # slices 0..18 of 0..29
    k = int(kidney.sum(axis=(0, 1)).argmax())
    ii, jj = np.nonzero(kidney[:, :, k])
    out, report = tmp_path / "kidney.nii.gz", tmp_path / "kidney.json"
    box = [str(v) for v in (ii.min(), jj.min(), ii.max(), jj.max())]
    code = main(
        ["segment", str(DATA / "example_ct_sm.nii.gz"), "--box", *box, "--slice", str(k),
         "--precision", "fp32", "--label", str(KIDNEY_RIGHT), "--name", "kidney_right", "-o", str(out),
         "--report", str(report), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    reached = np.flatnonzero(read_volume(out).array.any(axis=(0, 1)))
    assert 16 <= reached.max() <= 20, reached
    (obj,) = json.loads(report.read_text())["objects"]
    assert obj["name"] == "kidney_right" and obj["rule"]["mode"] == "auto"
    assert obj["kept_slices"] == [int(reached.min()), int(reached.max())]
    assert [r["slice_index"] for r in obj["slices"] if not r["kept"]] and obj["ends"]["+1"] != "vanished"
    assert f"slices {reached.min()}..{reached.max()} (ended +1: " in capsys.readouterr().out
