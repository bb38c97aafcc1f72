"""Linear and embedding layers over the engine's group-wise layout (`group_quant`), multiplied
by the Triton kernel on CUDA and by its torch twin elsewhere (`triton_kernels/quant_matmul.py`).

A layer holds its weight as parts stacked along the output dimension, as `QuantizedLinear`
does for GGUF blocks on the CPU: a GGUF's fused projections join tensors of different types (a
Q4_K_M file keeps v in Q6_K beside a Q4_K q and k), which repack to different bit widths and
groups. Neighbouring parts of one kind are concatenated (rows are independent, so this is
exact) and cost one kernel call; a dense part (a float tensor of the file, or a type without a
repacking) is an F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arbitrage_fast.triton_kernels.quant_matmul import dequantize_reference, quant_matmul

from .group_quant import GroupQuantized

Part = GroupQuantized | torch.Tensor  # a packed part, or a dense [rows, in_features] weight


def _kind(part: Part) -> tuple | None:
    if isinstance(part, torch.Tensor):
        return None
    dtype = lambda t: None if t is None else t.dtype  # noqa: E731
    return part.bits, part.group, dtype(part.scales), dtype(part.mins)


def _cat(parts: list[Part]) -> Part:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
    return GroupQuantized(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), mins,
                          parts[0].bits, parts[0].group, parts[0].in_features)


class GroupQuantLinear(nn.Module):
    """x @ W.T + b with W kept packed in the engine's group-wise layout."""

    def __init__(self, parts: Part | list[Part], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        parts = parts if isinstance(parts, list) else [parts]
        if not parts:
            raise ValueError("a GroupQuantLinear needs at least one part")
        widths = {p.shape[1] if isinstance(p, torch.Tensor) else p.in_features for p in parts}
        if len(widths) != 1:
            raise ValueError(f"the parts of one layer must share in_features, got {sorted(widths)}")
        runs: list[list[Part]] = []
        for p in parts:
            if runs and _kind(runs[-1][0]) == _kind(p):
                runs[-1].append(p)
            else:
                runs.append([p])
        self.kinds: list[tuple[int, int] | None] = []
        for i, run in enumerate(map(_cat, runs)):
            # Buffers, not parameters: integer weights have no gradient and must not be cast.
            if isinstance(run, torch.Tensor):
                self.register_buffer(f"weight{i}", run, persistent=False)
                self.kinds.append(None)
                continue
            self.register_buffer(f"qweight{i}", run.qweight, persistent=False)
            self.register_buffer(f"scales{i}", run.scales, persistent=False)
            self.register_buffer(f"mins{i}", run.mins, persistent=False)
            self.kinds.append((run.bits, run.group))
        self.in_features = widths.pop()
        self.out_features = sum(p.shape[0] if isinstance(p, torch.Tensor) else p.qweight.shape[0] for p in parts)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()
        b = self._buffers
        outs = [F.linear(x2, b[f"weight{i}"]) if kind is None
                else quant_matmul(x2, b[f"qweight{i}"], b[f"scales{i}"], b[f"mins{i}"], *kind)
                for i, kind in enumerate(self.kinds)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The full weight in fp32 (for tests and inspection; the forward never builds it)."""
        b = self._buffers
        return torch.cat([b[f"weight{i}"].float() if kind is None else
                          dequantize_reference(b[f"qweight{i}"], b[f"scales{i}"], b[f"mins{i}"], *kind, self.in_features)
                          for i, kind in enumerate(self.kinds)])

    def extra_repr(self) -> str:
        kinds = "+".join("dense" if k is None else f"int{k[0]}" + ("" if k[0] == 8 and k[1] >= self.in_features
                                                                    else f" group {k[1]}") for k in self.kinds)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {kinds}"


class GroupQuantEmbedding(nn.Module):
    """Token embeddings looked up from a group-wise packed table: only the rows a batch reads
    are dequantised, so the table stays packed (and a tied LM head shares it)."""

    def __init__(self, table: GroupQuantized, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("qweight", table.qweight, persistent=False)
        self.register_buffer("scales", table.scales, persistent=False)
        self.register_buffer("mins", table.mins, persistent=False)
        self.bits, self.group, self.dtype = table.bits, table.group, dtype
        self.num_embeddings, self.embedding_dim = table.qweight.shape[0], table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        pick = lambda t: None if t is None else t.index_select(0, flat)  # noqa: E731
        rows = dequantize_reference(pick(self.qweight), pick(self.scales), pick(self.mins), self.bits, self.group,
                                    self.embedding_dim)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits} group {self.group}"
