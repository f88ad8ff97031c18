"""``samadapt serve``: the interactive HTTP service (sessions, prompts, propagation, undo).

Needs ``pip install 'samadapt[server]'`` (FastAPI, uvicorn, python-multipart). The engine
(:mod:`samadapt.server.sessions`) needs only numpy and the core; :func:`create_app` imports FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """Build the FastAPI app (see :func:`samadapt.server.app.create_app`); FastAPI imported here."""
    from samadapt._optional import optional_import

    optional_import("fastapi", "server")
    from samadapt.server.app import create_app as build

    return build(*args, **kwargs)
