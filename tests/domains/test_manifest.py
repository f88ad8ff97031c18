"""Prompt manifests: CSV and JSON rows to cases, labels, output names, row errors and up-front errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from samadapt.domains.manifest import output_name, read_manifest
from samadapt.errors import InputError

HEADER = "image,x0,y0,x1,y1,points,slice,axis,label,name\n"


def _csv(tmp_path: Path, text: str, name: str = "m.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_rows_of_one_image_are_one_case_with_relative_paths_and_labels(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    manifest = _csv(
        tmp_path,
        HEADER
        + "imgs/a.png,1,2,30,40,,,,,\n"
        + "ct.nii.gz,4,5,20,21,,7,coronal,5,liver\n"
        + "imgs/a.png,,,,,10 12; 14 15 0,,,,\n"
        + "ct.nii.gz,,,,,3 3,7,,,\n"
        + "\n",
    )
    a, ct = read_manifest(manifest)
    assert a.image == tmp_path / "imgs" / "a.png" and a.kind == "2d" and a.output == "a.png"
    assert [o.box for o in a.objects] == [(1.0, 2.0, 30.0, 40.0), None]
    assert a.objects[1].points == ((10.0, 12.0, 1), (14.0, 15.0, 0))
    assert [o.label for o in a.objects] == [1, 2] and a.error is None
    assert ct.kind == "volume" and ct.output == "ct.nii.gz"
    assert [(o.label, o.name, o.axis, o.slice) for o in ct.objects] == [
        (5, "liver", "coronal", 7.0),
        (1, None, None, 7.0),
    ]


def test_json_manifest_gives_the_same_cases(tmp_path: Path) -> None:
    entries = [
        {"image": "a.png", "box": [1, 2, 30, 40]},
        {
            "image": "ct.nii.gz",
            "box": [4, 5, 20, 21],
            "slice": 7,
            "axis": "coronal",
            "label": 5,
            "name": "liver",
        },
        {"image": "a.png", "points": [[10, 12], [14, 15, 0]]},
    ]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(entries))
    a, ct = read_manifest(path)
    assert [o.label for o in a.objects] == [1, 2]
    assert a.objects[1].points == ((10.0, 12.0, 1), (14.0, 15.0, 0))
    assert ct.objects[0].box == (4.0, 5.0, 20.0, 21.0) and ct.objects[0].where == "entry 2"


def test_unlabelled_objects_take_the_smallest_free_values(tmp_path: Path) -> None:
    manifest = _csv(
        tmp_path, "image,x0,y0,x1,y1,label\n" + "".join(f"a.png,1,1,5,5,{v}\n" for v in ("", 1, "", 3))
    )
    (case,) = read_manifest(manifest)
    assert [o.label for o in case.objects] == [2, 1, 4, 3]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("a.png,1,2,x,4,,,,,\n", "line 2: box must be a number"),
        ("a.png,5,2,1,4,,,,,\n", "line 2: box [5.0, 2.0, 1.0, 4.0] is reversed or empty"),
        ("a.png,1,2,,,,,,,\n", "box needs all four"),
        ("a.png,,,,,,,,,\n", "give a box"),
        ("a.png,,,,,1 2 3,,,,\n", "a point label is 1 (foreground) or 0 (background)"),
        ("a.png,1,2,3,4,,5,,,\n", "slice and axis are for volumes"),
        ("ct.nrrd,1,2,3,4,,,,,\n", "a volume row needs a slice"),
        ("ct.nrrd,1,2,3,4,,2,oblique,,\n", "axis must be one of axial, coronal, sagittal"),
        ("a.png,1,2,3,4,,,,0,\n", "label must be a whole number between 1 and 65535"),
        ("a.png,1,2,3,4,,,,2,\na.png,1,2,3,4,,,,2,\n", "line 3: label 2 is used by another object"),
        ("a.png,1,2,3,4,,,,,,,,\n", "13 cells for 10 columns"),
    ],
)
def test_a_bad_row_fails_its_case_only(tmp_path: Path, rows: str, message: str) -> None:
    manifest = _csv(tmp_path, HEADER + rows + "good.png,1,2,3,4,,,,,\n")
    *bad, good = read_manifest(manifest)
    assert message in (bad[0].error or ""), bad[0].error
    assert good.error is None and good.objects[0].box == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        ("file,x0,y0,x1,y1\na.png,1,2,3,4\n", "m.csv", "unknown column(s) 'file'"),
        ("x0,y0,x1,y1\n1,2,3,4\n", "m.csv", "the header has no 'image' column"),
        ("image,x0,y0\na.png,1,2\n", "m.csv", "a box needs all four columns x0, y0, x1, y1"),
        ("image,label\na.png,1\n", "m.csv", "needs box columns (x0, y0, x1, y1) and/or a points column"),
        ("image,x0,y0,x1,y1\n", "m.csv", "has no rows"),
        ("", "m.csv", "is empty"),
        ("image,image,x0,y0,x1,y1\n", "m.csv", "named twice"),
        ('{"image": "a.png"}', "m.json", "expected a JSON list of objects"),
        ('[{"image": "a.png", "bbox": [1, 2, 3, 4]}]', "m.json", "entry 1 has unknown key(s) 'bbox'"),
        ("[1, 2", "m.json", "is not valid JSON"),
        ("image,x0,y0,x1,y1\na/x.png,1,2,3,4\nb/x.png,1,2,3,4\n", "m.csv", "would both write x.png"),
        ("image,x0,y0,x1,y1\nx.png,1,2,3,4\nx.jpg,1,2,3,4\n", "m.csv", "would both write x.png"),
        ("", "m.txt", "must be a .csv or .json file"),
    ],
)
def test_structural_problems_raise_before_any_work(
    tmp_path: Path, text: str, name: str, message: str
) -> None:
    with pytest.raises(InputError) as info:
        read_manifest(_csv(tmp_path, text, name))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_manifest() -> None:
    with pytest.raises(InputError, match="prompt manifest not found"):
        read_manifest("nope.csv")


def test_output_names_follow_the_inputs(tmp_path: Path) -> None:
    series = tmp_path / "series_01"
    series.mkdir()
    assert output_name(Path("x/slice.tif"), "2d") == "slice.png"
    assert output_name(Path("ct.nii.gz"), "volume") == "ct.nii.gz"
    assert output_name(Path("ct.NHDR"), "volume") == "ct.NHDR"
    assert output_name(Path("seg.seg.nrrd"), "volume") == "seg.seg.nrrd"
    assert output_name(Path("one.dcm"), "volume") == "one.nii.gz"
    assert output_name(series, "volume") == "series_01.nii.gz"
