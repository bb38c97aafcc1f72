"""bf16 linear layers on CPU, chosen at load: oneDNN pre-packed, or the engine's own kernel.

`F.linear` on a bf16 CPU tensor re-lays out its weight for oneDNN on every call; for the
matrix-vector products of decoding that reorder costs more than the product itself (2-4x
the time of the packed product on a 2-core AVX-512 machine). Where oneDNN runs bf16 natively
(AVX-512 BW/VL/DQ or AVX-NE-CONVERT), the weight is packed once at load time. The packed
product runs the same oneDNN kernel, so its output is bit-identical to `F.linear`'s:
`pack_linears` checks that on a probe input for every distinct layer shape and leaves a layer
unpacked when it is not (another CPU, another torch build), so greedy outputs stay those of
transformers.

Where it does not (AVX2-only CPUs), torch's bf16 matmul converts and multiplies row by row:
a batch of 8 decode rows costs 5-6x one row, so continuous batching gains little. There the
layers run `torch.ops.arbitrage_fast.bf16_linear` (csrc/bf16_linear.cpp) instead: the weight
is streamed once for every row of the batch, and each output is a dot product summed in an
order fixed by K alone, so a row gets the same bits alone, batched or inside a prefill. Its
sums are not F.linear's: about 1 output in 5,000 differs by one bf16 rounding step, which can
change a greedy bf16 token where two logits tie within that step (token-exactness against
transformers is claimed in float32; bf16 is compared with a tolerance).

Only bf16 on CPU: fp32 `F.linear` runs MKL, whose packed variant sums in another order.
`ARBITRAGE_FAST_PACK_LINEAR=0` keeps plain `F.linear` (the reference) everywhere.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ENV = "ARBITRAGE_FAST_PACK_LINEAR"


class PackedLinear(nn.Module):
    """A bias-optional linear whose weight lives only in oneDNN's packed layout."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int) -> None:
        super().__init__()
        self.packed = packed  # opaque mkldnn tensor: kept out of state_dict on purpose
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


class Bf16Linear(nn.Module):
    """A bias-optional bf16 linear computed by the engine's CPU kernel (row-invariant sums)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        if not weight.is_contiguous():
            raise ValueError("Bf16Linear needs a contiguous [out_features, in_features] weight")
        self.weight, self.bias = weight, bias  # the layer's own parameters (a tie stays a tie)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.arbitrage_fast.bf16_linear(x.reshape(-1, self.in_features), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, row-invariant kernel"


def _bf16_on_cpu(device: torch.device | str, dtype: torch.dtype) -> bool:
    return os.environ.get(ENV, "1") != "0" and torch.device(device).type == "cpu" and dtype == torch.bfloat16


def cpu_paths() -> list[str]:
    """The compiled bf16 kernel's code paths this CPU runs, best first ([] without the extension)."""
    try:
        from arbitrage_fast import _C  # also registers the op
    except ImportError:
        return []
    return list(_C.bf16_cpu_paths())


def kernel_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """The engine's bf16 kernel runs here vectorised: the extension was built with a vector path
    and this CPU runs it, as the kernel itself decides (`auto` takes the first of `cpu_paths`).
    The scalar path is the portable twin the vector one is tested against, not a fast path."""
    return _bf16_on_cpu(device, dtype) and any(path != "scalar" for path in cpu_paths())


def packing_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    if not _bf16_on_cpu(device, dtype):
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pack(linear: nn.Linear) -> PackedLinear:
    packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
    bias = None if linear.bias is None else linear.bias.detach()
    return PackedLinear(packed, bias, linear.in_features, linear.out_features)


@torch.no_grad()
def _matches(linear: nn.Linear, packed: PackedLinear) -> bool:
    """Bit-identical to F.linear on a decode row and on a small prefill block."""
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 7):
        x = torch.randn(rows, linear.in_features, generator=gen).to(linear.weight.dtype)
        if not torch.equal(F.linear(x, linear.weight, linear.bias), packed(x)):
            return False
    return True


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Replace every bf16 CPU nn.Linear in `model` by a PackedLinear, or by a Bf16Linear where
    oneDNN has no native bf16; returns how many.

    A tied LM head gets its own packed copy (the embedding keeps the plain weight); the
    kernel's layer shares the tied weight."""
    params = list(model.parameters())
    if not any(packing_supported(p.device, p.dtype) for p in params):
        if not any(kernel_supported(p.device, p.dtype) for p in params):
            return 0
        return _replace_with_kernel(model)
    verdict: dict[tuple, bool] = {}
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or not packing_supported(child.weight.device, child.weight.dtype):
                continue
            packed = pack(child)
            key = (tuple(child.weight.shape), child.bias is not None)
            if key not in verdict:
                verdict[key] = _matches(child, packed)
                if not verdict[key]:
                    log.warning("packed bf16 linear %s differs from F.linear here; left unpacked", key)
            if verdict[key]:
                setattr(module, child_name, packed)
                n += 1
    return n


def _replace_with_kernel(model: nn.Module) -> int:
    n = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and kernel_supported(child.weight.device, child.weight.dtype):
                setattr(module, child_name, Bf16Linear(child.weight, child.bias))
                n += 1
    return n
