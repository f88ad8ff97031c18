"""Prompt manifests: many cases (2D images or volumes) and their objects in one CSV or JSON file.

One row (CSV) or entry (JSON) per object; the rows of the same image are one case. Image paths are
relative to the manifest's folder unless absolute.

CSV (a header row, then one row per object; column names are case-insensitive, order is free)::

    image,x0,y0,x1,y1,points,slice,axis,label,name
    ct_001.nii.gz,44,27,104,81,,24,axial,5,liver
    ct_001.nii.gz,11,22,40,50,,24,axial,1,spleen
    slices/amos_0006_90.png,97,188,269,355,,,,,
    slices/amos_0006_90.png,,,,,180 260; 300 300 0,,,,

- ``image`` (required): a 2D image (PNG/JPEG/TIFF/BMP), a volume file or a DICOM folder.
- ``x0, y0, x1, y1``: the box (all four or none), pixel/voxel indexes as on the command line.
- ``points``: ``X Y`` or ``X Y L`` separated by ``;`` (``L``: 1 foreground, the default; 0 background).
  The points go with the box of their own row. A row needs a box, points or both.
- ``slice`` (volumes, required), ``axis`` (volumes; ``axial``, ``coronal`` or ``sagittal``; default: the
  ``--axis`` flag), ``label`` (1..65535; default: the smallest value no other object of the case uses,
  in row order), ``name`` (segment name stored in ``.seg.nrrd`` outputs).

JSON: a list with one object per row, the same keys, a box as ``[x0, y0, x1, y1]`` and points as
``[[x, y], [x, y, label], ...]``::

    [{"image": "ct_001.nii.gz", "box": [44, 27, 104, 81], "slice": 24, "label": 5, "name": "liver"},
     {"image": "slices/amos_0006_90.png", "points": [[180, 260], [300, 300, 0]]}]

A structural problem (unreadable file, no ``image`` column, a box column without the other three,
unknown columns or keys, not a JSON list of objects, two cases writing the same output) raises
:class:`~samadapt.errors.InputError` before any work. A bad value in a row (not a number, a reversed
box, a 2D row with a slice, a volume row without one, a repeated label) fails only its case
(:attr:`ManifestCase.error`); the other cases still run.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samadapt.domains.images import IMAGE_SUFFIXES
from samadapt.domains.medical.io import READ_SUFFIXES
from samadapt.errors import InputError

__all__ = [
    "AXES",
    "COLUMNS",
    "ManifestCase",
    "ObjectPrompt",
    "output_name",
    "read_manifest",
]

#: Every CSV column (and JSON key, with ``box`` for the four box columns).
COLUMNS = ("image", "x0", "y0", "x1", "y1", "points", "slice", "axis", "label", "name")
_BOX = ("x0", "y0", "x1", "y1")
_JSON_KEYS = ("image", "box", "points", "slice", "axis", "label", "name")
AXES = ("axial", "coronal", "sagittal")

Point = tuple[float, float, int]


@dataclass(frozen=True)
class ObjectPrompt:
    """One object of a case: its prompt and, for volumes, where it is drawn.

    Attributes:
        where: ``line N`` (CSV) or ``entry N`` (JSON), for messages.
        box: (x0, y0, x1, y1) or None.
        points: (x, y, label) with label 1 (foreground) or 0 (background).
        slice: slice index (or mm with ``--mm``); volumes only.
        axis: ``axial``, ``coronal`` or ``sagittal``; None: the run's default. Volumes only.
        label: label value written for this object (filled in per case by :func:`read_manifest`).
        name: segment name (stored in ``.seg.nrrd`` outputs), or None.
    """

    where: str
    box: tuple[float, float, float, float] | None = None
    points: tuple[Point, ...] = ()
    slice: float | None = None
    axis: str | None = None
    label: int | None = None
    name: str | None = None


@dataclass
class ManifestCase:
    """All objects of one image.

    Attributes:
        source: the image path as written in the manifest.
        image: that path resolved against the manifest's folder.
        kind: ``2d``, ``volume``, or ``unknown`` (a suffix that is neither; the case fails when run).
        objects: its objects, in manifest order, each with its label value.
        output: the output file name (see :func:`output_name`).
        error: a problem in one of its rows; the case is reported and skipped.
    """

    source: str
    image: Path
    kind: str
    objects: list[ObjectPrompt] = field(default_factory=list)
    output: str = ""
    error: str | None = None


def _suffix(name: str, suffixes: tuple[str, ...]) -> str | None:
    lower = name.lower()
    return next((s for s in sorted(suffixes, key=len, reverse=True) if lower.endswith(s)), None)


def image_kind(path: Path) -> str:
    """``volume`` (a folder or a volume suffix), ``2d`` (an image suffix) or ``unknown``."""
    if path.is_dir() or _suffix(path.name, READ_SUFFIXES):
        return "volume"
    return "2d" if _suffix(path.name, IMAGE_SUFFIXES) else "unknown"


def output_name(image: Path, kind: str) -> str:
    """The output file name of a case, after its input's name.

    2D: ``<stem>.png`` (the input's name with its suffix replaced by ``.png``). Volumes keep their name
    and suffix (``ct.nii.gz`` -> ``ct.nii.gz``, ``ct.nhdr`` -> ``ct.nhdr``), except DICOM (a series
    folder or a ``.dcm`` file), which gives ``<name>.nii.gz``.
    """
    name = image.name
    if kind == "volume":
        suffix = _suffix(name, READ_SUFFIXES)
        if suffix is None or suffix == ".dcm":
            return f"{name[: -len(suffix)] if suffix else name}.nii.gz"
        return name
    suffix = _suffix(name, IMAGE_SUFFIXES)
    return f"{name[: -len(suffix)] if suffix else name}.png"


class _RowError(ValueError):
    """A bad value in one row: fails that row's case only."""


def _number(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _RowError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _RowError(f"{what} must be finite, got {value!r}")
    return number


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _box(values: Any) -> tuple[float, float, float, float] | None:
    if _blank(values):
        return None
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise _RowError(f"box must be four numbers x0, y0, x1, y1, got {values!r}")
    if all(_blank(v) for v in values):
        return None
    if any(_blank(v) for v in values):
        raise _RowError("box needs all four of x0, y0, x1, y1 (or none)")
    x0, y0, x1, y1 = (_number(v, "box") for v in values)
    if x1 <= x0 or y1 <= y0:
        raise _RowError(f"box {[x0, y0, x1, y1]} is reversed or empty: need x0 < x1 and y0 < y1")
    return (x0, y0, x1, y1)


def _point(values: Any) -> Point:
    if not isinstance(values, (list, tuple)) or len(values) not in (2, 3):
        raise _RowError(f"a point is X Y or X Y LABEL, got {values!r}")
    label = 1 if len(values) == 2 else _number(values[2], "point label")
    if label not in (0, 1):
        raise _RowError(f"a point label is 1 (foreground) or 0 (background), got {values[2]!r}")
    return (_number(values[0], "point X"), _number(values[1], "point Y"), int(label))


def _points(value: Any) -> tuple[Point, ...]:
    if _blank(value):
        return ()
    if isinstance(value, str):  # CSV: "X Y; X Y L"
        return tuple(_point(part.split()) for part in value.split(";") if part.strip())
    if not isinstance(value, list):
        raise _RowError(f"points must be a list of [x, y] or [x, y, label], got {value!r}")
    return tuple(_point(p) for p in value)


def _object(where: str, values: dict[str, Any]) -> ObjectPrompt:
    """One object from a row's values (CSV strings or JSON values); raises _RowError on a bad value."""
    box, points = _box(values.get("box")), _points(values.get("points"))
    if box is None and not points:
        raise _RowError("give a box (x0, y0, x1, y1) and/or points")
    slice_value = None if _blank(values.get("slice")) else _number(values.get("slice"), "slice")
    axis = None if _blank(values.get("axis")) else str(values.get("axis")).strip().lower()
    if axis is not None and axis not in AXES:
        raise _RowError(f"axis must be one of {', '.join(AXES)}, got {values.get('axis')!r}")
    label = None
    if not _blank(values.get("label")):
        number = _number(values.get("label"), "label")
        if number != int(number) or not 1 <= number <= 65535:
            raise _RowError(f"label must be a whole number between 1 and 65535, got {values.get('label')!r}")
        label = int(number)
    name = None if _blank(values.get("name")) else str(values.get("name")).strip()
    return ObjectPrompt(where, box, points, slice_value, axis, label, name)


def _csv_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise InputError(
                    f"prompt manifest {path.name} is empty: it needs a header row ({COLUMNS[0]},...)"
                )
            columns = [h.strip().lower() for h in header]
            unknown = [c for c in columns if c not in COLUMNS]
            if unknown:
                raise InputError(
                    f"prompt manifest {path.name}: unknown column(s) {', '.join(repr(c) for c in unknown)}; "
                    f"columns are {', '.join(COLUMNS)}"
                )
            if len(set(columns)) != len(columns):
                raise InputError(f"prompt manifest {path.name}: a column is named twice in the header")
            if "image" not in columns:
                raise InputError(f"prompt manifest {path.name}: the header has no 'image' column")
            has_box = [c in columns for c in _BOX]
            if any(has_box) and not all(has_box):
                raise InputError(f"prompt manifest {path.name}: a box needs all four columns x0, y0, x1, y1")
            if not all(has_box) and "points" not in columns:
                raise InputError(
                    f"prompt manifest {path.name}: the header needs box columns (x0, y0, x1, y1) and/or "
                    "a points column"
                )
            rows = []
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue  # blank line
                where = f"line {reader.line_num}"
                values: dict[str, Any] = dict(zip(columns, cells, strict=False))
                if len(cells) > len(columns):
                    values["error"] = f"{len(cells)} cells for {len(columns)} columns"
                if all(has_box):
                    values["box"] = [values.pop(c, "") for c in _BOX]
                rows.append((where, values))
    except UnicodeDecodeError:
        raise InputError(f"prompt manifest {path.name} is not UTF-8 text") from None
    except csv.Error as exc:
        raise InputError(f"prompt manifest {path.name} is not valid CSV: {exc}") from None
    return rows


def _json_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"prompt manifest {path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise InputError(f"prompt manifest {path.name}: expected a JSON list of objects (one per object)")
    rows = []
    for n, entry in enumerate(data, start=1):
        if not isinstance(entry, dict):
            raise InputError(f"prompt manifest {path.name}: entry {n} is not a JSON object")
        unknown = [k for k in entry if k not in _JSON_KEYS]
        if unknown:
            raise InputError(
                f"prompt manifest {path.name}: entry {n} has unknown key(s) "
                f"{', '.join(repr(k) for k in unknown)}; keys are {', '.join(_JSON_KEYS)}"
            )
        rows.append((f"entry {n}", dict(entry)))
    return rows


def _assign_labels(objects: list[ObjectPrompt]) -> list[ObjectPrompt]:
    """Fill in missing labels (smallest unused values, in order); refuse a label used twice."""
    taken: set[int] = set()
    for obj in objects:
        if obj.label is not None:
            if obj.label in taken:
                raise _RowError(f"{obj.where}: label {obj.label} is used by another object of this image")
            taken.add(obj.label)
    filled, value = [], 1
    for obj in objects:
        if obj.label is None:
            while value in taken:
                value += 1
            taken.add(value)
            obj = ObjectPrompt(obj.where, obj.box, obj.points, obj.slice, obj.axis, value, obj.name)
        filled.append(obj)
    return filled


def _check_kind(case: ManifestCase) -> None:
    for obj in case.objects:
        if case.kind == "2d" and (obj.slice is not None or obj.axis is not None):
            raise _RowError(f"{obj.where}: slice and axis are for volumes; {case.source} is a 2D image")
        if case.kind == "volume" and obj.slice is None:
            raise _RowError(f"{obj.where}: a volume row needs a slice (the index the prompt is drawn on)")


def read_manifest(path: str | os.PathLike[str]) -> list[ManifestCase]:
    """Read a ``.csv`` or ``.json`` prompt manifest into cases (see the module docstring).

    Returns:
        The cases in order of first appearance; a case with a bad row has ``error`` set.

    Raises:
        InputError: missing or unreadable manifest, bad header, unknown columns or keys, not a list of
            objects, no rows, or two cases that would write the same output file.
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise InputError(f"prompt manifest not found: {manifest}")
    suffix = manifest.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise InputError(f"prompt manifest must be a .csv or .json file: {manifest.name}")
    rows = _csv_rows(manifest) if suffix == ".csv" else _json_rows(manifest)
    if not rows:
        raise InputError(f"prompt manifest {manifest.name} has no rows")
    base = manifest.resolve().parent
    cases: dict[str, ManifestCase] = {}
    orphans: list[ManifestCase] = []
    for where, values in rows:
        source = "" if _blank(values.get("image")) else str(values["image"]).strip()
        if not source:
            orphans.append(ManifestCase(where, base, "unknown", error=f"{where}: no image"))
            continue
        image = Path(os.path.normpath(base / Path(source).expanduser()))
        case = cases.get(str(image))
        if case is None:
            kind = image_kind(image)
            case = cases[str(image)] = ManifestCase(source, image, kind, output=output_name(image, kind))
        if case.error:
            continue
        try:
            if "error" in values:
                raise _RowError(values["error"])
            case.objects.append(_object(where, values))
        except _RowError as exc:
            case.error = f"{where}: {exc}"
    for case in cases.values():
        if case.error:
            continue
        try:
            _check_kind(case)
            case.objects = _assign_labels(case.objects)
        except _RowError as exc:
            case.error = str(exc)
    by_output: dict[str, ManifestCase] = {}
    for case in cases.values():
        other = by_output.setdefault(case.output, case)
        if other is not case:
            raise InputError(
                f"prompt manifest {manifest.name}: {other.source} and {case.source} would both write "
                f"{case.output}; give the images distinct names"
            )
    return [*cases.values(), *orphans]
