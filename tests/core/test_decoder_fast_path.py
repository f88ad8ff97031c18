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
    """From the second prompt on an embedding the transformer runs factored: same results."""
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
            assert decoder._factors is not None and (decoder._factors[2] is None) == (call == 0)
        factors = decoder._factors[2]
        # a mask prompt (dense prompt that varies over the image) never uses it; a new embedding resets it
        model.decode(embedding, boxes=prompts[0], mask_input=torch.randn(1, 1, 256, 256))
        assert decoder._factors[2] is factors
        other = torch.randn(1, 256, 64, 64)
        model.decode(other, boxes=prompts[0])
        assert decoder._factors[2] is None and decoder._factors[0]() is other
        # changed weights are noticed, in any block
        model.decode(other, boxes=prompts[0])
        first = decoder._factors[2]
        assert first is not None
        with torch.no_grad():
            model.mask_decoder.transformer.layers[1].norm4.weight.mul_(1.5)
        model.decode(other, boxes=prompts[0])
        assert decoder._factors[2] is None
    assert "_factors" in decoder.__dict__ and decoder.__getstate__()["_factors"] is None


def _perturbed_lite_medsam(seed: int) -> nn.Module:
    """LiteMedSAM's architecture with every decoder weight, LayerNorm affine and bias nonzero and random."""
    torch.manual_seed(seed)
    model = build("lite_medsam").eval()
    with torch.no_grad():
        for parameter in model.mask_decoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", ["box", "boxes", "points", "box+points"])
def test_factored_transformer_matches_the_plain_decoder(prompt: str, multimask: bool) -> None:
    """The factored image side (second prompt on) gives the plain decoder's logits and IoU."""
    model = _perturbed_lite_medsam(7)
    embedding = torch.randn(1, 256, 64, 64) * 2
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [50.0, 60.0, 200.0, 250.0], [0, 0, 255, 255]])
    points = (torch.tensor([[[30.0, 40.0], [90.0, 100.0]]] * 3), torch.tensor([[1.0, 0.0]] * 3))
    kwargs = {
        "box": {"boxes": boxes[:1]},
        "boxes": {"boxes": boxes},
        "points": {"points": points},
        "box+points": {"boxes": boxes, "points": points},
    }[prompt]
    decoder = model.mask_decoder
    with torch.inference_mode():
        with fused_kernels(False):
            plain = model.decode(embedding, multimask_output=multimask, **kwargs)
        model.decode(embedding, multimask_output=multimask, **kwargs)  # first prompt: plain path
        factored = model.decode(embedding, multimask_output=multimask, **kwargs)
        assert decoder._factors is not None and decoder._factors[2] is not None
    for a, b in zip(factored, plain, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def test_factored_layer_norm_equals_materialised_rows() -> None:
    """FactoredRows.layer_norm and .linear against the same rows materialised, two blocks deep."""
    from samadapt.modeling.factored import FactoredRows, ImageFactors

    torch.manual_seed(3)
    count, chans, batch = 50, 32, 2
    keys, pe = torch.randn(count, chans) * 3 + 1, torch.randn(count, chans)
    rows = FactoredRows.start(ImageFactors(keys, pe), batch)
    dense = keys.expand(batch, -1, -1)
    for depth in range(2):
        out = nn.Linear(16, chans)
        norm = nn.LayerNorm(chans)
        with torch.no_grad():
            norm.weight.normal_(1, 0.3)
            norm.bias.normal_(0, 0.3)
        coef = torch.rand(batch, 4 * 3, count).softmax(dim=1)
        values = torch.randn(batch, 4, 3, 4)  # 4 heads of 3 tokens, head dim 4
        with torch.no_grad():
            rows = rows.add(coef, values, out).layer_norm(norm)
            heads_out = torch.stack(
                [coef[b].T @ torch.block_diag(*values[b]) @ out.weight.T + out.bias for b in range(batch)]
            )
            dense = norm(dense + heads_out)
            weight, bias = torch.randn(8, chans), torch.randn(8)
            got = rows.linear(weight, bias, name=("test", depth))
        assert (got - (dense @ weight.T + bias)).abs().max().item() < 1e-4 * dense.abs().max().item() * 10


def test_factored_decoder_on_real_weights_and_a_real_slice() -> None:
    """LiteMedSAM on the bundled CT slice: the second prompt (factored) gives the first's (plain) mask."""
    from importlib import resources

    import numpy as np

    from samadapt import Predictor, load_model
    from samadapt.domains.images import read_image
    from samadapt.weights import verified_default_checkpoint

    predictor = Predictor(load_model(verified_default_checkpoint()), device="cpu", precision="fp32")
    predictor.set_image(read_image(resources.files("samadapt.assets") / "demo_ct.png"))
    boxes = np.array([[97, 188, 269, 355], [300, 200, 420, 330]])  # the liver, and tissue to its side
    first = predictor.predict(boxes=boxes, multimask_output=True)
    assert predictor.model.mask_decoder._factors[2] is None  # the first prompt ran the plain path
    second = predictor.predict(boxes=boxes, multimask_output=True)
    assert predictor.model.mask_decoder._factors[2] is not None
    assert (second.low_res_logits - first.low_res_logits).abs().max().item() < 1e-3
    assert np.abs(second.scores - first.scores).max() < 1e-4
    assert first.masks.sum() > 1000 and (second.masks != first.masks).mean() < 1e-4
