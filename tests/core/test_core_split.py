"""The core split adapters plug into: prompts -> embeddings -> decoding, batched training forward,
block extension points, qkv layouts, other input sizes, features kept by the predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import samadapt
from samadapt import Predictor
from samadapt.errors import InputError
from samadapt.modeling import EncoderOutput, PromptBatch
from samadapt.modeling.image_encoder_vit import Attention, Block
from samadapt.modeling.tiny_vit import TinyAttention, TinyViTBlock


@pytest.fixture
def tiny() -> samadapt.SamModel:
    torch.manual_seed(0)
    return samadapt.build("tiny").eval()


def test_embed_then_decode_equals_decode(tiny) -> None:
    emb = torch.randn(1, 32, 8, 8)
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [5.0, 5.0, 100.0, 90.0]])
    with torch.no_grad():
        whole = tiny.decode(emb, boxes=boxes, multimask_output=True)
        sparse, dense = tiny.embed_prompts(boxes=boxes)
        split = tiny.decode_embeddings(emb, sparse, dense, multimask_output=True)
    assert whole[0].shape == (2, 3, 32, 32)
    torch.testing.assert_close(whole[0], split[0])
    torch.testing.assert_close(whole[1], split[1])


def test_forward_batch_matches_per_image_decoding_and_is_differentiable(tiny) -> None:
    images = torch.rand(2, 3, 128, 128)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0], [20.0, 30.0, 90.0, 100.0], [0.0, 0.0, 127.0, 127.0]])
    index = torch.tensor([1, 0, 1])
    tiny.train()
    logits, iou = tiny.forward_batch(images, PromptBatch(boxes=boxes, image_index=index))
    assert logits.shape == (3, 1, 32, 32) and iou.shape == (3, 1)
    logits.sum().backward()
    assert tiny.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0  # gradients reach the encoder
    tiny.eval()
    with torch.no_grad():
        embeddings = tiny.encode(images).embedding
        for row, image in enumerate(index.tolist()):
            single = tiny.decode(embeddings[image : image + 1], boxes=boxes[row : row + 1])[0]
            torch.testing.assert_close(
                tiny.forward_batch(images, PromptBatch(boxes=boxes, image_index=index))[0][row],
                single[0],
                atol=1e-5,
                rtol=1e-5,
            )


def test_points_batch_needs_labels() -> None:
    with pytest.raises(InputError):
        PromptBatch(points=torch.zeros(1, 1, 2))


class _Recorder(nn.Module):
    """Wraps an attention or MLP, counting calls and checking the shape is unchanged."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        assert out.shape == x.shape
        self.shapes.append(tuple(x.shape))
        return out


@pytest.mark.parametrize("variant", ["tiny", "lite_medsam"])
def test_attention_and_mlp_are_wrappable_in_every_block(variant: str) -> None:
    model = samadapt.build(variant).eval()
    blocks = [m for m in model.image_encoder.modules() if isinstance(m, (Block, TinyViTBlock))]
    image = torch.rand(1, 3, model.input_size, model.input_size)
    with torch.no_grad():
        before = model.encode(image).embedding
    wrappers = []
    for block in blocks:
        block.attn = _Recorder(block.attn)
        block.mlp = _Recorder(block.mlp)
        wrappers += [block.attn, block.mlp]
    with torch.no_grad():
        after = model.encode(image).embedding
    torch.testing.assert_close(before, after)  # a wrapper that changes nothing changes nothing
    assert all(len(w.shapes) == 1 for w in wrappers)
    if variant == "tiny":  # windowed ViT blocks still see the whole (B, H, W, D) grid
        assert {w.shapes[0] for w in wrappers} == {(1, 8, 8, 32)}


def test_vit_qkv_layout_is_q_k_v_thirds() -> None:
    attn = Attention(dim=12, num_heads=3, use_rel_pos=False)
    rows = {p: attn.qkv_rows(p) for p in "qkv"}
    assert rows["q"].tolist() == list(range(12)) and rows["v"].tolist() == list(range(24, 36))
    x = torch.randn(1, 2, 2, 12)
    out = attn.qkv(x).reshape(1, 4, 3, 3, 4)  # (B, N, part, heads, hd): how attend() reads it
    for part, index in rows.items():
        expected = out[:, :, "qkv".index(part)].reshape(1, 4, 12)
        torch.testing.assert_close(attn.qkv(x).reshape(1, 4, 36)[..., index], expected)


