"""TinyViT's fused oneDNN path (conv + BN + GELU / + residual) equals the plain path; training still works.

Where the fused ops run and where they must not: tests/core/test_fused_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from samadapt import build, load_model
from samadapt.modeling import fused_kernels, tiny_vit
from samadapt.precision import autocast
from samadapt.weights import verified_default_checkpoint


@pytest.fixture(scope="module")
def lite():
    return load_model(verified_default_checkpoint())


def _fused_conv_calls(prof: profile) -> int:
    return sum(e.count for e in prof.key_averages() if "mkldnn::_convolution_pointwise" in e.key)


@pytest.mark.skipif(
    not hasattr(torch.ops.mkldnn, "_convolution_pointwise"),
    reason="this PyTorch build has no mkldnn::_convolution_pointwise",
)
def test_fused_path_matches_plain_path_fp32(lite) -> None:
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert tiny_vit.use_fused_convolutions(x)
        with profile(activities=[ProfilerActivity.CPU]) as fused_prof:
            fused = lite.image_encoder(x)
        with fused_kernels(False), profile(activities=[ProfilerActivity.CPU]) as plain_prof:
            assert not tiny_vit.use_fused_convolutions(x)
            plain = lite.image_encoder(x)
    assert _fused_conv_calls(fused_prof) > 0 and _fused_conv_calls(plain_prof) == 0
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
