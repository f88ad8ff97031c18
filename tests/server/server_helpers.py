"""Server test helpers (imported as ``server_helpers``): the torch-free client loaded from the Slicer
extension, a real uvicorn server on a free loopback port in a thread, and generated volumes."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
CLIENT_PY = REPO / "slicer_extension" / "SamAdapt" / "SamAdaptLib" / "client.py"
CT = TESTS / "data" / "totalsegmentator" / "example_ct_sm.nii.gz"
TOKEN = "test-token-0123456789"


def load_client() -> ModuleType:
    """The client module, imported from its file as the Slicer extension ships it (no package import)."""
    name = "samadapt_slicer_client"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CLIENT_PY)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def blob_volume(seed: int, shape: tuple[int, int, int] = (48, 40, 8)) -> tuple[np.ndarray, list[float]]:
    """A noisy int16 volume with one bright box; returns it and the box's axial (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-50, 50, size=shape).astype(np.int16)
    i0, j0 = 4 + seed % 17, 3 + (seed * 7) % 15
    array[i0 : i0 + 18, j0 : j0 + 16, 1:-1] += 900
    return array, [float(i0), float(j0), float(i0 + 17), float(j0 + 15)]
