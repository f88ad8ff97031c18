"""The FastAPI app of ``samadapt serve``: sessions, prompts, propagation, undo/redo, seeds, masks.

Endpoints (JSON unless noted; every route but ``/healthz`` needs ``Authorization: Bearer TOKEN`` when
the server has a token): ``GET /healthz``, ``GET /capabilities``, ``POST /sessions`` (NIfTI/NRRD bytes
with ``X-Volume-Format``, or a JSON raw array), ``GET|DELETE /sessions/{id}``,
``POST /sessions/{id}/prompt|propagate|undo|redo|seed``, ``GET /sessions/{id}/mask`` (file bytes), and
the MONAI Label facade of :mod:`samadapt.server.monailabel`. See docs/server.md.

Model work runs in worker threads (sync endpoints, ``run_in_threadpool``), never on the event loop,
so a slow upload or a long propagation of one client does not hold up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

import samadapt
from samadapt.domains.medical import PRESETS
from samadapt.errors import InputError, MissingDependencyError, SamadaptError
from samadapt.predictor import Predictor
from samadapt.server.regions import decode_region, mask_bytes, volume_from_bytes, volume_from_json
from samadapt.server.sessions import DIRECTIONS, Session, SessionNotFound, SessionStore, StoreFull

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "create_app"]

DEFAULT_MAX_UPLOAD_BYTES = 512 << 20
DEFAULT_CACHE_BYTES = 1 << 30
DEFAULT_MAX_VOXELS = 512 * 512 * 1024


class _TooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than this server's limit of {limit} bytes")


class _BodyLimit:
    """ASGI middleware: refuse request bodies above ``limit`` bytes with 413.

    A declared ``Content-Length`` above the limit is answered at once (after reading and discarding
    what the client sends, up to a cap, so it can read the answer); a body without one is counted as
    it arrives and refused when it passes the limit.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                with contextlib.suppress(ValueError):
                    declared = int(value)
        if declared is not None and declared > self.limit:
            await _drain(receive, min(declared, 4 * self.limit + (64 << 20)))
            body = json.dumps({"detail": _TooLarge(self.limit).detail}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


async def _drain(receive: Any, budget: int) -> None:
    seen = 0
    while seen < budget:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


# ----------------------------------------------------------------------------------------- bodies


class PromptBody(BaseModel):
    """``POST /sessions/{id}/prompt``: boxes/points in the slice's X/Y (IJK voxel indexes)."""

    model_config = ConfigDict(extra="ignore")
    axis: str = "axial"
    slice_index: int | None = None
    boxes: list[list[float]] | None = None
    box: list[float] | None = None
    points: list[list[float]] | None = None
    point_labels: list[int] | None = None
    label: int = 1
    roi: list[float] | None = None


class PropagateBody(BaseModel):
    """``POST /sessions/{id}/propagate``."""

    model_config = ConfigDict(extra="ignore")
    direction: str = "both"
    label: int = 1
    axis: str | None = None
    slice_index: int | None = None
    stop: str | None = Field(default=None, pattern="^(auto|vanish)$")
    max_slices: int | None = Field(default=None, ge=0)


# ----------------------------------------------------------------------------------------- app


def _one_line(text: Any) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= 300 else line[:297] + "..."


def _error(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": _one_line(detail)}, status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _window(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise InputError(f"window must be 'LEVEL,WIDTH', got {text!r}") from exc
    if width <= 0:
        raise InputError("window width must be positive")
    return level, width


async def _body(request: Request, limit: int) -> bytes:
    chunks, seen = [], 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    predictor_or_model_loader: Predictor | SessionStore | Callable[[], Any],
    *,
    model_info: dict[str, Any] | None = None,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    session_ttl_s: float = 1800.0,
    max_sessions: int = 32,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    sweep_interval_s: float | None = None,
    monailabel: bool = True,
) -> FastAPI:
    """The HTTP app over one model copy.

    Args:
        predictor_or_model_loader: a :class:`Predictor`, a ready :class:`SessionStore`, or a callable
            returning a Predictor (or ``(predictor, description)``), called once here.
        model_info: extra fields for ``/capabilities``' ``model`` (e.g. ``description``, ``adapters``).
        token: bearer token every route but ``/healthz`` requires (None: no authentication).
        max_upload_bytes: largest request body; larger gives 413.
        cache_bytes: bound of the slice-embedding LRU shared by all sessions.
        session_ttl_s: idle seconds before a session is deleted.
        max_sessions: most sessions at once (503 beyond).
        max_voxels: largest volume accepted (422 beyond).
        sweep_interval_s: how often idle sessions are looked for (default: ttl / 4, 1..60 s).
        monailabel: mount the MONAI Label facade (``/info/``, ``/session/``, ``/infer/``) when it imports.
    """
    info = dict(model_info or {})
    source: Any = predictor_or_model_loader
    if not isinstance(source, (Predictor, SessionStore)) and callable(source):
        source = source()
        if isinstance(source, tuple):
            source, description = source
            info.setdefault("description", description)
    if isinstance(source, SessionStore):
        store = source
    elif isinstance(source, Predictor):
        store = SessionStore(
            source, cache_bytes=cache_bytes, session_ttl_s=session_ttl_s, max_sessions=max_sessions
        )
    else:
        raise TypeError(
            f"create_app needs a Predictor, a SessionStore or a loader, got {type(source).__name__}"
        )
    predictor = store.predictor
    interval = sweep_interval_s or min(60.0, max(1.0, store.expiry_s / 4))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def sweep() -> None:
            while True:
                await asyncio.sleep(interval)
                await run_in_threadpool(store.expire)

        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="samadapt", version=samadapt.__version__, lifespan=lifespan)
    app.state.store = store
    app.add_middleware(_BodyLimit, limit=max_upload_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_detail(exc))

    @app.exception_handler(SessionNotFound)
    async def not_found(_: Request, exc: SessionNotFound) -> JSONResponse:
        return _error(404, exc.args[0] if exc.args else "session not found")

    @app.exception_handler(StoreFull)
    async def full(_: Request, exc: StoreFull) -> JSONResponse:
        return _error(503, exc, {"Retry-After": "30"})

    @app.exception_handler(MissingDependencyError)
    async def missing(_: Request, exc: MissingDependencyError) -> JSONResponse:
        return _error(500, exc)

    @app.exception_handler(SamadaptError)
    async def bad_input(_: Request, exc: SamadaptError) -> JSONResponse:
        return _error(422, exc)

    def authorize(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "version": samadapt.__version__}

    api = APIRouter(dependencies=[Depends(authorize)])
    capabilities: dict[str, Any] = {
        "name": "samadapt",
        "version": samadapt.__version__,
        "model": {
            "variant": getattr(predictor.model, "variant", "unknown"),
            "precision": predictor.precision,
            "device": str(predictor.device),
            "input_size": int(predictor.profile.input_size),
            **{k: v for k, v in info.items() if k != "adapters"},
        },
        "adapters": list(info.get("adapters", [])),
        "prompt_types": ["box", "point", "roi"],
        "dimensions": {"2d": True, "3d": "propagation", "native_3d": False},
        "axes": ["axial", "coronal", "sagittal"],
        "directions": list(DIRECTIONS),
        "coordinates": "IJK voxel indexes of the uploaded array; "
        "axial X=i Y=j, coronal X=i Y=k, sagittal X=j Y=k",
        "undo": True,
        "seed": True,
        "region_encoding": "zlib+base64",
        "volume_formats": ["nifti", "nrrd", "raw"],
        "mask_formats": ["nifti", "nrrd"],
        "presets": list(PRESETS),
        "limits": {
            "max_upload_bytes": max_upload_bytes,
            "max_voxels": max_voxels,
            "session_ttl_s": store.expiry_s,
            "max_sessions": store.max_sessions,
            "cache_bytes": store.cache.max_bytes,
        },
        "auth": "bearer" if token else "none",
        "monailabel": False,
    }

    @api.get("/capabilities")
    def get_capabilities() -> dict[str, Any]:
        return {**capabilities, "sessions": len(store), "cache": store.cache.stats()}

    @api.post("/sessions", status_code=201)
    async def create_session(
        request: Request, preset: str | None = Query(None), window: str | None = Query(None)
    ) -> dict[str, Any]:
        if preset is not None and preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        level_width = _window(window)
        data = await _body(request, max_upload_bytes)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fmt = request.headers.get("x-volume-format")

        def build() -> dict[str, Any]:
            try:
                if kind == "application/json" and fmt is None:
                    try:
                        body = json.loads(data)
                    except ValueError as exc:
                        raise InputError(f"the body is not valid JSON ({exc})") from exc
                    if not isinstance(body, dict):
                        raise InputError("a raw volume is a JSON object with shape, dtype and data")
                    volume = volume_from_json(body, max_voxels=max_voxels)
                else:
                    volume = volume_from_bytes(data, fmt or "", max_voxels=max_voxels)
            except InputError as exc:
                raise HTTPException(400, f"malformed volume: {exc}") from exc
            session_id = store.create(volume, preset=preset, window=level_width)
            return store.get(session_id).info()

        return await run_in_threadpool(build)

    @api.get("/sessions/{session_id}")
    def get_session(session_id: str) -> dict[str, Any]:
        return store.get(session_id).info()

    @api.delete("/sessions/{session_id}")
    def delete_session(session_id: str) -> dict[str, Any]:
        store.delete(session_id)
        return {"deleted": session_id}

    @api.post("/sessions/{session_id}/prompt")
    def prompt(session_id: str, body: PromptBody) -> dict[str, Any]:
        session = store.get(session_id)
        boxes = body.boxes if body.boxes is not None else ([body.box] if body.box is not None else None)
        return session.prompt(
            axis=body.axis,
            slice_index=body.slice_index,
            boxes=boxes,
            points=body.points,
            point_labels=body.point_labels,
            label=body.label,
            roi=body.roi,
        )

    @api.post("/sessions/{session_id}/propagate")
    def propagate(session_id: str, body: PropagateBody) -> dict[str, Any]:
        return store.get(session_id).propagate(
            direction=body.direction,
            label=body.label,
            axis=body.axis,
            slice_index=body.slice_index,
            stop=body.stop,
            max_slices=body.max_slices,
        )

    @api.post("/sessions/{session_id}/undo")
    def undo(session_id: str) -> dict[str, Any]:
        return store.get(session_id).undo()

    @api.post("/sessions/{session_id}/redo")
    def redo(session_id: str) -> dict[str, Any]:
        return store.get(session_id).redo()

    @api.post("/sessions/{session_id}/seed")
    async def seed(session_id: str, request: Request) -> dict[str, Any]:
        session = store.get(session_id)
        data = await _body(request, max_upload_bytes)
        fmt = request.headers.get("x-volume-format")
        return await run_in_threadpool(_seed, session, data, fmt, max_voxels)

    @api.get("/sessions/{session_id}/mask")
    def mask(session_id: str, format: str = Query("nifti")) -> Response:
        session = store.get(session_id)
        with session.lock:
            labels = session.mask.copy()
        data, media, name = mask_bytes(labels, session.volume, format)
        return Response(
            data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'}
        )

    app.include_router(api)
    if monailabel:
        _mount_monailabel(app, store, capabilities, authorize, max_upload_bytes)
    return app


