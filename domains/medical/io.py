"""Read and write medical volumes with their exact geometry.

Formats: NIfTI (``.nii``, ``.nii.gz``; nibabel), NRRD (``.nrrd``, ``.nhdr``) and 3D Slicer segmentations
(``.seg.nrrd``; pynrrd), MetaImage (``.mha``, ``.mhd``; SimpleITK) and DICOM (a folder holding one series,
or a single ``.dcm`` file; SimpleITK/GDCM, which decodes JPEG2000; read only).

Geometry is kept exactly: voxel order is never changed (no reorientation to canonical), and a written file
carries the reference volume's affine (oblique and non-RAS orientations included). Arrays from ITK are
``[k, j, i]`` and are transposed to the ``[i, j, k]`` order of :class:`Volume`; ITK's LPS geometry is
converted to the RAS affine with :func:`affine_from_lps`.

Every error a user can cause (missing or corrupt file, unsupported format, 4D volume without a channel,
NaN voxels, empty volume, wrong array shape) is raised as :class:`~samadapt.errors.InputError` with a
one-line message.
"""

from __future__ import annotations

import colorsys
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from samadapt._optional import optional_import
from samadapt.domains.medical.volume import LPS_TO_RAS, Volume, affine_from_lps
from samadapt.errors import InputError, SamadaptError

__all__ = ["READ_SUFFIXES", "WRITE_SUFFIXES", "read_volume", "write_volume"]

# Longest suffixes first: ".seg.nrrd" must win over ".nrrd".
_SUFFIX_KIND: tuple[tuple[str, str], ...] = (
    (".seg.nrrd", "seg-nrrd"),
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".nrrd", "nrrd"),
    (".nhdr", "nrrd"),
    (".mha", "itk"),
    (".mhd", "itk"),
    (".dcm", "dicom"),
)
#: File name endings read_volume accepts (plus a folder holding one DICOM series).
READ_SUFFIXES: tuple[str, ...] = tuple(s for s, _ in _SUFFIX_KIND)
#: File name endings write_volume accepts.
WRITE_SUFFIXES: tuple[str, ...] = tuple(s for s, k in _SUFFIX_KIND if k != "dicom")

