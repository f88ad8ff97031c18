"""Server test fixtures: the client module, a tiny random model and its checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import samadapt
from samadapt.predictor import Predictor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests here import server_helpers

from cli_helpers import write_tiny_checkpoint
from server_helpers import load_client


@pytest.fixture(scope="session")
def client_module() -> ModuleType:
    return load_client()


@pytest.fixture(scope="session")
def tiny_predictor() -> Predictor:
    torch.manual_seed(0)
    return Predictor(samadapt.build("tiny"), precision="fp32")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")
