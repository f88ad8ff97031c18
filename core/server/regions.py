"""Changed-region encoding, uploaded volumes and mask downloads for the HTTP service.

A *region* is the bounding box of the voxels a call changed, with the label values inside it after
the change, as JSON::

    {"offset": [i0, j0, k0], "shape": [di, dj, dk], "label": 1, "encoding": "zlib+base64",
     "dtype": "uint8", "data": "<base64(zlib(C-order bytes of mask[i0:i0+di, j0:j0+dj, k0:k0+dk]))>"}

Uploaded files are written to a temporary file whose name the server picks, read with
:func:`samadapt.domains.medical.read_volume` and deleted; nothing a client sends names a file.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from samadapt.domains.medical import Volume, affine_from_lps, read_volume, require_3d, write_volume
from samadapt.errors import InputError

__all__ = [
    "EMPTY_SHAPE",
    "VOLUME_FORMATS",
    "changed_box",
    "decode_payload",
    "decode_region",
    "encode_region",
    "mask_bytes",
    "volume_from_bytes",
    "volume_from_json",
]

EMPTY_SHAPE = (0, 0, 0)
#: Upload formats of ``POST /sessions`` (``X-Volume-Format``) and of ``GET .../mask?format=``.
VOLUME_FORMATS = ("nifti", "nrrd")
_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
_GZIP_MAGIC = b"\x1f\x8b"


def changed_box(before: np.ndarray, after: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Tight ``(lower, upper)`` (upper exclusive) of the voxels where two equal-shape arrays differ."""
    diff = before != after
    if not diff.any():
        return None
    lower, upper = [], []
    for axis in range(diff.ndim):
        other = tuple(a for a in range(diff.ndim) if a != axis)
        hit = np.flatnonzero(diff.any(axis=other))
        lower.append(int(hit[0]))
        upper.append(int(hit[-1]) + 1)
    return tuple(lower), tuple(upper)


def encode_region(block: np.ndarray | None, offset: Sequence[int], label: int = 0) -> dict[str, Any]:
    """Region JSON of a (di, dj, dk) uint8 block at ``offset`` (None or empty: no change)."""
    if block is None or block.size == 0:
        return {
            "offset": [0, 0, 0],
            "shape": list(EMPTY_SHAPE),
            "label": int(label),
            "encoding": "zlib+base64",
            "dtype": "uint8",
            "data": "",
        }
    data = np.ascontiguousarray(block, dtype=np.uint8).tobytes(order="C")
    return {
        "offset": [int(v) for v in offset],
        "shape": [int(n) for n in block.shape],
        "label": int(label),
        "encoding": "zlib+base64",
        "dtype": "uint8",
        "data": base64.b64encode(zlib.compress(data, 1)).decode("ascii"),
    }


