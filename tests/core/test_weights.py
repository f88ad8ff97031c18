"""checkpoint_sha256: the verified default is not hashed again; other files are hashed once per version."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from samadapt import weights
from samadapt.errors import CheckpointError
from samadapt.weights import LITEMEDSAM_SHA256, checkpoint_sha256, verified_default_checkpoint


def test_verified_default_returns_the_known_digest_without_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    path = verified_default_checkpoint()

    def no_hashing(path: Path) -> str:
        raise AssertionError("the verified default checkpoint must not be hashed again")

    monkeypatch.setattr(weights, "sha256_of", no_hashing)
    assert checkpoint_sha256(path) == LITEMEDSAM_SHA256
    assert checkpoint_sha256(str(path)) == LITEMEDSAM_SHA256


def test_other_files_are_hashed_once_per_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(b"first version")
    hashed: list[Path] = []
    real = weights.sha256_of

    def counting(target: Path) -> str:
        hashed.append(target)
        return real(target)

    monkeypatch.setattr(weights, "sha256_of", counting)
    assert checkpoint_sha256(path) == hashlib.sha256(b"first version").hexdigest()
    assert checkpoint_sha256(path) == hashlib.sha256(b"first version").hexdigest()
    assert len(hashed) == 1
    path.write_bytes(b"second, longer version")
    os.utime(path, ns=(1, 1))
    assert checkpoint_sha256(path) == hashlib.sha256(b"second, longer version").hexdigest()
    assert len(hashed) == 2


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        checkpoint_sha256(tmp_path / "nope.pth")
