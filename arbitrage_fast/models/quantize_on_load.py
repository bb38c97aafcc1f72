"""Quantize a loaded decoder's linear layers in place (`EngineConfig(draft_quant=...)`).

Every projection of every decoder layer (q/k/v, o, gate/up, down) is quantized by
`group_quant.quantize`; the token embeddings and the LM head keep the checkpoint's dtype, as
most weight-only schemes leave them (the head's errors land directly on the logits, and an
embedding lookup reads only a few rows anyway). The layers keep their interface, so the runner,
the arena and the policies see the same model:

- on CPU a layer becomes a `QuantizedLinear` over GGUF Q8_0 / Q4_1 blocks with the same values
  (`group_quant.to_gguf_blocks`), run by the GGUF kernels, which round their input to int8 per
  32 values as every packed GGUF layer does;
- elsewhere it becomes a `GroupQuantLinear` over the engine's own layout, multiplied by the
  Triton kernel on CUDA (`triton_kernels/quant_matmul.py`).

On CPU int3 therefore has int3's values in int4's blocks: its accuracy, but int4's memory and
speed (there is no 3-bit CPU kernel).
"""
from __future__ import annotations

import torch
from torch import nn

from arbitrage_fast.triton_kernels.quant_matmul import quant_matmul

from .group_quant import GroupQuantized, QuantScheme, quantize, to_gguf_blocks
from .quantized_linear import QuantizedLinear


class GroupQuantLinear(nn.Module):
    """A linear layer whose weight stays packed in the engine's group-wise layout."""

    def __init__(self, qw: GroupQuantized, bias: torch.Tensor | None) -> None:
        super().__init__()
        # Buffers, not parameters: integer weights have no gradient and must not be cast.
        self.register_buffer("qweight", qw.qweight, persistent=False)
        self.register_buffer("scales", qw.scales, persistent=False)
        self.register_buffer("mins", qw.mins, persistent=False)
        self.bits, self.group = qw.bits, qw.group
        self.in_features, self.out_features = qw.in_features, qw.qweight.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()
        y = quant_matmul(x2, self.qweight, self.scales, self.mins, self.bits, self.group)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int{self.bits}" + ("" if self.bits == 8 else f" group {self.group}"))


@torch.no_grad()
def quantize_linears(model: nn.Module, scheme: QuantScheme) -> int:
    """Replace every nn.Linear inside `model.layers` by its quantized form; returns how many."""
    n = 0
    for prefix, module in model.layers.named_modules():
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            name = f"layers.{prefix}.{child_name}" if prefix else f"layers.{child_name}"
            qw = quantize(child.weight, scheme, name)
            bias = None if child.bias is None else child.bias.detach()
            if child.weight.device.type == "cpu":
                layer: nn.Module = QuantizedLinear([to_gguf_blocks(qw)], qw.in_features, bias)
            else:
                layer = GroupQuantLinear(qw, bias)
            setattr(module, child_name, layer)
            n += 1
    return n
