"""Running the installed ``samadapt`` console script as a user does (imported by tests as ``cli_helpers``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SAMADAPT = str(Path(sys.executable).parent / "samadapt")


def run_samadapt(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``samadapt ARGS`` in a subprocess; stdout and stderr captured as text."""
    return subprocess.run(
        [SAMADAPT, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """The tiny core (random weights from ``seed``) saved as a checkpoint at ``path``; returns ``path``."""
    import torch

    import samadapt

    torch.manual_seed(seed)
    samadapt.save_model(samadapt.build("tiny"), path)
    return path
