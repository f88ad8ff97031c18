"""Score predictions against ground truth: one pair of files, or two folders paired by name.

Files: volumes (every suffix :func:`~samadapt.domains.medical.read_volume` reads) and 2D masks
(PNG/TIFF/BMP/JPEG, read as label maps by :func:`~samadapt.domains.images.read_label_image`; a mask
holding only 0 and 255 is a binary mask, label 1). 2D masks are measured in pixels (spacing 1).

Pairing two folders: a file's *case name* is its name without its volume or image suffix (``ct_01.nii.gz``
-> ``ct_01``, ``slice_7.png`` -> ``slice_7``); a prediction pairs with the ground truth of the same
case name, so ``ct_01.nii`` pairs with ``ct_01.nii.gz`` and ``a.tif`` with ``a.png``. Hidden files,
sub-folders and files with other suffixes are ignored. Two files of one folder with the same case name
(``x.nii`` and ``x.nii.gz``) are ambiguous and skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samadapt.domains.images import IMAGE_SUFFIXES, read_label_image
from samadapt.domains.medical.io import READ_SUFFIXES
from samadapt.errors import InputError

__all__ = ["Pairing", "case_name", "evaluate_pair", "mean_rows", "pair_folders"]


def _suffix(name: str) -> tuple[str, str] | None:
    """(suffix, kind) of a file name: the longest matching volume (``volume``) or image (``2d``) suffix."""
    lower = name.lower()
    known = [(s, "volume") for s in READ_SUFFIXES] + [(s, "2d") for s in IMAGE_SUFFIXES]
    return next((sk for sk in sorted(known, key=lambda sk: -len(sk[0])) if lower.endswith(sk[0])), None)


def case_name(path: Path) -> str | None:
    """The file name without its volume or image suffix; None for other files."""
    found = _suffix(path.name)
    return path.name[: -len(found[0])] if found else None


@dataclass
class Pairing:
    """Two folders' files, paired by case name.

    Attributes:
        pairs: (case name, prediction, ground truth), sorted by case name.
        unpaired_predictions: predictions with no ground truth of their case name.
        unpaired_truths: ground truths with no prediction of their case name.
        ambiguous: (folder, case name, files) where one folder holds several files of one case name.
    """

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)
    unpaired_predictions: list[Path] = field(default_factory=list)
    unpaired_truths: list[Path] = field(default_factory=list)
    ambiguous: list[tuple[Path, str, list[Path]]] = field(default_factory=list)


def _by_case(folder: Path, ambiguous: list[tuple[Path, str, list[Path]]]) -> dict[str, Path]:
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        name = case_name(path)
        if path.name.startswith(".") or not path.is_file() or name is None:
            continue
        groups.setdefault(name, []).append(path)
    for name, paths in groups.items():
        if len(paths) > 1:
            ambiguous.append((folder, name, paths))
    return {name: paths[0] for name, paths in groups.items() if len(paths) == 1}


def pair_folders(predictions: str | os.PathLike[str], truths: str | os.PathLike[str]) -> Pairing:
    """Pair the files of two folders by case name (see the module docstring)."""
    pairing = Pairing()
    pred = _by_case(Path(predictions), pairing.ambiguous)
    gt = _by_case(Path(truths), pairing.ambiguous)
    pairing.pairs = [(name, pred[name], gt[name]) for name in sorted(pred.keys() & gt.keys())]
    pairing.unpaired_predictions = [pred[n] for n in sorted(pred.keys() - gt.keys())]
    pairing.unpaired_truths = [gt[n] for n in sorted(gt.keys() - pred.keys())]
    return pairing


def is_2d(path: str | os.PathLike[str]) -> bool:
    """A 2D mask file (by suffix), as opposed to a volume file or DICOM folder."""
    found = _suffix(Path(path).name)
    return found is not None and found[1] == "2d" and not Path(path).is_dir()


def _read_2d(path: Path) -> np.ndarray:
    array = read_label_image(path)
    values = np.unique(array)
    if values.size and set(values.tolist()) <= {0, 255}:
        array = (array > 0).astype(np.uint8)  # a 0/255 binary mask is label 1
    return array


def evaluate_pair(
    prediction: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    tolerance_mm: float = 2.0,
    labels: list[int] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-label Dice, NSD and HD95 of one prediction against its ground truth.

    Two volumes must share their voxels; a prediction stored in another axis order (a DICOM series
    against the NIfTI dcm2niix wrote from it) is reordered, never resampled. Two 2D masks must have the
    same size.

    Returns:
        (rows as :func:`~samadapt.domains.medical.evaluate_labels` gives them, notes to show the user).

    Raises:
        InputError: unreadable file, a 2D mask against a volume, ``label grid mismatch``, or no label in
            either file.
    """
    from samadapt.domains.medical import evaluate_labels, read_volume, reorient_like
    from samadapt.domains.medical.metrics import evaluate_label_arrays

    notes: list[str] = []
    if is_2d(prediction) != is_2d(truth):
        raise InputError("cannot compare a 2D mask with a volume")
    if is_2d(prediction):
        pred2d, gt2d = _read_2d(Path(prediction)), _read_2d(Path(truth))
        if pred2d.shape != gt2d.shape:
            raise InputError(
                f"label grid mismatch: prediction {pred2d.shape[1]}x{pred2d.shape[0]} pixels, ground truth "
                f"{gt2d.shape[1]}x{gt2d.shape[0]}"
            )
        rows = evaluate_label_arrays(pred2d, gt2d, (1.0, 1.0), tolerance_mm, labels)
    else:
        pred, gt = read_volume(prediction), read_volume(truth)
        if pred.shape != gt.shape or not np.allclose(pred.affine, gt.affine, atol=1e-4):
            try:  # the same voxels stored in another axis order (a DICOM series vs dcm2niix's NIfTI, say)
                pred = reorient_like(pred, gt)
            except InputError:
                raise InputError(
                    f"label grid mismatch: prediction {pred.shape} and ground truth {gt.shape} do not "
                    "share voxels (different shape, spacing, origin or direction); resample one onto the "
                    "other first"
                ) from None
            notes.append("prediction stored in another axis order; compared voxel for voxel after reordering")
        rows = evaluate_labels(pred, gt, tolerance_mm=tolerance_mm, labels=labels)
    if not rows:
        raise InputError("neither file has any nonzero label")
    return rows, notes


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean Dice, NSD and HD95 per label over cases, then over every (case, label) row (label ``all``).

    An infinite HD95 (one mask empty) makes its mean infinite. Each row holds ``cases``: how many rows
    were averaged.
    """
    means = []
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["label"], []).append(row)
    for label, group in [*sorted(groups.items()), ("all", rows)]:
        if not group:
            continue
        names = {r["name"] for r in group}
        means.append(
            {
                "label": label,
                "name": names.pop() if len(names) == 1 and label != "all" else None,
                "dice": float(np.mean([r["dice"] for r in group])),
                "nsd": float(np.mean([r["nsd"] for r in group])),
                "hd95": float(np.mean([r["hd95"] for r in group])),
                "cases": len(group),
            }
        )
    return means
