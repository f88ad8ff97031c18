"""The parameter counts ``fit`` prints on a ViT-B base match the published designs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, run_samadapt

import samadapt
from samadapt.adapters.msa import MedicalSAMAdapter
from samadapt.checkpoint import save_model


@pytest.fixture(scope="module")
def vit_b_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight SAM ViT-B checkpoint (same architecture and signature as sam_vit_b_01ec64.pth)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vitb") / "sam_vit_b_random.pth"
    save_model(samadapt.build("sam_vit_b"), path)
    return path


@pytest.mark.slow
def test_fit_prints_samed_lora_count_on_vit_b(vit_b_base: Path, data_root: Path, tmp_path: Path) -> None:
    proc = run_samadapt(
        "fit", "--config", REPO / "recipes/lora/sam_vit_b.yaml", "--model.base", vit_b_base,
        "--model.input_size", "256", "--model.adapter.init_args.unfreeze", "[]",
        "--data.root", data_root, "--data.batch_size", "1", "--trainer.fast_dev_run=1",
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(
        r"trainable parameters ([\d,]+) \(adapter ([\d,]+)\); frozen ([\d,]+)", proc.stdout + proc.stderr
    )
    assert found, proc.stdout[-2000:]
    assert found.group(2) == "147,456" and found.group(1) == "147,456"
    assert found.group(3) == "93,735,472"


@pytest.mark.slow
def test_task_reports_msa_counts_on_vit_b(vit_b_base: Path) -> None:
    from samadapt.training import SamTask

    task = SamTask(MedicalSAMAdapter(depth_adapter=True), base=str(vit_b_base))
    report = task.parameter_report()
    assert "adapter 10,651,392" in report and "mask_decoder 4,058,340" in report
    assert "trainable parameters 14,709,732" in report
