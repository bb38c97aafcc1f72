"""Quantize a loaded decoder's linear layers in place (`EngineConfig(draft_quant=...)`).

Every projection of every decoder layer (q/k/v, o, gate/up, down) is quantized by
`group_quant.quantize`. The layers keep their interface, so the runner, the arena and the
policies see the same model:

- on CPU an int8 or int4 layer becomes a `QuantizedLinear` over GGUF Q8_0 / Q4_1 blocks with
  the same values (`group_quant.to_gguf_blocks`), run by the GGUF kernels, and an int3 layer an
  `Int3Linear` over the engine's 3-bit blocks (`group_quant.to_int3_blocks`, 3.5 bits a weight
  at group 64), run by its own kernel; both round their input to int8 per 32 values as the
  32-input GGUF formats do;
- elsewhere it becomes a `GroupQuantLinear` over the engine's own layout, multiplied by the
  Triton kernel on CUDA (`triton_kernels/quant_matmul.py`).

The LM head is quantized too on CPU, but to Q8_0 (8 bits per weight and a scale per 32)
whatever the layers' format, as llama.cpp keeps a model's output tensor at 6 bits or more: its
errors land on the logits directly. It is a large share of what a decode token reads (the
1.5B's head is 467 MB in bf16 against its layers' 819 MB as Q4_1), and Q8_0 halves it. A tied
embedding table becomes a `QuantizedEmbedding` over the same blocks, so the bf16 table is
freed. Elsewhere the head and embeddings keep the checkpoint's dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from . import int3_blocks
from .group_quant import Q8_0, QuantScheme, quantize, to_gguf_blocks, to_int3_blocks, to_q8_0
from .group_quant_linear import GroupQuantLinear
from .quantized_linear import QuantizedEmbedding, QuantizedLinear


class Int3Linear(nn.Module):
    """A linear layer whose int3 weight stays in the CPU's 3-bit blocks (`int3_blocks`)."""

    def __init__(self, blocks: torch.Tensor, group: int, in_features: int, bias: torch.Tensor | None,
                 name: str = "weight") -> None:
        """`name` names the layer in the error raised for corrupt or truncated blocks."""
        super().__init__()
        int3_blocks.check_blocks(blocks, group, in_features, name)
        # A buffer, not a parameter: uint8 blocks have no gradient and no float dtype to cast.
        self.register_buffer("blocks", blocks, persistent=False)
        self.group, self.in_features, self.out_features = group, in_features, blocks.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int3_blocks.int3_linear(x.reshape(-1, self.in_features), self.blocks, self.group)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The full weight in fp32 (for tests and inspection; the forward never builds it)."""
        return int3_blocks.int3_dequantize(self.blocks, self.group, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int3 blocks, group {self.group}")


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
            if child.weight.device.type == "cpu" and qw.bits == 3:
                layer: nn.Module = Int3Linear(to_int3_blocks(qw), qw.group, qw.in_features, bias, name)
            elif child.weight.device.type == "cpu":
                layer = QuantizedLinear([to_gguf_blocks(qw)], qw.in_features, bias)
            else:
                layer = GroupQuantLinear(qw, bias)
            setattr(module, child_name, layer)
            n += 1
    return n


@torch.no_grad()
def quantize_head(model: nn.Module) -> None:
    """On CPU, replace the LM head by Q8_0 blocks (and a tied embedding table by a lookup over
    the same blocks)."""
    head = model.lm_head
    if type(head) is not nn.Linear or head.weight.device.type != "cpu":
        return
    tied = model.embed_tokens.weight is head.weight
    blocks = to_q8_0(head.weight, "lm_head")
    model.lm_head = QuantizedLinear([(blocks, Q8_0)], head.in_features, None)
    if tied:
        model.embed_tokens = QuantizedEmbedding(blocks, Q8_0, head.in_features, head.weight.dtype)
