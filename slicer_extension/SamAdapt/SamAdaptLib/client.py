"""Torch-free client for ``samadapt serve`` (standard library only; numpy is optional).

Used by the 3D Slicer extension and by the server tests::

    client = SamAdaptClient("http://127.0.0.1:8765", token=None)
    sid = client.create_session("ct.nii.gz")                  # upload once
    region = client.prompt(sid, "axial", 12, box=[30, 40, 80, 90])
    apply_region(labels, region)                               # labels: (I, J, K) uint8 numpy array
    apply_region(labels, client.propagate(sid, "both"))
    apply_region(labels, client.undo(sid))
    nifti_bytes = client.mask(sid)
    client.close(sid)

Coordinates are IJK voxel indexes of the uploaded array (``array[i, j, k]``, the NIfTI/ITK/Slicer
order). On a slice along ``axis`` the box/point X and Y are: axial (slice k): X = i, Y = j; coronal
(slice j): X = i, Y = k; sagittal (slice i): X = j, Y = k. This is ``samadapt segment VOLUME --box``'s
convention.

Every prompt-like call returns a *region*: the bounding box of the voxels that changed, with the new
label values inside it::

    {"offset": [i0, j0, k0], "shape": [di, dj, dk], "label": 1, "encoding": "zlib+base64",
     "dtype": "uint8", "data": "<base64 of zlib of the C-order uint8 bytes of that sub-array>", ...}

An empty change has ``shape == [0, 0, 0]``. Errors come back as :class:`SamAdaptError` (HTTP status and
the server's one-line ``detail``); a server that cannot be reached raises :class:`SamAdaptConnectionError`.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import Any

__all__ = [
    "SamAdaptClient",
    "SamAdaptConnectionError",
    "SamAdaptError",
    "apply_region",
    "decode_region",
    "encode_region",
    "region_array",
]

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
_FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".seg.nrrd": "nrrd"}


class SamAdaptError(Exception):
    """The server refused a request.

    Attributes:
        status: HTTP status code (0 when no response came back).
        detail: the server's one-line explanation.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail


class SamAdaptConnectionError(SamAdaptError):
    """The server could not be reached (not running, wrong URL or port, proxy, timeout)."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, detail)


# --------------------------------------------------------------------------------------------- regions


def decode_region(region: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], bytes]:
    """``(offset, shape, raw bytes)`` of a region; the bytes are the C-order sub-array (``dtype``)."""
    offset = tuple(int(v) for v in region["offset"])
    shape = tuple(int(v) for v in region["shape"])
    encoding = region.get("encoding", "zlib+base64")
    raw = base64.b64decode(region.get("data", "") or "")
    if encoding == "zlib+base64":
        raw = zlib.decompress(raw) if raw else b""
    elif encoding != "base64":
        raise ValueError(f"unknown region encoding {encoding!r}")
    count = 1
    for n in shape:
        count *= n
    itemsize = {"uint8": 1, "uint16": 2}.get(str(region.get("dtype", "uint8")), 1)
    if len(raw) != count * itemsize:
        raise ValueError(f"region data holds {len(raw)} bytes, shape {shape} needs {count * itemsize}")
    return offset, shape, raw


def encode_region(
    offset: Any, shape: Any, data: bytes, label: int = 0, dtype: str = "uint8"
) -> dict[str, Any]:
    """A region dict (zlib+base64) from C-order bytes; used to send a seed for a sub-box."""
    return {
        "offset": [int(v) for v in offset],
        "shape": [int(v) for v in shape],
        "label": int(label),
        "encoding": "zlib+base64",
        "dtype": dtype,
        "data": base64.b64encode(zlib.compress(bytes(data), 1)).decode("ascii"),
    }


def region_array(region: dict[str, Any]) -> Any:
    """The region's sub-array as a numpy array of its ``shape`` (needs numpy)."""
    import numpy as np

    _, shape, raw = decode_region(region)
    return np.frombuffer(raw, dtype=np.dtype(str(region.get("dtype", "uint8")))).reshape(shape)


