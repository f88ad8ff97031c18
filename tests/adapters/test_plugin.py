"""A third-party package adds an adapter through the ``samadapt.adapters`` entry-point group."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = '''
import torch
from torch import nn

from samadapt.adapter import WRAPS_ENCODER, Adapter
from samadapt.adapters.common import dice_bce_loss, simulate


class NeckScale(Adapter):
    """Scales the image embedding by a learned per-channel factor (a stand-in for a real method)."""

    capabilities = frozenset({WRAPS_ENCODER})

    def __init__(self, init: float = 1.0) -> None:
        super().__init__(unfreeze=(), init_args={"init": init})
        self.init = init
        self.scale = nn.Parameter(torch.full((1,), init))

    def install(self, model):
        neck = model.image_encoder.neck
        scale = self.scale

        class Scaled(nn.Module):
            def __init__(self):
                super().__init__()
                self.neck = neck

            def forward(self, x):
                return self.neck(x) * scale

        model.image_encoder.neck = Scaled()

    def simulate_prompts(self, masks, generator=None):
        return simulate("box", masks, 0, generator)

    def loss(self, logits, iou, targets):
        return dice_bce_loss(logits, iou, targets)
'''

SETUP = """
[project]
name = "samadapt-neckscale"
version = "0.0.1"

[project.entry-points."samadapt.adapters"]
neckscale = "samadapt_neckscale:NeckScale"

[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[tool.setuptools]
py-modules = ["samadapt_neckscale"]
"""

CHECK = """
import torch, samadapt
from samadapt.adapter import adapter_types, get_adapter_type, load_adapter, save_adapter
assert "neckscale" in adapter_types(), sorted(adapter_types())
cls = get_adapter_type("neckscale")
model = samadapt.build("tiny")
adapter = cls(init=2.0)
adapter.attach(model)
save_adapter("out", adapter, model, base_sha256="x" * 64)
fresh = samadapt.build("tiny")
loaded = load_adapter("out", fresh, base_sha256="x" * 64)
print(type(loaded).__name__, loaded.adapter_type, float(loaded.scale))
"""


def test_an_installed_distribution_registers_an_adapter(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "samadapt_neckscale.py").write_text(textwrap.dedent(PLUGIN))
    (source / "pyproject.toml").write_text(textwrap.dedent(SETUP))
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    assert list(target.glob("samadapt_neckscale-0.0.1.dist-info/entry_points.txt"))
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["NeckScale", "neckscale", "2.0"]
    without = subprocess.run(
        [sys.executable, "-c", "from samadapt.adapter import adapter_types; print(sorted(adapter_types()))"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "neckscale" not in without.stdout and "lora" in without.stdout
