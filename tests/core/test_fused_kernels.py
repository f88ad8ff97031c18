"""oneDNN's fused CPU kernels run exactly where they should, and give the plain path's numbers.

The profiler proves which path ran: ``mkldnn::_linear_pointwise`` (ViT/TinyViT linears, GELU fused)
and ``mkldnn::_convolution_pointwise`` (TinyViT conv + folded BN + GELU / residual) must appear at
inference and must not appear with autograd on, with the switch off, with oneDNN disabled, or while
TorchScript records the model.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import samadapt.modeling
from samadapt import build
from samadapt.modeling import TinyViT, fused_kernels, set_fused_kernels
from samadapt.modeling.common import MLPBlock, linear, use_fused_cpu_kernels

LINEAR_OP = "mkldnn::_linear_pointwise"
CONV_OP = "mkldnn::_convolution_pointwise"
HAS_LINEAR = hasattr(torch.ops.mkldnn, "_linear_pointwise")
HAS_CONV = hasattr(torch.ops.mkldnn, "_convolution_pointwise")
needs_linear = pytest.mark.skipif(
    not HAS_LINEAR, reason="this PyTorch build has no mkldnn::_linear_pointwise"
)
needs_both = pytest.mark.skipif(
    not (HAS_LINEAR and HAS_CONV), reason="this PyTorch build lacks mkldnn's fused linear/conv ops"
)


def fused_ops(fn: Callable[[], object]) -> set[str]:
    """Run ``fn`` under the CPU profiler; the names of the fused oneDNN ops it called."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if LINEAR_OP in e.key or CONV_OP in e.key}


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial weights and BatchNorm statistics, so the fused and plain paths have work to agree on."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    """The ``tiny`` variant's ViT encoder (128 input, 32-dim, 2 blocks)."""
    return _randomize(build("tiny").image_encoder, seed=0)


@pytest.fixture(scope="module")
def tinyvit() -> nn.Module:
    """A small TinyViT at 64 (every stage of LiteMedSAM's structure, a fraction of its width)."""
    model = TinyViT(
        img_size=64,
        embed_dims=(16, 32, 32, 320),  # 320: the last patch merge keeps stride 1, as in TinyViT-5M
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 4),
        window_sizes=(4, 4, 4, 4),
        out_chans=32,
    )
    return _randomize(model, seed=1)


@pytest.fixture(autouse=True)
def _switch_on():
    """Every test starts and ends with the process-wide switch in its default (on) state."""
    set_fused_kernels(True)
    yield
    set_fused_kernels(True)


