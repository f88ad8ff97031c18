"""``samadapt serve`` as a user runs it: refuses a non-loopback host without a token (one line), and
serves a checkpoint on loopback with the token checked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from server_helpers import REPO, TOKEN, free_port

from samadapt.cli.serve import is_loopback

SAMADAPT = str(Path(sys.executable).parent / "samadapt")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SAMADAPT_TOKEN"}
    env.update(extra)
    return env


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_non_loopback_host_without_token_fails_in_one_line(host: str) -> None:
    proc = subprocess.run(
        [SAMADAPT, "serve", "--host", host], capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "token" in lines[0] and host in lines[0]


def test_loopback_detection() -> None:
    assert (
        is_loopback("127.0.0.1")
        and is_loopback("localhost")
        and is_loopback("::1")
        and is_loopback("127.1.2.3")
    )
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.org")


def test_serve_runs_a_checkpoint_with_the_token_from_the_environment(
    tiny_checkpoint: Path, client_module: Any
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            SAMADAPT,
            "serve",
            "--port",
            str(port),
            "--checkpoint",
            str(tiny_checkpoint),
            "--precision",
            "fp32",
            "--cache-mb",
            "64",
            "--session-ttl",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(SAMADAPT_TOKEN=TOKEN),
        cwd=REPO,
    )
    try:
        client = client_module.SamAdaptClient(f"http://127.0.0.1:{port}", token=TOKEN, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.health()
                break
            except client_module.SamAdaptConnectionError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "samadapt serve did not come up"
                time.sleep(0.3)
        caps = client.capabilities()
        assert caps["model"]["variant"] == "tiny" and caps["auth"] == "bearer"
        assert caps["limits"]["cache_bytes"] == 64 << 20 and caps["limits"]["session_ttl_s"] == 60
        anonymous = client_module.SamAdaptClient(f"http://127.0.0.1:{port}", token="")
        with pytest.raises(client_module.SamAdaptError) as info:
            anonymous.capabilities()
        assert info.value.status == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.stdout is not None and "samadapt serve:" in proc.stdout.read()


def test_unreachable_server_is_a_clear_connection_error(client_module: Any) -> None:
    client = client_module.SamAdaptClient(f"127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(client_module.SamAdaptConnectionError) as info:
        client.health()
    assert "cannot reach" in str(info.value) and "samadapt serve" in str(info.value)
