"""Start and stop a local ``samadapt serve`` on the loopback interface (local mode of the extension).

The server runs in its own process (``python -m samadapt.cli serve``), so PyTorch never loads into
Slicer's process, a crash in the model cannot take Slicer down, and the same server can be any Python
environment the user has (Slicer's own ``PythonSlicer`` after "Install samadapt", or a venv/conda env
given as the server command). It binds 127.0.0.1 on a free port and gets a random bearer token through
``SAMADAPT_TOKEN``, so other local users cannot use it. Standard library only.
"""

from __future__ import annotations

import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["LocalServer", "LocalServerError", "free_port", "server_command"]


class LocalServerError(RuntimeError):
    """The local server could not be started or did not become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_command(
    python: str | None = None, port: int = 8765, extra_args: Sequence[str] = (), command: str | None = None
) -> list[str]:
    """The command line of a loopback ``samadapt serve``.

    Args:
        python: the interpreter that has samadapt installed (default: this one; in Slicer, PythonSlicer).
        port: TCP port on 127.0.0.1.
        extra_args: more ``serve`` options (``--checkpoint``, ``--adapter``, ``--device`` ...).
        command: a user-given command to run instead of ``python -m samadapt.cli`` (e.g. the path of a
            ``samadapt`` executable in another environment); split like a shell would.
    """
    head = shlex.split(command) if command else [python or sys.executable, "-m", "samadapt.cli"]
    return [*head, "serve", "--host", "127.0.0.1", "--port", str(int(port)), *extra_args]


class LocalServer:
    """One ``samadapt serve`` child process on 127.0.0.1.

    Args:
        python: interpreter with samadapt installed (see :func:`server_command`).
        port: port to use (default: a free one).
        token: bearer token (default: a fresh random one).
        extra_args: more ``serve`` options.
        command: a different launcher (see :func:`server_command`).
        env: extra environment variables for the child.
        log_path: file that receives the server's stdout and stderr (default: discarded).
    """

    def __init__(
        self,
        python: str | None = None,
        port: int | None = None,
        token: str | None = None,
        extra_args: Sequence[str] = (),
        command: str | None = None,
        env: dict[str, str] | None = None,
        log_path: str | None = None,
    ) -> None:
        self.port = int(port) if port else free_port()
        self.token = token or secrets.token_urlsafe(24)
        self.args = server_command(python, self.port, extra_args, command)
        self.env = dict(env or {})
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the process (returns at once; call :meth:`wait_ready`)."""
        if self.running:
            return
        env = {**os.environ, **self.env, "SAMADAPT_TOKEN": self.token}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.args, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        except OSError as exc:
            self._close_log()
            raise LocalServerError(f"cannot start {self.args[0]}: {exc}") from None

    def wait_ready(
        self,
        health: Callable[[], Any],
        timeout: float = 120.0,
        interval: float = 0.25,
        tick: Callable[[], None] | None = None,
    ) -> None:
        """Poll ``health()`` until it succeeds.

        Args:
            health: e.g. ``SamAdaptClient(server.url, server.token).health``.
            timeout: seconds before giving up (loading a model takes a few seconds).
            interval: seconds between polls.
            tick: called between polls (Slicer passes ``slicer.app.processEvents``).

        Raises:
            LocalServerError: the process exited or did not answer in time (the log path is named).
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LocalServerError(
                    f"samadapt serve exited with code {self.process.returncode}"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            try:
                health()
                return
            except Exception as exc:
                last = exc
            if tick is not None:
                tick()
            time.sleep(interval)
        self.stop()
        raise LocalServerError(f"samadapt serve did not answer within {timeout:.0f} s ({last})")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process (kill it if it does not exit within ``timeout``)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self._close_log()

    def _close_log(self) -> None:
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