def _input(size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_switch_is_exported_from_samadapt_modeling() -> None:
    assert {"fused_kernels", "set_fused_kernels"} <= set(samadapt.modeling.__all__)
    assert not hasattr(samadapt.modeling.common, "FUSED_CPU_KERNELS")


@needs_both
def test_inference_runs_the_fused_ops(vit: nn.Module, tinyvit: nn.Module) -> None:
    with torch.inference_mode():
        assert fused_ops(lambda: vit(_input(128))) == {LINEAR_OP}
        assert fused_ops(lambda: tinyvit(_input(64))) == {LINEAR_OP, CONV_OP}
    with torch.no_grad():
        assert fused_ops(lambda: tinyvit(_input(64))) == {LINEAR_OP, CONV_OP}


@needs_both
@pytest.mark.parametrize("case", ["grad", "switch", "context", "mkldnn-off"])
def test_fused_ops_do_not_run(case: str, vit: nn.Module, tinyvit: nn.Module) -> None:
    def run() -> None:
        vit(_input(128))
        tinyvit(_input(64))

    if case == "grad":  # eval mode, but autograd on (fine-tuning a frozen encoder, say)
        assert fused_ops(run) == set()
        return
    with torch.inference_mode():
        if case == "switch":
            set_fused_kernels(False)
            assert fused_ops(run) == set()
        elif case == "context":
            with fused_kernels(False):
                assert fused_ops(run) == set()
            assert fused_ops(run) == {LINEAR_OP, CONV_OP}  # restored on the way out
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # flags() also sets oneDNN's TF32 switch, and warns about it
                with torch.backends.mkldnn.flags(enabled=False):
                    assert fused_ops(run) == set()
            assert fused_ops(run) == {LINEAR_OP, CONV_OP}


@needs_both
@pytest.mark.parametrize("name", ["vit", "tinyvit"])
def test_torchscript_trace_records_plain_ops(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    x = _input(128 if name == "vit" else 64)
    traced: list[torch.jit.ScriptModule] = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and tracer warnings
        # check_trace=False: the check re-runs the model eagerly, where fusion is right and would show
        assert fused_ops(lambda: traced.append(torch.jit.trace(model, x, check_trace=False))) == set()
        assert fused_ops(lambda: traced[0](x)) == set()
        expected = model(x)
    assert CONV_OP not in str(traced[0].graph) and LINEAR_OP not in str(traced[0].graph)
    torch.testing.assert_close(traced[0](x), expected, atol=1e-4, rtol=1e-4)


class _SubLinear(nn.Linear):
    """A Linear subclass (as an adapter might define): its own forward must run."""


class _Wrapped(nn.Module):
    """A LoRA-style wrapper around a Linear: base output plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


@needs_linear
def test_only_a_plain_linear_is_fused() -> None:
    torch.manual_seed(0)
    plain = nn.Linear(8, 16)
    sub = _SubLinear(8, 16)
    wrapped = _Wrapped(nn.Linear(8, 16))
    x = torch.randn(32, 8)  # more than a handful of rows: see the next test
    with torch.inference_mode():
        assert fused_ops(lambda: linear(plain, x, "gelu")) == {LINEAR_OP}
        assert fused_ops(lambda: linear(sub, x, "gelu")) == set()
        assert fused_ops(lambda: linear(wrapped, x, "gelu")) == set()
        torch.testing.assert_close(linear(wrapped, x, "relu"), torch.relu(wrapped(x)))


@needs_linear
def test_a_few_prompt_tokens_through_a_small_weight_run_f_linear() -> None:
    """7 rows through <= 256 x 256 weights skip oneDNN (its set-up costs more there); wider ones keep it."""
    torch.manual_seed(0)
    tokens = torch.randn(1, 7, 256)
    small, wide = nn.Linear(256, 256), nn.Linear(256, 2048)
    with torch.inference_mode():
        assert fused_ops(lambda: linear(small, tokens)) == set()
        assert fused_ops(lambda: linear(wide, tokens)) == {LINEAR_OP}
        assert fused_ops(lambda: linear(small, torch.randn(1, 64, 256))) == {LINEAR_OP}
        torch.testing.assert_close(linear(small, tokens, "gelu"), torch.nn.functional.gelu(small(tokens)))


@needs_linear
def test_an_adapter_wrapped_mlp_layer_runs_its_own_forward() -> None:
    torch.manual_seed(0)
    block = MLPBlock(8, 16).eval()
    block.lin1 = _Wrapped(block.lin1)  # type: ignore[assignment]
    x = torch.randn(32, 8)  # enough rows for oneDNN (a handful would run F.linear anyway)
    with torch.inference_mode():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = block(x)
        calls = sum(e.count for e in prof.key_averages() if LINEAR_OP in e.key)
        assert calls == 1  # lin2 only: the wrapped lin1 ran its own forward
        with fused_kernels(False):
            torch.testing.assert_close(out, block(x))


def test_capture_guards(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2, 2)
    with torch.inference_mode():
        assert use_fused_cpu_kernels(x)
        assert not use_fused_cpu_kernels(torch.zeros(2, 2, device="meta"))
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            assert not use_fused_cpu_kernels(x)
        with monkeypatch.context() as m:
            m.setattr(torch.jit, "is_scripting", lambda: True)
            assert not use_fused_cpu_kernels(x)
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "torch.onnx", SimpleNamespace(is_in_onnx_export=lambda: True))
            assert not use_fused_cpu_kernels(x)
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "torch.onnx", SimpleNamespace())  # an exporter without the flag
            assert use_fused_cpu_kernels(x)


def test_context_manager_restores_the_previous_value() -> None:
    x = torch.zeros(1)
    with torch.inference_mode():
        set_fused_kernels(False)
        with fused_kernels(True):
            assert use_fused_cpu_kernels(x)
            with pytest.raises(RuntimeError), fused_kernels(False):
                raise RuntimeError
            assert use_fused_cpu_kernels(x)
        assert not use_fused_cpu_kernels(x)


@needs_both
@pytest.mark.parametrize(("name", "atol"), [("vit", 1e-5), ("tinyvit", 1e-4)])
def test_fused_and_plain_outputs_agree(name: str, atol: float, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    x = _input(128 if name == "vit" else 64, seed=3)
    results: dict[str, torch.Tensor] = {}
    expected = {LINEAR_OP} if name == "vit" else {LINEAR_OP, CONV_OP}
    with torch.inference_mode():
        assert fused_ops(lambda: results.setdefault("fused", model(x))) == expected
        with fused_kernels(False):
            assert fused_ops(lambda: results.setdefault("plain", model(x))) == set()
    fused, plain = results["fused"], results["plain"]
    assert plain.abs().max().item() > 0.1  # not trivially zero
    assert (fused - plain).abs().max().item() <= atol
