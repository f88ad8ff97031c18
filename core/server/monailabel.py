"""A MONAI Label-compatible facade, so MONAI Label clients (the 3D Slicer plugin, OHIF, QuPath and
``monailabel.client.MONAILabelClient``) can use samadapt as their server.

Routes (the subset of MONAI Label's REST API an interactive client needs; MONAI Label server 0.8.x):

- ``GET /info/``: the app description. Two interactive models of MONAI Label's ``deepgrow`` type:
  ``<model>`` (``dimension: 2``: clicks segment one slice) and ``<model>_3d`` (``dimension: 3``: the clicked
  slice is segmented, then propagated up and down through the volume).
- ``PUT /session/``: multipart upload (field ``files``) of one volume file (NIfTI, NRRD with attached data,
  MetaImage ``.mha``) or of the files of one DICOM series -> ``{"session_id", "session_info"}``.
- ``GET /session/{id}`` (``?image=true`` returns the volume as NIfTI) and ``DELETE /session/{id}``.
- ``POST /infer/{model}?session_id=...`` with the multipart form field ``params`` (JSON):

  - ``foreground`` / ``background``: clicks ``[[i, j, k], ...]``, voxel indices of the uploaded grid
    (3D Slicer's IJK, the ``[i, j, k]`` order of :func:`samadapt.domains.medical.read_volume`);
  - ``roi``: optional 3D box ``[i0, i1, j0, j1, k0, k1]`` (what the Slicer plugin sends); a box prompt on
    the slice that also limits propagation;
  - ``slice``: the slice index (default: the slice of the last foreground click);
  - ``axis``: ``axial`` (slices along k; the default, and what the Slicer plugin assumes), ``coronal``
    or ``sagittal``;
  - ``result_extension`` (``.nrrd`` default, ``.nii.gz``, ``.nii``, ``.seg.nrrd``, ``.mha``) and
    ``result_dtype`` (``uint8`` default).

  The answer is MONAI Label's multipart response: a ``params`` JSON part and one file part holding the
  label volume on the uploaded grid (the object = 1, all else 0; for the 2D model only the prompted slice
  is set). ``output=image`` or ``output=json`` return only one of the two, as MONAI Label does. Without a
  session but with a multipart ``file``, that file is segmented in a throw-away session.

Each request is stateless, as MONAI Label clients expect: it carries all clicks so far and gets the whole
answer. A click request on the 2D model replaces the object on that slice (the session's undo history keeps
the earlier result); one on the 3D model starts from an empty label map. Clicks on other slices than the
prompted one are not used (they are counted in the response's ``ignored_points``).

Security: uploaded bytes are written only to a fresh server-owned temporary folder under server-chosen
names (the client's file name is never used); NRRD and MetaImage headers that point to a separate data
file are refused, so an upload can never make the server read another file. Wrong input gives a 4xx
``{"detail": "..."}`` with a one-line message; an unknown model or session gives 404.
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

try:  # FastAPI parses multipart forms with python-multipart; without it the facade is not mounted
    import python_multipart  # noqa: F401
except ImportError:  # pragma: no cover - older releases ship the module as "multipart"
    import multipart  # noqa: F401
from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import JSONResponse, Response

import samadapt
from samadapt.domains.medical import Volume, read_volume, write_volume
from samadapt.errors import SamadaptError
from samadapt.server.sessions import SessionNotFound

__all__ = ["MONAILABEL_API_VERSION", "build_monailabel_router", "sniff_volume_format"]

#: The MONAI Label server release whose REST API this facade follows.
MONAILABEL_API_VERSION = "0.8.5"

_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
_RESULT_EXTENSIONS = (".nrrd", ".nii.gz", ".nii", ".seg.nrrd", ".mha")
_RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")
_MAX_POINTS = 256
#: Default voxel limit of an upload (the main API's default: 512 x 512 x 1024).
DEFAULT_MAX_VOXELS = 512 * 512 * 1024
_SNIFF_BYTES = 4096
_CHUNK = 1 << 20


def _fail(status: int, message: str) -> HTTPException:
    text = " ".join(str(message).split())
    return HTTPException(status_code=status, detail=text if len(text) <= 300 else text[:297] + "...")


# ----------------------------------------------------------------------------------------------- uploads


def _header_fields(head: bytes, separator: str) -> dict[str, str] | None:
    """``key<separator>value`` lines of a text header up to the first blank line (None if not text)."""
    try:
        text = head.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        return None
    fields = {}
    for line in text.splitlines():
        if separator in line and not line.startswith("#"):
            key, _, value = line.partition(separator)
            fields[key.strip().lower()] = value.strip()
    return fields


def sniff_volume_format(head: bytes) -> str:
    """The format of an uploaded volume from its first bytes (never from a client-supplied name).

    Returns:
        ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha`` or ``.dcm`` (the suffix the server's temporary file gets).

    Raises:
        HTTPException: 422 for anything else, and for NRRD/MetaImage headers naming a separate data file.
    """
    if head[:2] == b"\x1f\x8b":
        try:
            inner = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 600)
        except zlib.error as exc:
            raise _fail(422, f"the upload is not a valid gzip stream: {exc}") from exc
        if _is_nifti(inner):
            return ".nii.gz"
        raise _fail(422, "a gzip upload must hold a NIfTI volume (.nii.gz)")
    if _is_nifti(head):
        return ".nii"
    if head.startswith(b"NRRD000"):
        fields = _header_fields(head.split(b"\n", 1)[-1], ":") or {}
        if "data file" in fields or "datafile" in fields:
            raise _fail(422, "NRRD headers with a separate data file (.nhdr) are not accepted; send a .nrrd")
        return ".nrrd"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return ".dcm"
    meta = _header_fields(head, "=")
    if meta and "ndims" in meta and "elementdatafile" in meta:
        if meta["elementdatafile"].upper() != "LOCAL":
            raise _fail(
                422, "MetaImage headers with a separate data file (.mhd) are not accepted; send a .mha"
            )
        return ".mha"
    raise _fail(
        422, "unrecognised volume upload; send NIfTI (.nii/.nii.gz), NRRD (.nrrd), .mha or DICOM files"
    )


def _is_nifti(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] == b"n+1\x00":
        return True
    return len(head) >= 8 and head[4:8] == b"n+2\x00"


def _copy_limited(src: BinaryIO, dst: BinaryIO, budget: int) -> int:
    """Copy ``src`` to ``dst``; return the bytes copied, or raise 413 once more than ``budget`` arrive."""
    copied = 0
    while chunk := src.read(_CHUNK):
        copied += len(chunk)
        if copied > budget:
            raise _fail(413, "upload too large")
        dst.write(chunk)
    return copied


def _peek_shape(path: Path) -> tuple[int, ...]:
    """The voxel grid from the header alone, before any voxel data are decompressed."""
    name = path.name
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        image: Any = nib.load(str(path))  # nibabel's stubs type load() as the base image class
        return tuple(int(n) for n in image.shape)
    if name.endswith(".nrrd"):
        import nrrd

        header = nrrd.read_header(str(path))
        if "data file" in header or "datafile" in header:  # the sniffed head may not hold the whole header
            raise _fail(422, "NRRD headers with a separate data file (.nhdr) are not accepted; send a .nrrd")
        return tuple(int(n) for n in header.get("sizes", ()))
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return tuple(int(n) for n in reader.GetSize())


def _read_uploads(
    files: Sequence[UploadFile], max_bytes: int, max_voxels: int, tmp_root: str | None
) -> Volume:
    """Read one volume file, or the files of one DICOM series, through a server-owned temporary folder."""
    if not files:
        raise _fail(422, "no file uploaded (multipart field 'files')")
    folder = Path(tempfile.mkdtemp(prefix="samadapt-monailabel-", dir=tmp_root))
    try:
        budget = max_bytes
        source = folder
        for n, upload in enumerate(files):
            head = upload.file.read(_SNIFF_BYTES)
            kind = sniff_volume_format(head)
            if len(files) > 1 and kind != ".dcm":
                raise _fail(422, "several files are accepted only as the DICOM files of one series")
            if len(head) > budget:
                raise _fail(413, "upload too large")
            target = folder / (f"{n:05d}.dcm" if kind == ".dcm" else f"volume{kind}")
            with target.open("wb") as out:
                out.write(head)
                budget -= len(head)
                budget -= _copy_limited(upload.file, out, budget)
            if len(files) == 1:
                source = target
        try:
            if source != folder:
                shape = _peek_shape(source)
                count = int(np.prod(shape, dtype=np.int64))
                if count > max_voxels:
                    raise _fail(
                        422, f"volume of shape {list(shape)} has {count} voxels, more than {max_voxels}"
                    )
            volume = read_volume(source)
        except HTTPException:
            raise
        except Exception as exc:  # whatever the readers raise on a bad file is the client's bad file
            text = " ".join(str(exc).split()).replace(str(folder), "upload")
            raise _fail(
                422, text if isinstance(exc, SamadaptError) else f"cannot read the upload: {text}"
            ) from exc
        if volume.array.size > max_voxels:
            raise _fail(422, f"volume of shape {list(volume.shape)} has more than {max_voxels} voxels")
        volume.meta.pop("path", None)  # the server's temporary path is nobody's business
        if isinstance(volume.array, np.memmap):  # nibabel maps .nii files; the file is about to go
            volume.array = np.array(volume.array)
        return volume
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- prompts


def _parse_params(text: str) -> dict[str, Any]:
    try:
        params = json.loads(text or "{}")
    except ValueError as exc:
        raise _fail(422, f"params is not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise _fail(422, "params must be a JSON object")
    return params


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(422, f"{what} must hold finite numbers, got {value!r}")
    return float(value)


def _points(params: dict[str, Any], key: str, shape: tuple[int, ...]) -> list[tuple[float, float, float]]:
    raw = params.get(key, [])
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > _MAX_POINTS:
        raise _fail(422, f"params.{key} must be a list of at most {_MAX_POINTS} [i, j, k] points")
    points = []
    for p in raw:
        if not isinstance(p, list | tuple) or len(p) != 3:
            raise _fail(422, f"params.{key}: each point must be [i, j, k], got {p!r}")
        ijk = tuple(_number(v, f"params.{key}") for v in p)
        if any(not 0 <= v <= n - 1 for v, n in zip(ijk, shape, strict=True)):
            raise _fail(422, f"params.{key}: point {list(p)} lies outside the volume of shape {list(shape)}")
        points.append((ijk[0], ijk[1], ijk[2]))
    return points


def _roi(params: dict[str, Any], shape: tuple[int, ...]) -> list[tuple[float, float]] | None:
    """``roi`` = [i0, i1, j0, j1, k0, k1] (pairs in any order, as RAS->IJK rounding gives them) or None."""
    raw = params.get("roi")
    if raw is None or raw == []:
        return None
    if not isinstance(raw, list) or len(raw) != 6:
        raise _fail(422, "params.roi must be [i0, i1, j0, j1, k0, k1]")
    values = [_number(v, "params.roi") for v in raw]
    pairs = []
    for axis in range(3):
        lo, hi = sorted(values[2 * axis : 2 * axis + 2])
        lo, hi = max(lo, 0.0), min(hi, float(shape[axis] - 1))
        if hi < lo:
            raise _fail(422, f"params.roi {raw} lies outside the volume of shape {list(shape)}")
        pairs.append((lo, hi))
    return pairs


class _Prompt:
    """One request's prompt on one slice, in that slice's X/Y (the contract of Session.prompt)."""

    def __init__(self, params: dict[str, Any], shape: tuple[int, ...]) -> None:
        axis = params.get("axis", "axial")
        if axis not in _AXES:
            raise _fail(422, f"params.axis must be one of {', '.join(_AXES)}, got {axis!r}")
        self.axis = str(axis)
        a = _AXES[self.axis]
        x_axis, y_axis = (d for d in range(3) if d != a)
        foreground = _points(params, "foreground", shape)
        background = _points(params, "background", shape)
        roi = _roi(params, shape)
        if not foreground and not background and roi is None:
            raise _fail(422, "give at least one foreground/background click or a roi")
        raw_slice = params.get("slice")
        if raw_slice is not None and raw_slice != -1:
            if isinstance(raw_slice, bool) or not isinstance(raw_slice, int):
                raise _fail(422, f"params.slice must be an integer, got {raw_slice!r}")
            index = raw_slice
        elif foreground:
            index = round(foreground[-1][a])
        elif roi is not None:
            index = round((roi[a][0] + roi[a][1]) / 2)
        else:
            index = round(background[-1][a])
        if not 0 <= index < shape[a]:
            raise _fail(422, f"params.slice {index} is outside the volume ({shape[a]} {self.axis} slices)")
        self.slice_index = int(index)
        coords: list[list[float]] = []
        labels: list[int] = []
        self.ignored = 0
        for points, label in ((foreground, 1), (background, 0)):
            for p in points:
                if round(p[a]) == index:
                    coords.append([p[x_axis], p[y_axis]])
                    labels.append(label)
                else:
                    self.ignored += 1
        self.points = coords or None
        self.point_labels = labels or None
        self.box: list[float] | None = None
        self.roi: list[float] | None = None  # (i0, j0, k0, i1, j1, k1), Session.prompt's order
        if roi is not None:
            self.box = [roi[x_axis][0], roi[y_axis][0], roi[x_axis][1], roi[y_axis][1]]
            self.roi = [lo for lo, _ in roi] + [hi for _, hi in roi]
        if self.points is None and self.box is None:
            raise _fail(422, f"no click and no roi on {self.axis} slice {index}")


# ----------------------------------------------------------------------------------------------- results


def _volume_bytes(array: np.ndarray, reference: Volume, suffix: str, labels: dict[int, str] | None) -> bytes:
    folder = Path(tempfile.mkdtemp(prefix="samadapt-monailabel-"))
    try:
        path = folder / f"result{suffix}"
        write_volume(path, array, reference, labels=labels)
        return path.read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _clear_label(session: Any, label: int) -> None:
    """Remove ``label`` from the session's mask (undoable: a seed of its bounding box only)."""
    where = np.nonzero(session.mask == label)
    if where[0].size == 0:
        return
    lower = [int(w.min()) for w in where]
    upper = [int(w.max()) + 1 for w in where]
    block = session.mask[tuple(slice(lo, hi) for lo, hi in zip(lower, upper, strict=True))].copy()
    block[block == label] = 0
    session.seed(block, offset=lower)


def _multipart(params: dict[str, Any], filename: str, data: bytes) -> Response:
    """MONAI Label's infer answer: a ``params`` JSON part, then the label file part (Content-Length set:
    the MONAI Label client parses the raw response stream with ``cgi.FieldStorage``)."""
    boundary = secrets.token_hex(16)
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="params"\r\n'
        "Content-Type: application/json\r\n\r\n"
        f"{json.dumps(params)}\r\n"
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return Response(content=body, media_type=f"multipart/form-data; boundary={boundary}")


def _file_response(data: bytes, filename: str) -> Response:
    return Response(
        content=data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# ----------------------------------------------------------------------------------------------- router


def build_monailabel_router(
    store: Any,
    model_name: str,
    *,
    labels: Sequence[str] = (),
    description: str | None = None,
    max_upload_bytes: int = 512 << 20,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    tmp_dir: str | None = None,
) -> APIRouter:
    """The MONAI Label routes over a :class:`samadapt.server.sessions.SessionStore`.

    Args:
        store: the app's SessionStore (``create(volume) -> id``, ``get(id)``, ``delete(id)``).
        model_name: name shown to clients; the 2D model is ``model_name``, the propagating one
            ``model_name + "_3d"``.
        labels: label names reported in ``/info/`` (interactive models segment whatever is clicked).
        description: app description for ``/info/``.
        max_upload_bytes: largest accepted upload (sum of the files of one session); larger gives 413.
        max_voxels: largest accepted volume; larger gives 422.
        tmp_dir: parent folder for the temporary upload folders (default: the system's temp folder).
    """
    if not model_name or "/" in model_name:
        raise ValueError(f"invalid model name {model_name!r}")
    models = {
        model_name: {
            "type": "deepgrow",
            "dimension": 2,
            "labels": list(labels),
            "description": f"samadapt {model_name}: clicks or a box segment the clicked slice",
            "config": {},
        },
        f"{model_name}_3d": {
            "type": "deepgrow",
            "dimension": 3,
            "labels": list(labels),
            "description": f"samadapt {model_name}: the clicked slice, propagated up and down the volume",
            "config": {"axis": list(_AXES)[::-1]},  # a list is a combo box; its first entry is the default
        },
    }
    router = APIRouter(tags=["MONAI Label"])

    def session_of(session_id: str) -> Any:
        try:
            return store.get(session_id)
        except SessionNotFound as exc:
            raise _fail(404, f"session not found: {session_id[:64]}") from exc

    def session_info(session_id: str, session: Any) -> dict[str, Any]:
        created = getattr(session, "created", 0.0)
        expiry = getattr(store, "expiry_s", 0)
        volume: Volume = session.volume
        spacing, _, _ = volume.lps_geometry()
        return {
            "name": session_id,
            "path": "",
            "image": "",
            "meta": {"shape": list(volume.shape), "spacing": [float(s) for s in spacing]},
            "create_ts": int(created),
            "last_access_ts": int(getattr(session, "last_access", created)),
            "expiry": int(created + expiry) if expiry else 0,
        }

    @router.get("/info/")
    def info() -> dict[str, Any]:
        # No top-level "config" key: the Slicer plugin reads one as "please upgrade the server".
        return {
            "name": "samadapt",
            "description": description or f"samadapt {model_name} (Segment Anything for medical volumes)",
            "version": samadapt.__version__,
            "labels": list(labels),
            "models": models,
            "trainers": {},
            "strategies": {},
            "scoring": {},
            "train_stats": {},
            "datastore": {"total": 0, "completed": 0},
        }

    @router.put("/session/")
    def create_session(
        uncompress: bool = False,
        expiry: int = 0,
        files: list[UploadFile] = File(...),  # noqa: B008  (FastAPI's declaration style)
    ) -> dict[str, Any]:
        if uncompress:
            raise _fail(422, "uncompress=true (zip uploads) is not supported; send the volume file")
        volume = _read_uploads(files, max_upload_bytes, max_voxels, tmp_dir)
        session_id = create(volume)
        return {"session_id": session_id, "session_info": session_info(session_id, session_of(session_id))}

    def create(volume: Volume) -> str:
        try:
            return str(store.create(volume))
        except SamadaptError as exc:
            raise _fail(422, str(exc)) from exc

    @router.get("/session/{session_id}")
    def get_session(session_id: str, update_ts: bool = False, image: bool = False) -> Any:
        session = session_of(session_id)
        if image:
            volume: Volume = session.volume
            return _file_response(_volume_bytes(volume.array, volume, ".nii.gz", None), "image.nii.gz")
        return session_info(session_id, session)

    @router.delete("/session/{session_id}")
    def remove_session(session_id: str) -> dict[str, Any]:
        found = session_info(session_id, session_of(session_id))
        try:
            store.delete(session_id)
        except SessionNotFound as exc:
            raise _fail(404, f"session not found: {session_id[:64]}") from exc
        return found

    @router.post("/infer/{model}")
    def infer(
        model: str,
        image: str = "",
        session_id: str = "",
        output: str | None = Query(None),
        params: str = Form("{}"),
        file: UploadFile | None = File(None),  # noqa: B008
        label: UploadFile | None = File(None),  # noqa: B008
    ) -> Response:
        if model not in models:
            raise _fail(404, f"model not found: {model[:64]}; available: {', '.join(models)}")
        if output not in (None, "", "all", "image", "json"):
            raise _fail(422, f"output={output!r} is not supported; use image, json or all")
        if label is not None:
            raise _fail(422, f"model {model} takes clicks, not a label/scribbles file")
        request = _parse_params(params)
        suffix = str(request.get("result_extension") or ".nrrd")
        if suffix not in _RESULT_EXTENSIONS:
            raise _fail(422, f"result_extension must be one of {', '.join(_RESULT_EXTENSIONS)}")
        dtype = str(request.get("result_dtype") or "uint8")
        if dtype not in _RESULT_DTYPES:
            raise _fail(422, f"result_dtype must be one of {', '.join(_RESULT_DTYPES)}")
        temporary = None
        if session_id:
            session = session_of(session_id)
        elif file is not None:
            temporary = create(_read_uploads([file], max_upload_bytes, max_voxels, tmp_dir))
            session = session_of(temporary)
        else:
            raise _fail(
                422, "send session_id (create one with PUT /session/) or a file; samadapt has no datastore"
            )
        try:
            start = time.perf_counter()
            volume: Volume = session.volume
            prompt = _Prompt(request, volume.shape)
            dimension = models[model]["dimension"]
            with session.lock:
                try:
                    if dimension == 3:
                        _clear_label(session, 1)
                    session.prompt(
                        axis=prompt.axis,
                        slice_index=prompt.slice_index,
                        boxes=None if prompt.box is None else [prompt.box],
                        points=prompt.points,
                        point_labels=prompt.point_labels,
                        label=1,
                        roi=prompt.roi,
                    )
                    if dimension == 3:
                        session.propagate(direction="both", label=1)
                except SamadaptError as exc:
                    raise _fail(422, str(exc)) from exc
                result = np.zeros(volume.shape, dtype=dtype)
                if dimension == 3:
                    result[session.mask == 1] = 1
                else:
                    index: list[slice | int] = [slice(None)] * 3
                    index[_AXES[prompt.axis]] = prompt.slice_index
                    result[tuple(index)] = session.mask[tuple(index)] == 1
            name = str(request.get("label") or "object")
            data = _volume_bytes(result, volume, suffix, {1: name} if suffix == ".seg.nrrd" else None)
            elapsed = time.perf_counter() - start
        finally:
            if temporary is not None:
                store.delete(temporary)
        answer = {
            "model": model,
            "session_id": session_id,
            "label": name,
            "label_names": {name: 1},
            "axis": prompt.axis,
            "slice": prompt.slice_index,
            "dimension": dimension,
            "ignored_points": prompt.ignored,
            "voxels": int(np.count_nonzero(result)),
            "latencies": {"infer": round(elapsed, 4), "total": round(elapsed, 4)},
        }
        filename = f"samadapt-{secrets.token_hex(8)}{suffix}"  # unique: clients save it under this name
        if output == "json":
            return JSONResponse(answer)
        if output == "image":
            return _file_response(data, filename)
        return _multipart(answer, filename, data)

    return router
