"""Small layers shared by the encoders and the decoder."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W); any number of trailing spatial axes (3D: (B, C, X, Y, Z))."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        per_channel = (-1,) + (1,) * (x.ndim - 2)  # (C, 1, 1) or (C, 1, 1, 1)
        return self.weight.view(per_channel) * x + self.bias.view(per_channel)


_fused_kernels_enabled = True


def all_modules(root: nn.Module) -> list[nn.Module]:
    """``root`` and every module under it, like ``root.modules()`` but without names or de-duplication.

    Per-prompt code walks the model with this: ``Module.modules()`` builds a name and a memo for each
    of LiteMedSAM's ~300 modules (about 0.2 ms a walk against 0.05 ms here). A module shared by two
    parents comes twice.
    """
    found: list[nn.Module] = []
    stack = [root]
    while stack:
        module = stack.pop()
        found.append(module)
        stack.extend(child for child in module._modules.values() if child is not None)
    return found


def all_parameters(root: nn.Module) -> list[torch.Tensor]:
    """The parameters of :func:`all_modules` (a shared one may come twice)."""
    return [p for m in all_modules(root) for p in m._parameters.values() if p is not None]


def set_fused_kernels(enabled: bool) -> None:
    """Turn oneDNN's fused CPU inference kernels on or off for the whole process (on by default).

    Off, every layer runs its plain PyTorch op: useful to compare results or to rule the fusion out
    when debugging. See :func:`fused_kernels` for a scoped switch.
    """
    global _fused_kernels_enabled
    _fused_kernels_enabled = bool(enabled)


@contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, fused CPU kernels are ``enabled``; the previous setting is restored after.

    Example:
        >>> with fused_kernels(False):
        ...     plain = model.image_encoder(x)
    """
    previous = _fused_kernels_enabled
    set_fused_kernels(enabled)
    try:
        yield
    finally:
        set_fused_kernels(previous)


def _capturing_graph() -> bool:
    """True while TorchScript, torch.compile or an ONNX export records the model: they need plain ops."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return True
    onnx = sys.modules.get("torch.onnx")  # an export in progress has imported it; never import it here
    check = getattr(onnx, "is_in_onnx_export", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # a torch without the legacy exporter's flag
        return False


def use_fused_cpu_kernels(x: torch.Tensor) -> bool:
    """Whether to run oneDNN's fused kernels for ``x``.

    True only when the switch (:func:`set_fused_kernels`) is on, ``torch.backends.mkldnn.enabled``
    is True (``torch.backends.mkldnn.flags(enabled=False)`` turns fusion off), ``x`` is on the CPU,
    autograd is off (``torch.no_grad``/``torch.inference_mode``), and no tracer, scripter, compiler
    or ONNX exporter is recording the model. Callers still check that the op exists in this build.
    """
    return (
        _fused_kernels_enabled
        and bool(torch.backends.mkldnn.enabled)  # a bool at run time; typed as torch's ContextProp
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not _capturing_graph()
    )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute in (bf16 under CPU autocast), else ``x``'s own."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _fused_linear(x: torch.Tensor) -> bool:
    """oneDNN's linear (+ activation) kernel for ``x``: CPU inference in fp32 or bf16, when it exists."""
    return (
        use_fused_cpu_kernels(x)
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and compute_dtype(x) in (torch.float32, torch.bfloat16)
    )


def linear(layer: nn.Module, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """``activation(layer(x))`` for ``activation`` in none/gelu/relu.

    A plain ``nn.Linear`` at inference on the CPU runs through oneDNN with the activation fused in:
    about twice as fast as ``F.linear`` for SAM's shapes on this kind of CPU, same result to float
    rounding. Any other module (an adapter's LoRA wrapper, say) is simply called.
    """
    if type(layer) is nn.Linear and _fused_linear(x) and not _few_rows_small_weight(x, layer.weight):
        return linear_weights(x, layer.weight, layer.bias, activation)
    y = layer(x)
    if activation == "gelu":
        return F.gelu(y)
    return F.relu(y) if activation == "relu" else y


def _few_rows_small_weight(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A handful of rows (the decoder's prompt tokens) through a weight of at most 256 x 256, in fp32.

    There oneDNN's per-call set-up outweighs the product: ``F.linear`` is 1.5-2.5x faster on this
    kind of CPU (7 x 256 rows: 32 vs 47 us for 256 x 256, 22 vs 55 us for 128 x 256); for wider
    weights (the token MLP's 2048) oneDNN stays faster.
    """
    return x.numel() <= 16 * x.shape[-1] and weight.numel() <= 65536 and compute_dtype(x) == torch.float32


def linear_weights(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"
) -> torch.Tensor:
    """``activation(x @ weight.T + bias)``, through oneDNN with the activation fused in when it can.

    For weights that are not an ``nn.Linear``'s (a transposed convolution's, rearranged): oneDNN at
    CPU inference in fp32/bf16 (see :func:`use_fused_cpu_kernels`), else ``F.linear``.
    """
    if _fused_linear(x):
        dtype = compute_dtype(x)
        bias = bias.to(dtype) if bias is not None else None
        algorithm = "none" if activation == "gelu" else ""
        return torch.ops.mkldnn._linear_pointwise(
            x.to(dtype), weight.to(dtype), bias, activation, [], algorithm
        )
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        return F.gelu(y)
    return F.relu(y) if activation == "relu" else y


def activation_name(act: nn.Module) -> str | None:
    """``gelu``/``relu`` for activations oneDNN can fuse, else None."""
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    return "relu" if type(act) is nn.ReLU else None


def sam_neck(in_chans: int, out_chans: int) -> nn.Sequential:
    """SAM's encoder neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (keys ``neck.0`` .. ``neck.3``)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=1, bias=False),
        LayerNorm2d(out_chans),
        nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_chans),
    )


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear, as in SAM's ViT blocks and two-way transformer."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = activation_name(self.act)
        if name is None:
            return self.lin2(self.act(self.lin1(x)))
        return linear(self.lin2, linear(self.lin1, x, name))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (mask decoder heads)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out, strict=True))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