def decode_payload(text: Any, encoding: str, expected_bytes: int) -> bytes:
    """Bytes of a ``base64`` or ``zlib+base64`` field, refusing anything but exactly ``expected_bytes``.

    Decompression stops one byte past the expected size, so a zlib bomb costs nothing.
    """
    if not isinstance(text, str):
        raise InputError("data must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"data is not valid base64 ({exc})") from exc
    if encoding == "zlib+base64":
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(raw, expected_bytes + 1)
        except zlib.error as exc:
            raise InputError(f"data is not valid zlib ({exc})") from exc
    elif encoding != "base64":
        raise InputError(f"unknown encoding {encoding!r}; use zlib+base64 or base64")
    if len(raw) != expected_bytes:
        raise InputError(
            f"data holds {len(raw)}{'+' if len(raw) > expected_bytes else ''} bytes, "
            f"expected {expected_bytes}"
        )
    return raw


def decode_region(body: dict[str, Any], grid: Sequence[int]) -> tuple[tuple[int, ...], np.ndarray]:
    """``(offset, uint8 block)`` of a region sent by a client, checked to lie inside ``grid``."""
    try:
        offset = tuple(int(v) for v in body.get("offset", (0, 0, 0)))
        shape = tuple(int(v) for v in body["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError("a region needs offset (3 ints), shape (3 ints) and data") from exc
    if len(offset) != 3 or len(shape) != 3:
        raise InputError("region offset and shape need 3 values each")
    if str(body.get("dtype", "uint8")) != "uint8":
        raise InputError("region dtype must be uint8")
    if any(o < 0 or n < 1 or o + n > g for o, n, g in zip(offset, shape, grid, strict=True)):
        raise InputError(
            f"region at {list(offset)} of shape {list(shape)} does not fit the volume {list(grid)}"
        )
    raw = decode_payload(body.get("data"), str(body.get("encoding", "zlib+base64")), int(np.prod(shape)))
    return offset, np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()


def _check_voxels(shape: Sequence[int], max_voxels: int) -> None:
    count = int(np.prod([int(n) for n in shape], dtype=np.int64))
    if count > max_voxels:
        raise InputError(
            f"volume of shape {list(shape)} has {count} voxels, more than this server's {max_voxels}"
        )


def _peek_shape(path: str, fmt: str) -> tuple[int, ...]:
    """The voxel grid from the header only (before any data are decompressed); refuses detached NRRD."""
    if fmt == "nifti":
        import nibabel as nib

        image: Any = nib.load(path)  # lazy: reads the header, not the voxels
        return tuple(int(n) for n in image.shape)
    import nrrd

    header = nrrd.read_header(path)
    if any(key in header for key in ("data file", "datafile")):
        raise InputError("detached NRRD headers (data file: ...) are not accepted; upload an attached .nrrd")
    return tuple(int(n) for n in header.get("sizes", ()))


def volume_from_bytes(data: bytes, fmt: str, *, max_voxels: int) -> Volume:
    """A 3D volume from uploaded NIfTI (``.nii``/``.nii.gz``) or attached NRRD bytes.

    Raises:
        InputError: unknown format, unreadable or corrupt bytes, too many voxels, not 3D.
    """
    fmt = (fmt or "").strip().lower()
    if fmt not in VOLUME_FORMATS:
        raise InputError(f"X-Volume-Format must be one of {', '.join(VOLUME_FORMATS)}, got {fmt!r}")
    if not data:
        raise InputError("the request body is empty; send the volume file's bytes")
    suffix = ".nrrd" if fmt == "nrrd" else (".nii.gz" if data[:2] == _GZIP_MAGIC else ".nii")
    handle, path = tempfile.mkstemp(prefix="samadapt-upload-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        try:
            _check_voxels(_peek_shape(path, fmt), max_voxels)
            volume = read_volume(path)
        except Exception as exc:  # a file the reader cannot parse is the client's bad file
            text = (
                " ".join(str(exc).split()).replace(path, "upload").replace(os.path.basename(path), "upload")
            )
            if isinstance(exc, InputError) and text.startswith(("volume ", "detached", "the ")):
                raise InputError(text) from exc
            raise InputError(f"cannot read the uploaded {fmt} volume: {text[:200]}") from exc
    finally:
        os.unlink(path)
    volume.meta = {k: v for k, v in volume.meta.items() if k not in ("path",)}
    return require_3d(volume)


def volume_from_json(body: dict[str, Any], *, max_voxels: int) -> Volume:
    """A 3D volume from ``{"shape", "dtype", "data", "encoding", "spacing", "origin", "direction",
    "order": "ijk"|"kji", "frame": "RAS"|"LPS"}`` (see docs/server.md).

    ``shape`` is in ``order``; the returned Volume is always indexed [i, j, k].
    """
    try:
        shape = [int(n) for n in body["shape"]]
        dtype = str(body["dtype"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError("a raw volume needs shape (3 ints), dtype and data") from exc
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"shape must be 3 positive ints, got {shape}")
    if dtype not in _DTYPES:
        raise InputError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    _check_voxels(shape, max_voxels)
    order = str(body.get("order", "ijk")).lower()
    frame = str(body.get("frame", "RAS")).upper()
    if order not in ("ijk", "kji"):
        raise InputError(f"order must be ijk or kji, got {order!r}")
    if frame not in ("RAS", "LPS"):
        raise InputError(f"frame must be RAS or LPS, got {frame!r}")
    itemsize = np.dtype(dtype).itemsize
    raw = decode_payload(
        body.get("data"), str(body.get("encoding", "zlib+base64")), int(np.prod(shape)) * itemsize
    )
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    if order == "kji":
        array = array.transpose(2, 1, 0)
    array = np.ascontiguousarray(array, dtype=np.dtype(dtype))
    try:
        spacing = np.asarray(body.get("spacing", (1.0, 1.0, 1.0)), dtype=np.float64).reshape(3)
        origin = np.asarray(body.get("origin", (0.0, 0.0, 0.0)), dtype=np.float64).reshape(3)
        direction = np.asarray(body.get("direction", np.eye(3).ravel()), dtype=np.float64).reshape(3, 3)
    except (TypeError, ValueError) as exc:
        raise InputError("spacing and origin need 3 numbers, direction 9 (3x3, row-major)") from exc
    if not (np.isfinite(spacing).all() and np.isfinite(origin).all() and np.isfinite(direction).all()):
        raise InputError("spacing, origin and direction must be finite")
    if (spacing <= 0).any() or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError("spacing must be positive and direction invertible")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError("the volume holds NaN or infinite voxels")
    if frame == "LPS":
        affine = affine_from_lps(spacing, origin, direction)
    else:
        affine = np.eye(4)
        affine[:3, :3] = direction @ np.diag(spacing)
        affine[:3, 3] = origin
    return require_3d(Volume(array, affine, {"format": "raw"}))


def mask_bytes(mask: np.ndarray, reference: Volume, fmt: str) -> tuple[bytes, str, str]:
    """The label map as file bytes on the reference grid: ``(bytes, media type, file name)``."""
    fmt = (fmt or "nifti").lower()
    if fmt not in VOLUME_FORMATS:
        raise InputError(f"format must be one of {', '.join(VOLUME_FORMATS)}, got {fmt!r}")
    name = "mask.nii.gz" if fmt == "nifti" else "mask.nrrd"
    folder = tempfile.mkdtemp(prefix="samadapt-mask-")
    path = os.path.join(folder, name)
    try:
        write_volume(path, mask, reference)
        with open(path, "rb") as handle:
            data = handle.read()
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(folder)
    media = "application/gzip" if fmt == "nifti" else "application/octet-stream"
    return data, media, name
