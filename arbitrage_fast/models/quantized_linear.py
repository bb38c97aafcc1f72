"""Linear and embedding layers whose weights stay in their GGUF blocks.

A GGUF file stores q, k and v (and gate and up) as separate tensors, often of different
types (a Q4_K_M file keeps v in Q6_K beside a Q4_K q and k), while the decoder runs them as
one fused projection. A `QuantizedLinear` therefore holds its weight as parts stacked along
the output dimension: neighbouring parts of one type are concatenated into one block tensor
(block rows are independent, so this is exact) and cost one kernel call; a part of another
type gets its own call, and the outputs are joined. A part of a type without a kernel is a
dense tensor dequantised at load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import gguf_ops

DENSE = -1  # the type tag of a part held as a dense (dequantised) tensor


class QuantizedLinear(nn.Module):
    def __init__(self, parts: list[tuple[torch.Tensor, int]], in_features: int,
                 bias: torch.Tensor | None = None) -> None:
        """parts: (weight, qtype) in output order; weight is uint8 blocks [rows, row_bytes]
        for a packed type, or a dense [rows, in_features] tensor with qtype DENSE."""
        super().__init__()
        merged: list[tuple[list[torch.Tensor], int]] = []
        for weight, qtype in parts:
            if merged and merged[-1][1] == qtype:
                merged[-1][0].append(weight)
            else:
                merged.append(([weight], qtype))
        self.qtypes = [qtype for _, qtype in merged]
        for i, (weights, _) in enumerate(merged):
            # Buffers, not parameters: uint8 blocks have no gradient and no float dtype to cast.
            self.register_buffer(f"weight{i}", weights[0] if len(weights) == 1 else torch.cat(weights),
                                 persistent=False)
        self.in_features = in_features
        self.out_features = sum(w.shape[0] for w, _ in parts)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def weights(self) -> list[tuple[torch.Tensor, int]]:
        return [(getattr(self, f"weight{i}"), q) for i, q in enumerate(self.qtypes)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        buffers = self._buffers  # this runs ~100 times a decode token: no per-part getattr
        outs = [F.linear(x2, buffers[f"weight{i}"]) if q == DENSE else gguf_ops.gguf_linear(x2, buffers[f"weight{i}"], q)
                for i, q in enumerate(self.qtypes)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The full weight in fp32 (for tests and inspection; the forward never builds it)."""
        return torch.cat([w.float() if q == DENSE else gguf_ops.gguf_dequantize(w, q, self.in_features)
                          for w, q in self.weights()])

    def extra_repr(self) -> str:
        kinds = "+".join("dense" if q == DENSE else gguf_ops.PACKED_TYPES[q] for q in self.qtypes)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {kinds}"


class QuantizedEmbedding(nn.Module):
    """Token embeddings looked up row by row from GGUF blocks: only the rows a batch reads
    are dequantised, so the table stays at its stored size."""

    def __init__(self, blocks: torch.Tensor, qtype: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("blocks", blocks, persistent=False)
        self.qtype, self.embedding_dim, self.dtype = qtype, embedding_dim, dtype
        self.num_embeddings = blocks.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks.index_select(0, ids.reshape(-1))
        out = gguf_ops.gguf_dequantize(rows, self.qtype, self.embedding_dim).to(self.dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {gguf_ops.PACKED_TYPES[self.qtype]}"
