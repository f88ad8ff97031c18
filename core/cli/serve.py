"""``samadapt serve``: the interactive HTTP service (needs ``pip install 'samadapt[server]'``)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
from typing import Any

from samadapt.cli.common import adapter_dir, add_model_args, load_predictor
from samadapt.errors import InputError

_LOOPBACK_NAMES = ("localhost",)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "serve",
        help="interactive HTTP service for 3D Slicer and other clients (see docs/server.md)",
        description="Serve the model over HTTP: upload a volume once, then prompt slices, propagate, "
        "undo and redo. Binds 127.0.0.1 unless --host is given; any other host needs a bearer token.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback)")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (default: 8765)")
    parser.add_argument(
        "--token", help="bearer token every request but /healthz must carry (default: $SAMADAPT_TOKEN)"
    )
    add_model_args(parser)
    limits = parser.add_argument_group("limits")
    limits.add_argument("--cache-mb", type=float, default=1024, help="slice-embedding cache bound (MB)")
    limits.add_argument("--max-upload-mb", type=float, default=512, help="largest request body (MB)")
    limits.add_argument("--session-ttl", type=float, default=1800, help="idle seconds before a session ends")
    limits.add_argument("--max-sessions", type=int, default=32, help="most sessions at once")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_bindable(host: str, port: int) -> None:
    """Fail with one line when the address cannot be bound (port taken, unknown host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InputError(f"cannot resolve --host {host}: {exc.strerror or exc}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise InputError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from exc


def _adapter_kinds(args: argparse.Namespace) -> list[str]:
    """The adapter type named in ``--adapter DIR``'s config (shown by /capabilities)."""
    folder = adapter_dir(args)
    if folder is None:
        return []
    from samadapt.adapter import CONFIG_FILE

    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        return [str(config.get("adapter_type", "adapter"))]
    except (OSError, ValueError):
        return ["adapter"]


def run(args: argparse.Namespace) -> int:
    from samadapt._optional import optional_import

    token = args.token or os.environ.get("SAMADAPT_TOKEN") or None
    if not is_loopback(args.host) and not token:
        raise InputError(
            f"refusing to bind {args.host} without a token: give --token T or set SAMADAPT_TOKEN "
            "(or bind 127.0.0.1)"
        )
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be 0..65535, got {args.port}")
    if args.cache_mb < 0 or args.max_upload_mb <= 0 or args.session_ttl <= 0 or args.max_sessions < 1:
        raise InputError("--cache-mb must be >= 0; --max-upload-mb, --session-ttl, --max-sessions > 0")
    uvicorn = optional_import("uvicorn", "server")
    optional_import("fastapi", "server")
    _check_bindable(args.host, args.port)
    from samadapt.server import create_app

    predictor, described = load_predictor(args)
    app = create_app(
        predictor,
        model_info={"description": described, "adapters": _adapter_kinds(args)},
        token=token,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        cache_bytes=int(args.cache_mb * (1 << 20)),
        session_ttl_s=args.session_ttl,
        max_sessions=args.max_sessions,
    )
    auth = "bearer token required" if token else "no token: loopback only"
    print(f"samadapt serve: {described}; http://{args.host}:{args.port} ({auth})", flush=True)
    uvicorn.run(app, host=args.host.strip("[]"), port=args.port, log_level="warning")
    return 0
