"""``samadapt segment --prompts``: many cases in one process, on the bundled 2D slices and CT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import write_tiny_checkpoint

from samadapt.cli import main
from samadapt.domains.images import read_label_image
from samadapt.domains.medical import Volume, read_volume, write_volume

DATA = Path(__file__).resolve().parents[1] / "data"
SLICES = DATA / "sam_med2d" / "images"
MASKS = DATA / "sam_med2d" / "masks"
CT = DATA / "totalsegmentator" / "example_ct_sm.nii.gz"
SEG = DATA / "totalsegmentator" / "example_seg.nii.gz"
HEADER = "image,x0,y0,x1,y1,points,slice,axis,label,name\n"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")


def _ct_crop(path: Path, first: int = 21, slices: int = 6) -> Path:
    """A few axial slices of the bundled CT around the liver, geometry kept."""
    ct = read_volume(CT)
    affine = ct.affine.copy()
    affine[:3, 3] = ct.affine[:3, :3] @ [0, 0, first] + ct.affine[:3, 3]
    write_volume(path, ct.array[:, :, first : first + slices], Volume(ct.array[:, :, :slices], affine))
    return path


def _box(mask_name: str) -> str:
    """The tight box of a bundled mask as CSV cells x0,y0,x1,y1."""
    ys, xs = np.nonzero(read_label_image(MASKS / mask_name))
    return f"{xs.min()},{ys.min()},{xs.max()},{ys.max()}"


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count model loads, 2D image embeddings and slices embedded, in this process."""
    import samadapt.checkpoint
    from samadapt.predictor import Predictor

    counts = {"load_model": 0, "set_image": 0, "embedded": 0}
    load, set_image, embed = samadapt.checkpoint.load_model, Predictor.set_image, Predictor.embed

    def counted_load(*args, **kwargs):
        counts["load_model"] += 1
        return load(*args, **kwargs)

    def counted_set_image(self, image):
        counts["set_image"] += 1
        return set_image(self, image)

    def counted_embed(self, images, batch_size=8, **kwargs):
        counts["embedded"] += len(images)
        return embed(self, images, batch_size, **kwargs)

    monkeypatch.setattr(samadapt.checkpoint, "load_model", counted_load)
    monkeypatch.setattr(Predictor, "set_image", counted_set_image)
    monkeypatch.setattr(Predictor, "embed", counted_embed)
    return counts