def _seed(session: Session, data: bytes, fmt: str | None, max_voxels: int) -> dict[str, Any]:
    """A seed from label-file bytes on the session's grid, or from a JSON region."""
    import numpy as np

    if fmt is not None:
        try:
            labels = volume_from_bytes(data, fmt, max_voxels=max_voxels)
        except InputError as exc:
            raise HTTPException(400, f"malformed label volume: {exc}") from exc
        if labels.shape != session.volume.shape:
            raise InputError(f"seed grid {labels.shape} differs from the session's {session.volume.shape}")
        if not np.allclose(labels.affine, session.volume.affine, atol=1e-3):
            raise InputError("seed geometry (affine) differs from the session volume's")
        array = np.rint(labels.array)
        return session.seed(array.astype(np.int64) if array.size else array)
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise HTTPException(400, f"the body is not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise InputError("a seed is a region object (offset, shape, data) or a label file")
    offset, block = decode_region(body, session.volume.shape)
    return session.seed(block, offset)


def _mount_monailabel(
    app: FastAPI,
    store: SessionStore,
    capabilities: dict[str, Any],
    authorize: Callable[..., None],
    limit: int,
) -> None:
    try:
        from samadapt.server.monailabel import build_monailabel_router
    except ImportError:  # the facade needs python-multipart; the rest of the server does not
        return
    name = str(capabilities["model"]["variant"])
    router = build_monailabel_router(store, name, max_upload_bytes=limit)
    app.include_router(router, dependencies=[Depends(authorize)])
    capabilities["monailabel"] = True