# NIfTI qform/sform codes written when the reference did not come from a NIfTI file: 1 = scanner anatomical.
_DEFAULT_NIFTI_CODES = (1, 1)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _kind_of(path: Path, *, write: bool) -> str:
    if not write and path.is_dir():
        return "dicom-series"
    name = path.name.lower()
    for suffix, kind in _SUFFIX_KIND:
        if name.endswith(suffix):
            if write and kind == "dicom":
                raise InputError(f"writing DICOM is not supported ({path.name}); use one of {WRITE_SUFFIXES}")
            return kind
    allowed = WRITE_SUFFIXES if write else (*READ_SUFFIXES, "a DICOM folder")
    suffix = "".join(path.suffixes) or "(none)"
    raise InputError(f"unsupported volume format '{suffix}' for {path.name}; supported: {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------------- reading


def read_volume(path: str | os.PathLike[str], channel: int | None = None) -> Volume:
    """Read a 3D volume, keeping its voxel order and geometry.

    A 2D image or single DICOM file becomes a single-slice volume of shape (I, J, 1) (see
    :func:`~samadapt.domains.medical.volume.require_3d`). A 4D volume (time series, multi-channel or a
    multi-layer ``.seg.nrrd``) needs ``channel``; a 4D volume with one channel is read as 3D.

    Args:
        path: file, or folder holding one DICOM series.
        channel: index along the 4th axis of a 4D volume.

    Returns:
        The Volume; ``meta`` holds ``path`` and ``format``, NIfTI ``qform``/``sform`` codes under ``nifti``,
        the DICOM ``modality`` when known, and segment names under ``labels`` (``{value: name}``) for
        ``.seg.nrrd`` files.

    Raises:
        InputError: missing, unreadable or corrupt file; unsupported format; 4D without ``channel``;
            ``channel`` out of range; empty volume; NaN or infinite voxels.
        MissingDependencyError: the reader's package is not installed.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"file not found: {p}")
    kind = _kind_of(p, write=False)
    try:
        if kind == "nifti":
            arr, affine, meta = _read_nifti(p)
        elif kind in ("nrrd", "seg-nrrd"):
            arr, affine, meta = _read_nrrd(p)
        elif kind == "dicom-series":
            arr, affine, meta = _read_dicom_series(p)
        else:
            arr, affine, meta = _read_itk(p)
    except SamadaptError:
        raise
    except Exception as exc:  # any reader failure on a bad file is the user's file, not our bug
        raise InputError(f"cannot read {p.name}: {_one_line(exc)}") from exc
    meta = {"path": str(p), "format": kind, **meta}
    arr = _select_channel(arr, channel, p)
    segments = meta.pop("segments", None)
    if segments is not None:
        layer = channel or 0
        meta["labels"] = {s["value"]: s["name"] for s in segments if s["layer"] == layer}
    return Volume(arr, affine, meta)


def _select_channel(arr: np.ndarray, channel: int | None, path: Path) -> np.ndarray:
    """Normalise to 3D (I, J, K): add a slice axis to 2D, pick ``channel`` from 4D, check values."""
    if 0 in arr.shape:
        raise InputError(f"volume is empty (shape {tuple(arr.shape)}): {path.name}")
    if arr.ndim == 5 and arr.shape[3] == 1:  # NIfTI vector images are (I, J, K, 1, C)
        arr = arr[:, :, :, 0, :]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim == 4 and arr.shape[3] == 1 and channel in (None, 0):
        arr = arr[..., 0]
    if arr.ndim == 4:
        n = arr.shape[3]
        if channel is None:
            raise InputError(f"volume is 4D (shape {tuple(arr.shape)}); pick a channel with --channel N")
        if not 0 <= channel < n:
            raise InputError(f"channel {channel} out of range: volume has {n} channels (0..{n - 1})")
        arr = arr[..., channel]
    elif arr.ndim == 3:
        if channel not in (None, 0):
            raise InputError(f"channel {channel} out of range: volume is 3D (one channel, 0)")
    else:
        raise InputError(f"volume has {arr.ndim} dimensions (shape {tuple(arr.shape)}); expected 3 or 4")
    if arr.dtype.kind in "fc":
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise InputError(
                f"volume has {bad} NaN/inf voxels ({path.name}); fix or mask them in the file first"
            )
    return arr


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    nib = optional_import("nibabel", extra="medical")
    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    header = img.header
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    info = {
        "qform_code": int(qcode or 0),
        "sform_code": int(scode or 0),
        "qform": None if qform is None else np.array(qform),
        "sform": None if sform is None else np.array(sform),
    }
    return arr, np.array(img.affine, dtype=np.float64), {"nifti": info}


_NRRD_SPACES = {  # NRRD space -> matrix taking that space to RAS
    "right-anterior-superior": np.eye(3),
    "ras": np.eye(3),
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0]),
    "las": np.diag([-1.0, 1.0, 1.0]),
    "left-posterior-superior": LPS_TO_RAS,
    "lps": LPS_TO_RAS,
}


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    nrrd = optional_import("nrrd", extra="medical")
    data, hdr = nrrd.read(str(path), index_order="F")  # F order: data[i, j, k] as in the file
    ndim = data.ndim
    dirs = hdr.get("space directions")
    if dirs is not None:
        dirs = np.asarray(dirs, dtype=np.float64)
        spatial = [ax for ax in range(ndim) if np.all(np.isfinite(dirs[ax]))]
    else:
        kinds = [str(k).lower() for k in hdr.get("kinds", ["domain"] * ndim)]
        spatial = [ax for ax in range(ndim) if kinds[ax] in ("domain", "space")]
    if len(spatial) not in (2, 3) or ndim - len(spatial) > 1:
        raise InputError(f"unsupported NRRD layout in {path.name}: sizes {list(data.shape)}")
    other = [ax for ax in range(ndim) if ax not in spatial]
    data = np.moveaxis(data, other, list(range(len(spatial), ndim)))  # channels last
    if len(spatial) == 2:
        data = np.expand_dims(data, 2)
    m = np.eye(3)
    if dirs is not None:
        vecs = dirs[spatial]  # one row per spatial axis
        if vecs.shape[1] != 3:
            raise InputError(f"NRRD {path.name} has a {vecs.shape[1]}D space; expected 3D")
        m[:, : len(spatial)] = vecs.T
    else:
        spacings = np.asarray(hdr.get("spacings", [1.0] * ndim), dtype=np.float64)[spatial]
        m[:, : len(spatial)] = np.diag(np.where(np.isfinite(spacings), spacings, 1.0))[:, : len(spatial)]
    # ITK's rule: a space that is neither RAS nor LAS is read as LPS.
    to_ras = _NRRD_SPACES.get(str(hdr.get("space", "lps")).lower(), LPS_TO_RAS)
    origin = np.asarray(hdr.get("space origin", np.zeros(3)), dtype=np.float64).reshape(-1)
    if origin.size != 3 or not np.all(np.isfinite(origin)):
        origin = np.zeros(3)
    affine = np.eye(4)
    affine[:3, :3] = to_ras @ m
    affine[:3, 3] = to_ras @ origin
    return data, affine, {"segments": _parse_segments(hdr)}


def _parse_segments(hdr: dict[str, Any]) -> list[dict[str, Any]]:
    """Slicer segment descriptions (``Segment<N>_Name`` / ``_LabelValue`` / ``_Layer``) from a header."""
    segments = []
    for key, name in hdr.items():
        match = re.fullmatch(r"Segment(\d+)_Name", str(key))
        if match is None:
            continue
        n = match.group(1)
        try:
            value = int(str(hdr.get(f"Segment{n}_LabelValue", int(n) + 1)).strip())
            layer = int(str(hdr.get(f"Segment{n}_Layer", 0)).strip())
        except ValueError:
            continue
        segments.append({"name": str(name), "value": value, "layer": layer})
    return segments


def _from_sitk(img: Any) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> (array [i, j, k(, c)], RAS affine)."""
    sitk = optional_import("SimpleITK", extra="medical")
    dim = img.GetDimension()
    arr = sitk.GetArrayFromImage(img)  # [k, j, i] (+ components last)
    order = tuple(reversed(range(dim))) + tuple(range(dim, arr.ndim))
    arr = np.transpose(arr, order)
    if dim == 2:
        arr = np.expand_dims(arr, 2)
    n = min(dim, 3)
    spacing, origin, direction = np.ones(3), np.zeros(3), np.eye(3)
    spacing[:n] = np.asarray(img.GetSpacing(), dtype=np.float64)[:n]
    origin[:n] = np.asarray(img.GetOrigin(), dtype=np.float64)[:n]
    direction[:n, :n] = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:n, :n]
    return arr, affine_from_lps(spacing, origin, direction)


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    sitk = optional_import("SimpleITK", extra="medical")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    img = reader.Execute()
    arr, affine = _from_sitk(img)
    meta: dict[str, Any] = {}
    if reader.HasMetaDataKey("0008|0060"):
        meta["modality"] = reader.GetMetaData("0008|0060").strip()
    return arr, affine, meta


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    sitk = optional_import("SimpleITK", extra="medical")
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(f"no DICOM series found in folder {folder}")
    if len(ids) > 1:
        raise InputError(f"folder {folder} holds {len(ids)} DICOM series; point to a folder with one series")
    files = reader.GetGDCMSeriesFileNames(str(folder), ids[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    img = reader.Execute()
    arr, affine = _from_sitk(img)
    meta: dict[str, Any] = {"series_uid": ids[0], "n_files": len(files)}
    if reader.HasMetaDataKey(0, "0008|0060"):
        meta["modality"] = reader.GetMetaData(0, "0008|0060").strip()
    return arr, affine, meta


# ----------------------------------------------------------------------------------------------- writing


def write_volume(
    path: str | os.PathLike[str],
    volume_or_array: Volume | np.ndarray,
    reference: Volume,
    *,
    labels: dict[int, str] | None = None,
) -> None:
    """Write an array on ``reference``'s voxel grid, atomically.

    The file gets exactly the reference's affine (spacing, origin, direction; oblique and non-RAS included)
    and voxel order. NIfTI files keep the reference's qform/sform codes when it was read from NIfTI (else
    both are 1, scanner). ``.seg.nrrd`` files get Slicer segment fields (``Segment<N>_Name``,
    ``_LabelValue``, ...) for every nonzero value present and every key of ``labels``; other formats
    ignore ``labels``. Booleans are written as uint8 and 64-bit integers as the smallest integer type that
    holds them.

    The data go to a temporary folder next to ``path`` and are moved into place with ``os.replace``; on any
    failure nothing is left behind and an existing file at ``path`` is untouched.

    Args:
        path: output file; its ending picks the format (see ``WRITE_SUFFIXES``).
        volume_or_array: the voxels, shape equal to ``reference.shape``; a Volume must also share the
            reference's affine.
        reference: the volume whose grid and geometry the output takes.
        labels: optional ``{label value: segment name}``.

    Raises:
        InputError: unsupported format, shape or grid mismatch, missing output folder, write failure.
        MissingDependencyError: the writer's package is not installed.
    """
    p = Path(path)
    kind = _kind_of(p, write=True)
    if isinstance(volume_or_array, Volume):
        if volume_or_array.shape == reference.shape and not np.allclose(
            volume_or_array.affine, reference.affine, rtol=0, atol=1e-4
        ):
            raise InputError("label grid mismatch: the volume's affine differs from the reference's")
        arr = volume_or_array.array
    else:
        arr = np.asarray(volume_or_array)
    if tuple(arr.shape) != reference.shape:
        raise InputError(f"array shape {tuple(arr.shape)} differs from the reference grid {reference.shape}")
    if len(reference.shape) != 3:
        raise InputError(f"reference volume must be 3D, got shape {reference.shape}")
    arr = _writable(arr)
    parent = p.parent
    if not parent.is_dir():
        raise InputError(f"output folder does not exist: {parent}")
    tmpdir = Path(tempfile.mkdtemp(prefix=".tmp-samadapt-", dir=parent))
    try:
        target = tmpdir / p.name  # same name, so the writer picks the format and detached data names match
        if kind == "nifti":
            _write_nifti(target, arr, reference)
        elif kind in ("nrrd", "seg-nrrd"):
            _write_nrrd(target, arr, reference, (labels or {}) if kind == "seg-nrrd" else None)
        else:
            _write_itk(target, arr, reference)
        if not target.is_file():
            raise InputError(f"cannot write {p.name}: the writer produced no file")
        for produced in sorted(tmpdir.iterdir()):  # detached data files (.mhd/.nhdr) before the header
            if produced != target:
                os.replace(produced, parent / produced.name)
        os.replace(target, p)
    except OSError as exc:
        raise InputError(f"cannot write {p}: {_one_line(exc)}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _writable(arr: np.ndarray) -> np.ndarray:
    """Cast to a dtype every format stores: bool -> uint8, 64-bit ints -> smallest fitting, f16 -> f32."""
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    if arr.dtype.kind in "iu" and arr.dtype.itemsize == 8:
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        for dt in (np.uint8, np.int16, np.uint16, np.int32, np.uint32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return arr.astype(dt)
    return arr


def _write_nifti(path: Path, arr: np.ndarray, reference: Volume) -> None:
    nib = optional_import("nibabel", extra="medical")
    affine = reference.affine
    qcode, scode = _DEFAULT_NIFTI_CODES
    qform = affine
    info = reference.meta.get("nifti")
    if isinstance(info, dict) and (info.get("qform_code") or info.get("sform_code")):
        stored_s = info.get("sform")
        # Trust the recorded codes only while they still describe this affine.
        if (
            info.get("sform_code")
            and stored_s is not None
            and np.allclose(np.asarray(stored_s), affine, rtol=0, atol=1e-6)
        ):
            qcode, scode = int(info.get("qform_code") or 0), int(info["sform_code"])
            if qcode and info.get("qform") is not None:
                qform = np.asarray(info["qform"])
        elif not info.get("sform_code"):
            qcode, scode = int(info.get("qform_code") or 0), 0
    img = nib.Nifti1Image(arr, affine)
    img.set_sform(affine, code=scode)
    img.set_qform(qform, code=qcode)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _write_nrrd(path: Path, arr: np.ndarray, reference: Volume, labels: dict[int, str] | None) -> None:
    nrrd = optional_import("nrrd", extra="medical")
    spacing, origin, direction = reference.lps_geometry()
    header: dict[str, Any] = {
        "space": "left-posterior-superior",
        "space directions": (direction @ np.diag(spacing)).T,  # row n = world step of voxel axis n
        "space origin": origin,
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    if labels is not None:  # a .seg.nrrd
        header.update(_slicer_segment_fields(arr, labels))
    nrrd.write(str(path), arr, header, index_order="F", compression_level=6)


def _slicer_segment_fields(arr: np.ndarray, labels: dict[int, str]) -> dict[str, str]:
    """3D Slicer segmentation header fields: one segment per nonzero value (present or named)."""
    values = sorted({int(v) for v in np.unique(arr) if v != 0} | {int(v) for v in labels if v != 0})
    fields = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for n, value in enumerate(values):
        mask = arr == value
        if mask.any():
            bounds = [(int(idx.min()), int(idx.max())) for idx in np.nonzero(mask)]
            extent = " ".join(f"{a} {b}" for a, b in bounds)
        else:
            extent = "0 -1 0 -1 0 -1"
        r, g, b = colorsys.hsv_to_rgb((n * 0.618033988749895) % 1.0, 0.65, 0.9)
        fields.update(
            {
                f"Segment{n}_ID": f"Segment_{value}",
                f"Segment{n}_Name": str(labels.get(value, f"Segment_{value}")),
                f"Segment{n}_NameAutoGenerated": "0" if value in labels else "1",
                f"Segment{n}_Color": f"{r:.6f} {g:.6f} {b:.6f}",
                f"Segment{n}_ColorAutoGenerated": "1",
                f"Segment{n}_LabelValue": str(value),
                f"Segment{n}_Layer": "0",
                f"Segment{n}_Extent": extent,
                f"Segment{n}_Tags": "|",
            }
        )
    return fields


def _write_itk(path: Path, arr: np.ndarray, reference: Volume) -> None:
    sitk = optional_import("SimpleITK", extra="medical")
    spacing, origin, direction = reference.lps_geometry()
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))  # [k, j, i]
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in direction.reshape(-1)])  # row-major 3x3
    sitk.WriteImage(img, str(path), True)