def apply_region(array: Any, region: dict[str, Any]) -> Any:
    """Write a region into an (I, J, K) numpy label array in place and return the array.

    The sub-array holds every label value inside the box after the change, so applying the regions
    of prompt, propagate, undo and redo in order reproduces the server's mask.
    """
    offset, shape, _ = decode_region(region)
    if 0 in shape:
        return array
    block = region_array(region)
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))  # noqa: B905 (Slicer's Python 3.9)
    array[index] = block
    return array


# --------------------------------------------------------------------------------------------- client


def _format_of(name: str) -> str | None:
    lower = name.lower()
    for suffix in sorted(_FORMATS, key=len, reverse=True):
        if lower.endswith(suffix):
            return _FORMATS[suffix]
    return None


class SamAdaptClient:
    """HTTP client of ``samadapt serve``.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8765`` (``http://`` is added when missing).
        token: bearer token (default: ``$SAMADAPT_TOKEN`` if set).
        timeout: seconds to wait for each response (propagation of a big volume can take a while).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 60) -> None:
        if "://" not in url:
            url = "http://" + url
        self.url = url.rstrip("/")
        self.token = token if token is not None else (os.environ.get("SAMADAPT_TOKEN") or None)
        self.timeout = timeout
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # a system proxy must never see loopback traffic (a common cause of "server not found")
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    # ------------------------------------------------------------------ transport
    def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        query: dict[str, Any] | None = None,
        raw: bool = False,
    ) -> Any:
        url = self.url + path
        if query:
            items = {k: v for k, v in query.items() if v is not None}
            if items:
                url += "?" + urllib.parse.urlencode(items)
        all_headers = {"Accept": "application/json"}
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=body, method=method, headers=all_headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise SamAdaptError(exc.code, _detail(exc)) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as exc:  # noqa: UP041
            reason = getattr(exc, "reason", exc)
            raise SamAdaptConnectionError(
                f"cannot reach the samadapt server at {self.url} ({reason}); is `samadapt serve` running "
                "and the URL right (http://, host, port)?"
            ) from None
        if raw:
            return payload
        return json.loads(payload.decode("utf-8")) if payload else {}

    # ------------------------------------------------------------------ server
    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"ok": true, ...}`` (never needs the token)."""
        return self._request("GET", "/healthz")

    def capabilities(self) -> dict[str, Any]:
        """``GET /capabilities``: model, adapters, prompt types, axes, 2D/3D, limits."""
        return self._request("GET", "/capabilities")

    # ------------------------------------------------------------------ sessions
    def create_session(
        self,
        path_or_bytes: str | os.PathLike[str] | bytes,
        fmt: str | None = None,
        *,
        preset: str | None = None,
        window: tuple[float, float] | None = None,
    ) -> str:
        """Upload a NIfTI or NRRD volume once; returns the session id.

        Args:
            path_or_bytes: a file (``.nii``, ``.nii.gz``, ``.nrrd``) or its bytes.
            fmt: ``nifti`` or ``nrrd`` (default: from the file name; bytes need it unless NIfTI).
            preset: intensity preset (``ct-soft``, ``ct-lung``, ``ct-bone``, ``ct-brain``, ``mr``;
                default: guessed from the voxel values as the CLI does).
            window: CT ``(level, width)`` instead of a preset.
        """
        if isinstance(path_or_bytes, (bytes, bytearray)):
            data = bytes(path_or_bytes)
            fmt = fmt or "nifti"
        else:
            name = os.fspath(path_or_bytes)
            fmt = fmt or _format_of(name)
            if fmt is None:
                raise SamAdaptError(0, f"cannot tell the volume format of {name}; pass fmt='nifti' or 'nrrd'")
            with open(name, "rb") as handle:
                data = handle.read()
        info = self._request(
            "POST",
            "/sessions",
            body=data,
            headers={"Content-Type": "application/octet-stream", "X-Volume-Format": fmt},
            query={"preset": preset, "window": _window(window)},
        )
        return str(info["session_id"])

    def create_session_from_array(
        self,
        array: Any,
        *,
        spacing: Any = (1.0, 1.0, 1.0),
        origin: Any = (0.0, 0.0, 0.0),
        direction: Any = (1, 0, 0, 0, 1, 0, 0, 0, 1),
        shape: Any = None,
        dtype: str | None = None,
        order: str = "ijk",
        frame: str = "RAS",
        preset: str | None = None,
        window: tuple[float, float] | None = None,
    ) -> str:
        """Upload a raw voxel array with its geometry; returns the session id.

        Args:
            array: a numpy array, or raw C-order bytes (then give ``shape`` and ``dtype``).
            spacing: voxel size (mm) along the array's i, j, k axes.
            origin: world position (mm) of voxel (0, 0, 0), in ``frame``.
            direction: 3x3 direction cosines (9 values, row-major; column n is voxel axis n), in ``frame``.
            order: ``ijk`` (array indexed [i, j, k], as samadapt/nibabel) or ``kji`` (indexed [k, j, i],
                as ``slicer.util.arrayFromVolume`` and SimpleITK give it); ``shape`` is in that order.
            frame: ``RAS`` (3D Slicer, NIfTI) or ``LPS`` (ITK, DICOM, NRRD) for origin and direction.
        """
        if isinstance(array, (bytes, bytearray, memoryview)):
            if shape is None or dtype is None:
                raise SamAdaptError(0, "raw bytes need shape= and dtype=")
            data = bytes(array)
        else:
            shape = list(array.shape)
            dtype = str(array.dtype)
            data = array.tobytes(order="C")
        flat_direction = [float(v) for row in _rows(direction) for v in row]
        body = {
            "shape": [int(n) for n in shape],
            "dtype": dtype,
            "order": order,
            "frame": frame,
            "spacing": [float(v) for v in spacing],
            "origin": [float(v) for v in origin],
            "direction": flat_direction,
            "encoding": "zlib+base64",
            "data": base64.b64encode(zlib.compress(data, 1)).decode("ascii"),
        }
        info = self._request(
            "POST", "/sessions", json_body=body, query={"preset": preset, "window": _window(window)}
        )
        return str(info["session_id"])

    def session(self, session_id: str) -> dict[str, Any]:
        """``GET /sessions/{id}``: shape, affine, undo/redo depth and the ``progress`` of a propagation."""
        return self._request("GET", f"/sessions/{_quote(session_id)}")

    def progress(self, session_id: str) -> dict[str, Any]:
        """The ``progress`` field of :meth:`session` (``state``, ``done``, ``total``, ``direction``)."""
        return dict(self.session(session_id).get("progress") or {})

    def close(self, session_id: str) -> None:
        """Delete a session and its cached embeddings."""
        self._request("DELETE", f"/sessions/{_quote(session_id)}")

    # ------------------------------------------------------------------ prompts
    def prompt(
        self,
        session_id: str,
        axis: str,
        slice_index: int | None,
        box: Any = None,
        points: Any = None,
        point_labels: Any = None,
        label: int = 1,
        *,
        roi: Any = None,
    ) -> dict[str, Any]:
        """Segment one slice from a box and/or points; returns the changed region.

        Args:
            axis: ``axial``, ``coronal`` or ``sagittal``.
            slice_index: the slice the prompt is drawn on (None with ``roi``: the ROI's middle slice).
            box: ``[x0, y0, x1, y1]`` (or a list of such boxes: their masks are united).
            points: ``[[x, y], ...]``; point_labels: 1 foreground, 0 background (default all 1).
            label: the label value (1..255) written for this object.
            roi: a 3D box ``[i0, j0, k0, i1, j1, k1]`` (inclusive voxel bounds) that also limits
                propagation; without a box it prompts with the ROI's own rectangle.
        """
        body: dict[str, Any] = {"axis": axis, "slice_index": slice_index, "label": int(label)}
        if box is not None:
            body["boxes"] = _boxes(box)
        if points is not None:
            body["points"] = [[float(p[0]), float(p[1])] for p in points]
        if point_labels is not None:
            body["point_labels"] = [int(v) for v in point_labels]
        if roi is not None:
            body["roi"] = [float(v) for v in roi]
        return self._request("POST", f"/sessions/{_quote(session_id)}/prompt", json_body=body)

    def propagate(
        self,
        session_id: str,
        direction: str = "both",
        label: int = 1,
        *,
        axis: str | None = None,
        slice_index: int | None = None,
    ) -> dict[str, Any]:
        """Propagate the label's last prompt ``up`` (higher slice indexes), ``down`` or ``both``.

        With ``slice_index`` (and ``axis``) it starts from the current mask on that slice instead
        (e.g. after seeding). Returns the changed region, plus ``slices`` and ``ends`` per direction.
        """
        body: dict[str, Any] = {"direction": direction, "label": int(label)}
        if axis is not None:
            body["axis"] = axis
        if slice_index is not None:
            body["slice_index"] = int(slice_index)
        return self._request("POST", f"/sessions/{_quote(session_id)}/propagate", json_body=body)

    def undo(self, session_id: str) -> dict[str, Any]:
        """Undo the last change of the mask; returns the region it restored (empty if nothing to undo)."""
        return self._request("POST", f"/sessions/{_quote(session_id)}/undo")

    def redo(self, session_id: str) -> dict[str, Any]:
        """Redo the last undone change; returns its region (empty if nothing to redo)."""
        return self._request("POST", f"/sessions/{_quote(session_id)}/redo")

    def seed(
        self,
        session_id: str,
        array: Any = None,
        *,
        region: dict[str, Any] | None = None,
        path_or_bytes: str | os.PathLike[str] | bytes | None = None,
        fmt: str | None = None,
    ) -> dict[str, Any]:
        """Replace the mask (or a box of it) with an existing segmentation; undoable.

        Give one of: ``array`` (a full (I, J, K) uint8 numpy array), ``region`` (see
        :func:`encode_region`; replaces only that box), or ``path_or_bytes`` (a NIfTI/NRRD label file
        on the session's grid).
        """
        if path_or_bytes is not None:
            if isinstance(path_or_bytes, (bytes, bytearray)):
                data, fmt = bytes(path_or_bytes), fmt or "nifti"
            else:
                name = os.fspath(path_or_bytes)
                fmt = fmt or _format_of(name) or "nifti"
                with open(name, "rb") as handle:
                    data = handle.read()
            return self._request(
                "POST",
                f"/sessions/{_quote(session_id)}/seed",
                body=data,
                headers={"Content-Type": "application/octet-stream", "X-Volume-Format": fmt},
            )
        if array is not None:
            region = encode_region((0, 0, 0), array.shape, array.astype("uint8").tobytes(order="C"))
        if region is None:
            raise SamAdaptError(0, "seed needs array=, region= or path_or_bytes=")
        return self._request("POST", f"/sessions/{_quote(session_id)}/seed", json_body=region)

    def mask(self, session_id: str, fmt: str = "nifti") -> bytes:
        """The whole label volume on the uploaded grid, as ``nifti`` (.nii.gz) or ``nrrd`` bytes."""
        return self._request("GET", f"/sessions/{_quote(session_id)}/mask", query={"format": fmt}, raw=True)


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read().decode("utf-8", "replace")
    except Exception:
        return str(exc.reason)
    try:
        detail = json.loads(body).get("detail", body)
    except (ValueError, AttributeError):
        detail = body
    return " ".join(str(detail).split()) or str(exc.reason)


def _quote(session_id: str) -> str:
    return urllib.parse.quote(str(session_id), safe="")


def _window(window: Any) -> str | None:
    return None if window is None else f"{float(window[0])},{float(window[1])}"


def _rows(direction: Any) -> list[list[float]]:
    values = [float(v) for v in (direction.ravel() if hasattr(direction, "ravel") else _flat(direction))]
    if len(values) != 9:
        raise SamAdaptError(0, f"direction needs 9 values (3x3), got {len(values)}")
    return [values[0:3], values[3:6], values[6:9]]


def _flat(values: Any) -> list[float]:
    out: list[float] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(float(x) for x in v)
        else:
            out.append(float(v))
    return out


def _boxes(box: Any) -> list[list[float]]:
    items = list(box)
    if items and hasattr(items[0], "__len__"):  # a list of boxes
        return [[float(v) for v in b] for b in items]
    return [[float(v) for v in items]]
