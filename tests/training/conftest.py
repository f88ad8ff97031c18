"""Fixtures for the training tests: a tiny random base checkpoint and a 2D data root of real slices."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import write_tiny_checkpoint
from PIL import Image

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny.pth")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/images + ROOT/masks (label maps) from the sam_med2d slices in tests/data."""
    source = TESTS / "data" / "sam_med2d"
    root = tmp_path_factory.mktemp("data2d")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for image in sorted((source / "images").glob("*.png")):
        labels = None
        for value, mask_path in enumerate(sorted((source / "masks").glob(f"{image.stem}_*.png")), start=1):
            mask = np.array(Image.open(mask_path)) > 0
            labels = np.zeros(mask.shape, np.uint8) if labels is None else labels
            labels[mask & (labels == 0)] = value
        assert labels is not None
        shutil.copy(image, root / "images" / image.name)
        Image.fromarray(labels).save(root / "masks" / image.name)
    return root
