"""Find the training cases under a data root: 2D image/mask folders, medical volumes or MedSAM ``.npz`` files.

Layouts, tried in this order (the first that exists decides):

- ``ROOT/dataset.json`` in Medical Segmentation Decathlon style:
  ``{"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]}``, paths relative
  to ROOT; an image may be a DICOM series folder.
- ``ROOT/imagesTr`` + ``ROOT/labelsTr``: volumes paired by name (nnU-Net's ``x_0000.nii.gz`` pairs with
  ``x.nii.gz``).
- ``ROOT/images`` + ``ROOT/labels`` or ``ROOT/masks``: volumes (NIfTI/NRRD/MHA/DICOM folders) or 2D images
  (PNG/JPEG/TIFF/BMP) paired by name, ``images/<stem>.png`` with ``masks/<stem>.png``.
- ``ROOT/*.npz`` with ``imgs`` and ``gts`` (MedSAM's preprocessed files).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from samadapt.domains.images import IMAGE_SUFFIXES, MASK_SUFFIXES
from samadapt.domains.medical.io import READ_SUFFIXES
from samadapt.errors import InputError

__all__ = ["LAYOUTS", "Case", "find_cases"]

#: One line naming every layout, for error messages.
LAYOUTS = (
    "images/ + masks/ (2D), dataset.json, imagesTr/ + labelsTr/ or images/ + labels/ (volumes), "
    "or .npz files with imgs and gts"
)
_CHANNEL = re.compile(r"^(.+)_\d{4}$")  # nnU-Net channel suffix: case_0000


@dataclass(frozen=True)
class Case:
    """One training case: an image (2D file, volume file, DICOM folder or .npz) and its labels.

    Attributes:
        name: case id, unique within a root (used for splits and in sample meta).
        kind: ``"2d"``, ``"volume"`` or ``"npz"``.
        image: image path (for ``npz``, the file holding both arrays).
        label: label/mask path (the same file for ``npz``).
    """

    name: str
    kind: str
    image: Path
    label: Path


def _suffix(path: Path, suffixes: tuple[str, ...]) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(suffixes, key=len, reverse=True) if name.endswith(s)), None)


def _stem(path: Path, suffixes: tuple[str, ...]) -> str:
    suffix = _suffix(path, suffixes)
    return path.name[: -len(suffix)] if suffix else path.name


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _pair(root: Path, images_dir: Path, labels_dir: Path) -> list[Case]:
    """Pair ``images_dir`` with ``labels_dir`` by file name (2D images or volumes, not mixed)."""
    entries = _entries(images_dir)
    volumes = [p for p in entries if p.is_dir() or _suffix(p, READ_SUFFIXES)]
    flats = [p for p in entries if p.is_file() and _suffix(p, IMAGE_SUFFIXES)]
    if volumes and flats:
        raise InputError(f"{images_dir} mixes 2D images and volumes; keep one kind per data root")
    if not volumes and not flats:
        raise InputError(
            f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}) or volumes "
            f"({', '.join(READ_SUFFIXES)}, DICOM folders)"
        )
    kind = "volume" if volumes else "2d"
    image_suffixes = READ_SUFFIXES if volumes else IMAGE_SUFFIXES
    label_suffixes = READ_SUFFIXES if volumes else MASK_SUFFIXES
    labels: dict[str, Path] = {}
    for path in _entries(labels_dir):
        if path.is_file() and _suffix(path, label_suffixes):
            stem = _stem(path, label_suffixes)
            if stem in labels:
                raise InputError(
                    f"{labels_dir} holds two labels for {stem}: {labels[stem].name}, {path.name}"
                )
            labels[stem] = path
    cases: dict[str, Case] = {}
    lonely: list[str] = []
    for path in volumes or flats:
        stem = _stem(path, image_suffixes)
        match = _CHANNEL.match(stem)
        if stem not in labels and match and match.group(1) in labels:
            stem = match.group(1)
        if stem not in labels:
            lonely.append(path.name)
        elif stem in cases:
            raise InputError(
                f"several images pair with {labels[stem].name} ({cases[stem].image.name}, {path.name}); "
                "keep one image per label"
            )
        else:
            cases[stem] = Case(stem, kind, path, labels[stem])
    orphans = sorted(p.name for s, p in labels.items() if s not in cases)
    if lonely or orphans:
        parts = []
        if lonely:
            parts.append(f"{len(lonely)} image(s) without a label in {labels_dir.name}/ ({_names(lonely)})")
        if orphans:
            parts.append(
                f"{len(orphans)} label(s) without an image in {images_dir.name}/ ({_names(orphans)})"
            )
        raise InputError(f"unpaired files in {root}: {'; '.join(parts)}")
    return list(cases.values())


def _msd(root: Path, spec_path: Path) -> list[Case]:
    """Cases listed in an MSD-style ``dataset.json``."""
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {spec_path}: {' '.join(str(exc).split())}") from None
    training = spec.get("training") if isinstance(spec, dict) else None
    if not isinstance(training, list) or not training:
        raise InputError(f"{spec_path} has no non-empty 'training' list of {{image, label}} entries")
    cases: list[Case] = []
    seen: set[str] = set()
    for n, entry in enumerate(training):
        if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)):
            raise InputError(f"{spec_path}: training entry {n} needs 'image' and 'label' paths (strings)")
        if not isinstance(entry.get("label"), str):
            raise InputError(f"{spec_path}: training entry {n} needs 'image' and 'label' paths (strings)")
        image, label = root / entry["image"], root / entry["label"]
        for given, path in ((entry["image"], image), (entry["label"], label)):
            if not path.exists():
                raise InputError(f"{spec_path.name} lists {given}, which does not exist in {root}")
        name = _stem(image, READ_SUFFIXES)
        if name in seen:
            name = f"{name}#{n}"
        seen.add(name)
        cases.append(Case(name, "volume", image, label))
    return cases


def find_cases(root: str | os.PathLike[str]) -> list[Case]:
    """Detect the layout of ``root`` and list its cases (see the module docstring).

    Raises:
        InputError: missing root, no known layout, an empty folder or unpaired files.
    """
    path = Path(root)
    if not path.is_dir():
        raise InputError(f"data root not found or not a folder: {path}")
    if (path / "dataset.json").is_file():
        return _msd(path, path / "dataset.json")
    for images, labels in (("imagesTr", "labelsTr"), ("images", "labels"), ("images", "masks")):
        if (path / images).is_dir() and (path / labels).is_dir():
            return _pair(path, path / images, path / labels)
    npz = sorted(p for p in path.glob("*.npz") if p.is_file() and not p.name.startswith("."))
    if npz:
        return [Case(p.name[: -len(".npz")], "npz", p, p) for p in npz]
    raise InputError(f"no training data found in {path}: expected {LAYOUTS}")
