"""TinyViT's fused oneDNN path (conv + BN + GELU / + residual) equals the plain path; training still works."""

from __future__ import annotations

import pytest
import torch

from samadapt import build, load_model
from samadapt.modeling import common, tiny_vit
from samadapt.precision import autocast
from samadapt.weights import verified_default_checkpoint


@pytest.fixture(scope="module")
def lite():
    return load_model(verified_default_checkpoint())


def test_fused_path_matches_plain_path_fp32(lite, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert tiny_vit.use_fused_convolutions(x) == hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        fused = lite.image_encoder(x)
        monkeypatch.setattr(common, "FUSED_CPU_KERNELS", False)
        plain = lite.image_encoder(x)
    assert (fused - plain).abs().max().item() <= 1e-4


def test_fused_path_follows_autocast_dtype(lite) -> None:
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = lite.image_encoder(x)
        with autocast("bf16", torch.device("cpu")):
            fast = lite.image_encoder(x).float()
    assert (fast - reference).abs().max().item() < 0.25
    assert torch.nn.functional.cosine_similarity(fast.flatten(), reference.flatten(), dim=0) > 0.999


def test_training_mode_backpropagates_through_batchnorm() -> None:
    torch.manual_seed(0)
    model = build("lite_medsam").train()
    x = torch.rand(2, 3, 256, 256)
    model.image_encoder(x).square().mean().backward()
    grads = [p.grad for p in model.image_encoder.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert model.image_encoder.patch_embed.seq[0].c.weight.grad.abs().sum() > 0


def test_vit_fused_linears_match_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ViT's oneDNN linears (qkv, proj, MLP with fused GELU) equal nn.Linear + GELU."""
    torch.manual_seed(0)
    model = build("tiny").eval()
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        fused = model.image_encoder(x)
        monkeypatch.setattr(common, "FUSED_CPU_KERNELS", False)
        plain = model.image_encoder(x)
    assert (fused - plain).abs().max().item() <= 1e-5
    assert fused.abs().max().item() > 0.1  # not trivially zero
