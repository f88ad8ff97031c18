"""Fixtures for the Slicer extension's pure-Python library (run without 3D Slicer).

``SamAdaptLib`` lives in ``slicer_extension/SamAdapt/`` (Slicer puts a scripted module's folder on
``sys.path``); the tests do the same. ``FakeClient`` (slicer_fakes.py) is a stand-in for the samadapt server,
which these tests cannot run inside Slicer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "slicer_extension" / "SamAdapt"
HERE = Path(__file__).resolve().parent
for _path in (MODULE_DIR, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from slicer_fakes import FakeClient  # noqa: E402


@pytest.fixture
def fake_client() -> FakeClient:
    return FakeClient()
