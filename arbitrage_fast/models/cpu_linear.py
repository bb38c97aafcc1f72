"""bf16 linear layers with their weights pre-packed for oneDNN, for batch-1 decode on CPU.

`F.linear` on a bf16 CPU tensor re-lays out its weight for oneDNN on every call; for the
matrix-vector products of decoding that reorder costs more than the product itself (2-4x
the time of the packed product on a 2-core AVX-512 machine). Packing once at load time
removes it. The packed product runs the same oneDNN kernel, so its output is bit-identical
to `F.linear`'s: `pack_linears` checks that on a probe input for every distinct layer shape
and leaves a layer unpacked when it is not (another CPU, another torch build), so greedy
outputs stay those of transformers.

Only bf16 on CPU: fp32 `F.linear` runs MKL, whose packed variant sums in another order.
`ARBITRAGE_FAST_PACK_LINEAR=0` turns packing off.
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


def packing_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    if os.environ.get(ENV, "1") == "0":
        return False
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
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
    """Replace every bf16 CPU nn.Linear in `model` by a PackedLinear; returns how many.

    A tied LM head gets its own packed copy (the embedding keeps the plain weight)."""
    if not any(packing_supported(p.device, p.dtype) for p in model.parameters()):
        return 0
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