def test_manifest_run_loads_once_names_outputs_after_inputs_and_skips_bad_cases(
    tmp_path: Path, tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    work = tmp_path / "study"
    work.mkdir()
    ct = _ct_crop(work / "ct_01.nii.gz")
    amos = os.path.relpath(SLICES / "amos_0006_90.png", work)  # relative to the manifest's folder
    manifest = work / "prompts.csv"
    manifest.write_text(
        HEADER
        + f"{amos},{_box('amos_0006_90_liver_000.png')},,,,,\n"
        + "ct_01.nii.gz,44,27,104,81,,3,,5,liver\n"
        + f"{SLICES / 's0619_32.png'},1,1,5000,20,,,,,\n"  # box outside the image: this case fails
        + f"{amos},{_box('amos_0006_90_spleen_000.png')},,,,,\n"
        + "missing.png,1,1,5,5,,,,,\n"  # missing file: this case fails
        + f"{SLICES / 's0114_111.png'},,,,,100 90; 60 60 0,,,,\n"
        + "ct_01.nii.gz,,,,,60 50,3,,2,spleen\n"
    )
    counts = _counting(monkeypatch)
    out = tmp_path / "out"
    args = ["segment", "--prompts", str(manifest), "-o", str(out), "--checkpoint", str(tiny_ckpt)]
    code = main([*args, "--precision", "fp32", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1  # some case failed
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2, captured.err
    assert "case " + str(SLICES / "s0619_32.png") + " failed: box lies outside" in errors[0]
    assert "case missing.png failed: image not found" in errors[1]
    assert "3 of 5 case(s) written to" in captured.out and "2 failed" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["amos_0006_90.png", "ct_01.nii.gz", "s0114_111.png"]
    # the model is loaded once; each image is embedded once, whatever its number of objects
    assert counts["load_model"] == 1
    assert counts["set_image"] == 2  # amos (2 objects) and s0114 (s0619 fails before embedding)
    assert counts["embedded"] <= 2 + 6  # two 2D images, and each CT slice at most once for 2 objects
    amos_labels = read_label_image(out / "amos_0006_90.png")
    assert amos_labels.shape == (512, 512) and set(np.unique(amos_labels)) <= {0, 1, 2}
    assert set(np.unique(read_label_image(out / "s0114_111.png"))) <= {0, 255}  # one object: 0/255
    seg = read_volume(out / "ct_01.nii.gz")
    np.testing.assert_allclose(seg.affine, read_volume(ct).affine, atol=1e-5)
    assert seg.shape == (122, 101, 6) and set(np.unique(seg.array)) <= {0, 2, 5}


def test_json_manifest_gives_the_same_masks_as_single_runs(tmp_path: Path, tiny_ckpt: Path, capsys) -> None:
    box = [int(v) for v in _box("amos_0004_75_liver_000.png").split(",")]
    manifest = tmp_path / "prompts.json"
    entries = [
        {"image": str(SLICES / "amos_0004_75.png"), "box": box},
        {"image": str(SLICES / "amos_0004_75.png"), "points": [[300, 250], [200, 200, 0]], "label": 7},
    ]
    manifest.write_text(json.dumps(entries))
    model = ["--checkpoint", str(tiny_ckpt), "--precision", "fp32"]
    out = tmp_path / "out"
    assert main(["segment", "--prompts", str(manifest), "-o", str(out), "--no-progress", *model]) == 0
    assert "1 of 1 case(s) written" in capsys.readouterr().out
    labels = read_label_image(out / "amos_0004_75.png")
    single = tmp_path / "single.png"
    assert (
        main(
            ["segment", str(SLICES / "amos_0004_75.png"), "--box", *map(str, box), "-o", str(single), *model]
        )
        == 0
    )
    np.testing.assert_array_equal(labels == 1, read_label_image(single) > 0)
    points = tmp_path / "points.png"
    image = str(SLICES / "amos_0004_75.png")
    args = [image, "--point", "300", "250", "--point", "200", "200", "--negative", "-o", str(points)]
    assert main(["segment", *args, *model]) == 0
    np.testing.assert_array_equal(labels == 7, (read_label_image(points) > 0) & (labels != 1))


def test_manifest_volumes_take_the_propagation_flags(tmp_path: Path, tiny_ckpt: Path) -> None:
    """--max-slices and --stop apply to every volume case of a manifest, as to a single run."""
    ct = _ct_crop(tmp_path / "ct.nii.gz")
    manifest = tmp_path / "prompts.csv"
    manifest.write_text(HEADER + f"{ct},44,27,104,81,,2,axial,1,liver\n")
    model = ["--checkpoint", str(tiny_ckpt), "--precision", "fp32", "--no-progress"]
    reached = {}
    for name, flags in (("all", ["--stop", "vanish"]), ("one", ["--stop", "vanish", "--max-slices", "0"])):
        out = tmp_path / name
        assert main(["segment", "--prompts", str(manifest), "-o", str(out), *flags, *model]) == 0
        labels = read_volume(out / "ct.nii.gz").array
        reached[name] = set(np.flatnonzero(labels.any(axis=(0, 1))).tolist())
        single = tmp_path / f"{name}_single.nii.gz"
        args = [str(ct), "--box", "44", "27", "104", "81", "--slice", "2", "-o", str(single), *flags, *model]
        assert main(["segment", *args]) == 0
        np.testing.assert_array_equal(labels > 0, read_volume(single).array > 0)
    assert reached["one"] == {2}  # the prompt slice only
    assert len(reached["all"]) > 1  # the tiny model's mask runs on without the limit


@pytest.mark.parametrize(
    ("manifest", "extra", "message"),
    [
        ("file,x0,y0,x1,y1\na.png,1,2,3,4\n", [], "unknown column(s) 'file'"),
        ("image,x0,y0\na.png,1,2\n", [], "a box needs all four columns"),
        ("x0,y0,x1,y1\n1,2,3,4\n", [], "no 'image' column"),
        (HEADER + "a.png,1,2,3,4,,,,,\n", ["INPUT"], "give either an input"),
        (HEADER + "a.png,1,2,3,4,,,,,\n", ["--box", "1", "2", "3", "4"], "--box does not go with --prompts"),
        (HEADER + "a.png,1,2,3,4,,,,,\n", ["--point", "1", "2"], "--point does not go with --prompts"),
        (HEADER + "a.png,1,2,3,4,,,,,\n", ["--slice", "0"], "--slice does not go with --prompts"),
        (HEADER + "a.png,1,2,3,4,,,,,\n", ["--checkpoint", "broken.pth"], "not found"),
        (HEADER + "a.png,1,2,3,4,,,,,\n", ["--report", "r.json"], "--report does not go with --prompts"),
        (HEADER + "a.png,1,2,3,4,,,,,\n", ["--max-slices", "-1"], "--max-slices must be 0 or more"),
    ],
)
def test_bad_manifest_or_flags_one_line_and_nothing_written(
    tmp_path: Path, manifest: str, extra: list[str], message: str, capsys
) -> None:
    path = tmp_path / "prompts.csv"
    path.write_text(manifest)
    out = tmp_path / "out"
    extra = [str(SLICES / "amos_0004_75.png") if e == "INPUT" else e for e in extra]
    code = main(["segment", *extra, "--prompts", str(path), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_no_input_and_no_manifest(tmp_path: Path, capsys) -> None:
    assert main(["segment", "--box", "1", "2", "3", "4", "-o", str(tmp_path / "m.png")]) == 1
    assert "give an input image or volume, or --prompts" in capsys.readouterr().err


def test_refuses_to_overwrite_an_input(tmp_path: Path, tiny_ckpt: Path, capsys) -> None:
    ct = _ct_crop(tmp_path / "ct.nii.gz")
    manifest = tmp_path / "prompts.csv"
    manifest.write_text(HEADER + "ct.nii.gz,44,27,104,81,,3,,,\n")
    before = ct.read_bytes()
    assert (
        main(["segment", "--prompts", str(manifest), "-o", str(tmp_path), "--checkpoint", str(tiny_ckpt)])
        == 1
    )
    assert "would overwrite the input ct.nii.gz" in capsys.readouterr().err
    assert ct.read_bytes() == before


@pytest.mark.slow
def test_real_weights_manifest_then_folder_evaluate(tmp_path: Path, capsys) -> None:
    """LiteMedSAM on the four bundled slices from one manifest, scored against their manual masks by name."""
    cases = {"amos_0006_90": "liver", "amos_0004_75": "liver", "s0114_111": "aorta", "s0619_32": "colon"}
    truths = tmp_path / "truth"
    truths.mkdir()
    rows = []
    for stem, organ in cases.items():
        mask = MASKS / f"{stem}_{organ}_000.png"
        (truths / f"{stem}.png").write_bytes(mask.read_bytes())
        rows.append(f"{SLICES / (stem + '.png')},{_box(mask.name)},,,,,\n")
    manifest = tmp_path / "prompts.csv"
    manifest.write_text(HEADER + "".join(rows))
    out = tmp_path / "pred"
    assert main(["segment", "--prompts", str(manifest), "-o", str(out), "--no-progress"]) == 0
    report = tmp_path / "scores.csv"
    assert main(["evaluate", str(out), str(truths), "--csv", str(report)]) == 0
    import csv

    with report.open() as handle:
        table = list(csv.DictReader(handle))
    scored = {r["case"]: float(r["dice"]) for r in table if r["case"] != "mean"}
    print(f"LiteMedSAM Dice per slice: {scored}")
    assert set(scored) == set(cases) and min(scored.values()) > 0.85
    overall = next(r for r in table if r["case"] == "mean" and r["label"] == "all")
    assert float(overall["dice"]) == pytest.approx(np.mean(list(scored.values())))