def test_tiny_vit_qkv_layout_is_per_head() -> None:
    attn = TinyAttention(dim=20, key_dim=4, num_heads=5, resolution=(2, 2))
    x = torch.randn(1, 4, 20)
    out = attn.qkv(x)  # (1, 4, 5 * 12)
    per_head = out.view(1, 4, 5, -1)  # how attend() reads it: [q | k | v] inside each head
    q, k, v = per_head.split([4, 4, 4], dim=3)
    for part, expected in zip("qkv", (q, k, v), strict=True):
        torch.testing.assert_close(out[..., attn.qkv_rows(part)], expected.reshape(1, 4, 20))


def test_vit_core_runs_at_another_input_size(tiny) -> None:
    image = torch.rand(1, 3, 256, 256)
    tiny.set_input_size(256)
    assert tiny.profile.input_size == 256 and tiny.prompt_encoder.image_embedding_size == (16, 16)
    with torch.no_grad():
        logits, _ = tiny(image, boxes=torch.tensor([[20.0, 20.0, 200.0, 200.0]]))
    assert logits.shape == (1, 1, 64, 64)
    pe = tiny.image_encoder.position_embedding((16, 16))
    assert pe.shape == (1, 16, 16, 32)
    assert tiny.image_encoder.position_embedding((8, 8)) is tiny.image_encoder.pos_embed


def test_tiny_vit_core_refuses_another_input_size() -> None:
    with pytest.raises(InputError, match="only ViT"):
        samadapt.build("lite_medsam").set_input_size(512)


class _FeatureDecoder(nn.Module):
    """A decoder replacement that uses an intermediate encoder feature (as DeSAM's PIMM does)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[int] = []

    def forward(
        self,
        *,
        image_embeddings,
        image_pe,
        sparse_prompt_embeddings,
        dense_prompt_embeddings,
        multimask_output,
        features,
    ):
        self.seen.append(len(features))
        logits, iou = self.inner(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings,
            multimask_output=multimask_output,
        )
        return logits + features[0].mean(), iou


def test_predictor_caches_requested_features_for_a_replacement_decoder(tiny) -> None:
    tiny.require_features([0])
    tiny.mask_decoder = _FeatureDecoder(tiny.mask_decoder)
    predictor = Predictor(tiny, precision="fp32")
    emb = predictor.set_image(np.random.default_rng(0).integers(0, 255, (100, 120), dtype=np.uint8))
    assert len(emb.features) == 1 and emb.features[0].shape == (1, 8, 8, 32)
    result = predictor.predict(boxes=[[10, 10, 80, 60], [5, 5, 50, 50]])
    assert result.masks.shape == (2, 1, 100, 120)
    assert tiny.mask_decoder.seen == [1]


class _ConstantGenerator(nn.Module):
    """A prompt generator (AutoSAM-like): dense embedding from the encoder output, no sparse."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, encoded: EncoderOutput):
        self.calls += 1
        batch = encoded.embedding.shape[0]
        return encoded.embedding.new_zeros(batch, 0, 32), encoded.embedding * 0.5


def test_prompt_generator_is_used_without_prompts(tiny) -> None:
    predictor = Predictor(tiny, precision="fp32")
    predictor.set_image(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(InputError, match="give a prompt"):
        predictor.predict()
    tiny.prompt_generator = _ConstantGenerator()
    result = predictor.predict()
    assert result.masks.shape == (1, 1, 64, 64) and tiny.prompt_generator.calls == 1


def test_predictor_restores_the_callers_training_flag(tiny) -> None:
    tiny.train()
    tiny.prompt_encoder.eval()  # mixed flags come back module by module
    before = {name: module.training for name, module in tiny.named_modules()}
    seen: list[bool] = []
    tiny.mask_decoder.transformer.register_forward_hook(lambda module, *_: seen.append(module.training))
    predictor = Predictor(tiny, precision="fp32")
    predictor.set_image(np.zeros((32, 32), dtype=np.uint8))
    predictor.predict(boxes=[2, 2, 20, 20])
    assert seen == [False]  # the call itself ran in eval mode
    assert {name: module.training for name, module in tiny.named_modules()} == before
    assert tiny.training and not tiny.prompt_encoder.training


@pytest.mark.parametrize("variant", ["tiny", "lite_medsam"])
def test_activation_checkpointing_gives_the_same_gradients(variant: str) -> None:
    torch.manual_seed(0)
    model = samadapt.build(variant).train()
    image = torch.rand(1, 3, model.input_size, model.input_size)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.image_encoder.activation_checkpointing = checkpointing
        model.encode(image).embedding.square().mean().backward()
        grads.append(next(model.image_encoder.parameters()).grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
