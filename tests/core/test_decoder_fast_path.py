"""The decoder's CPU inference shortcuts give the plain path's results to float rounding.

The two-way transformer's cross attentions fold the projections of the 4096 image tokens into the few
prompt tokens (``Attention._few_queries`` / ``_few_keys``); the upscaling runs as matrix products.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samadapt import build
from samadapt.modeling import fused_kernels
from samadapt.modeling.transformer import Attention


def _attention(seed: int, dim: int = 256, heads: int = 8, downsample: int = 2) -> Attention:
    torch.manual_seed(seed)
    attention = Attention(dim, heads, downsample).eval()
    with torch.no_grad():
        for layer in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
            layer.bias.normal_(0, 0.5)  # nonzero biases: the folding must carry them
    return attention


@pytest.mark.parametrize(("queries", "keys"), [(7, 4096), (4096, 7), (12, 300), (300, 5), (6, 6)])
@pytest.mark.parametrize("batch", [1, 3])
def test_factorized_attention_matches_sdpa(queries: int, keys: int, batch: int) -> None:
    attention = _attention(queries + keys)
    generator = torch.Generator().manual_seed(batch)
    q = torch.randn(batch, queries, 256, generator=generator)
    k = torch.randn(batch, keys, 256, generator=generator) * 2
    v = torch.randn(batch, keys, 256, generator=generator)
    with torch.inference_mode():
        assert attention._factorizable(q)
        fast = attention(q, k, v)
        with fused_kernels(False):
            assert not attention._factorizable(q)
            plain = attention(q, k, v)
    assert fast.shape == plain.shape == (batch, queries, 256)
    assert (fast - plain).abs().max().item() <= 1e-4 * max(1.0, plain.abs().max().item())


def test_factorized_attention_is_inference_only() -> None:
    attention = _attention(0)
    q = torch.randn(1, 7, 256)
    assert not attention._factorizable(q)  # autograd on: plain path, gradients as usual
    with torch.inference_mode():
        assert attention._factorizable(q)
        attention.k_proj = nn.Sequential(attention.k_proj)  # an adapter's wrapper: plain path
        assert not attention._factorizable(q)


def test_decoder_matches_plain_path_with_every_prompt_kind() -> None:
    torch.manual_seed(0)
    model = build("lite_medsam").eval()
    embedding = torch.randn(1, 256, 64, 64)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [50.0, 60.0, 200.0, 250.0]])
    points = (torch.tensor([[[30.0, 40.0], [90.0, 100.0]]] * 2), torch.tensor([[1.0, 0.0]] * 2))
    masks = torch.randn(2, 1, 256, 256)
    for kwargs in (
        {"boxes": boxes},
        {"points": points},
        {"boxes": boxes, "points": points, "mask_input": masks},
    ):
        for multimask in (False, True):
            with torch.inference_mode():
                fast = model.decode(embedding, multimask_output=multimask, **kwargs)
                with fused_kernels(False):
                    plain = model.decode(embedding, multimask_output=multimask, **kwargs)
            for a, b in zip(fast, plain, strict=True):
                assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def test_repeated_prompts_on_one_embedding_reuse_its_image_side() -> None:
    """From the second prompt on an embedding the first block's image side is cached: same results."""
    torch.manual_seed(1)
    model = build("lite_medsam").eval()
    decoder = model.mask_decoder
    embedding = torch.randn(1, 256, 64, 64)
    prompts = [torch.tensor([[10.0, 20.0, 100.0, 120.0]]), torch.tensor([[5.0, 6.0, 50.0, 90.0]] * 3)]
    with torch.inference_mode():
        with fused_kernels(False):
            plain = [model.decode(embedding, boxes=b, multimask_output=True) for b in prompts]
        for call in range(6):
            boxes, expected = prompts[call % 2], plain[call % 2]
            fast = model.decode(embedding, boxes=boxes, multimask_output=True)
            for a, b in zip(fast, expected, strict=True):
                assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
            assert decoder._shared is not None and (decoder._shared[2] is None) == (call == 0)
        shared = decoder._shared[2]
        # a mask prompt (dense prompt that varies over the image) never uses it; a new embedding resets it
        model.decode(embedding, boxes=prompts[0], mask_input=torch.randn(1, 1, 256, 256))
        assert decoder._shared[2] is shared
        other = torch.randn(1, 256, 64, 64)
        model.decode(other, boxes=prompts[0])
        assert decoder._shared[2] is None and decoder._shared[0]() is other
        # changed weights are noticed
        model.decode(other, boxes=prompts[0])
        first = decoder._shared[2]
        assert first is not None
        with torch.no_grad():
            model.mask_decoder.transformer.layers[0].cross_attn_image_to_token.q_proj.weight.mul_(1.5)
        model.decode(other, boxes=prompts[0])
        assert decoder._shared[2] is None
    assert "_shared" in decoder.__dict__ and decoder.__getstate__()["_shared"] is None
