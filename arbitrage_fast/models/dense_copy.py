"""A 16-bit copy of a packed model's linear layers, for its wide forwards.

The packed kernels (GGUF blocks, quantized-on-load blocks) win where a forward is a few rows:
they read a quarter to half the bytes of a bf16 weight, and a decode token is bound by those
reads. Their integer products are compute-bound, though, so their cost grows with the rows, while
oneDNN's bf16 GEMM (or the engine's bf16 kernel where oneDNN has no native bf16) reads the weight
once for all rows: on a few CPU cores the packed weights are the faster for one decode row and
the slower for eight or for a prefill (RESULTS.md, "Packed weights with a 16-bit copy"). A server sees both kinds of
forward: decode iterations of a few rows and prefill chunks of hundreds.

`add_dense_copy(model, rows)` keeps the packed weights and adds, beside each packed layer, the
same layer over its weights dequantised to the model's dtype (packed for oneDNN as a float
checkpoint's are), and a dense LM head; a forward of at least `rows` tokens then runs the copy,
a narrower one the packed weights. The copy's values are the packed blocks' exactly (they are
dequantised, not re-read), so the two paths differ only by the packed path's int8 rounding of
its inputs: a row's output may depend on how wide its forward was, which is why batch-invariant
mode refuses the copy. It costs the dense model's memory on top of the packed one's.
"""
from __future__ import annotations

import torch
from torch import nn

from .cpu_linear import pack_linears
from .packed_layer import PackedLayer, projections_of
from .quantize_on_load import Int3Linear
from .quantized_linear import QuantizedLinear

PACKED = (QuantizedLinear, Int3Linear)


@torch.no_grad()
def _dense(linear: nn.Module, dtype: torch.dtype) -> nn.Module:
    if not isinstance(linear, PACKED):
        return linear  # already a float layer: the copy shares it
    dense = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    dense.weight = nn.Parameter(linear.dequantized_weight().to(dtype).contiguous(), requires_grad=False)
    if linear.bias is not None:
        dense.bias = nn.Parameter(linear.bias.to(dtype), requires_grad=False)
    return dense


def add_dense_copy(model: nn.Module, rows: int) -> int:
    """Give each layer of `model` (a LlamaDecoder with exact arithmetic off) that has packed
    linears a dense twin, and the LM head one if it is packed; forwards of at least `rows`
    tokens (logits of at least `rows` rows) run them. Returns how many modules got a copy, the
    head counted as one (0: nothing packed, nothing changed)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"dense rows must be a positive integer, got {rows!r}")
    dtype = model.norm.weight.dtype
    layers = [layer for layer in model.layers
              if layer.one_op is not None and any(isinstance(p, PACKED) for p in projections_of(layer))]
    head_packed = isinstance(model.lm_head, PACKED)
    if not layers and not head_packed:
        return 0
    copies = nn.ModuleList(nn.ModuleList(_dense(p, dtype) for p in projections_of(layer)) for layer in layers)
    head = nn.ModuleList([_dense(model.lm_head, dtype)] if head_packed else [])
    # One pass for the whole copy, as at load: each distinct shape's packing is checked once.
    pack_linears(nn.ModuleList([copies, head]))
    for layer, copy in zip(layers, copies):
        layer.wide_op = PackedLayer(layer, tuple(copy))
    model.dense_head = head[0] if head_packed else None
    model.dense_rows = rows
    return len(layers) + head_packed
