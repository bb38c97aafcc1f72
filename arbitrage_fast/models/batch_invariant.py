"""Batch invariance: a token row's output does not depend on the other rows of its forward.

Greedy output should not change because a request shares its forwards with others, or because
a speculative verification or a prefill feeds k tokens of one sequence at once instead of one
by one. Within a forward every op but two is computed row by row already: embedding lookups,
RoPE, the residual add + RMSNorm (its mean runs over one row's hidden dimension), SiLU·mul and
the greedy argmax. The two that can depend on the row count are:

- **attention.** A query inside a prefill chunk was computed over the chunk's longest key range
  with a causal mask, while the same query as a decode row attends over exactly its own keys:
  different reduction lengths, different rounding (on this project's CPU build, 144 of 332
  bf16 queries of a 300-token sequence differ). In batch-invariant mode every query attends
  over exactly its keys 0..pos (its window, for sliding-window layers) in a call of its own,
  the decode call, so a query's bits are the same in a decode batch, a prefill chunk or a
  verification (`PagedAttention`, selected per forward by `AttentionMetadata.batch_invariant`).
- **matrix products.** A GEMM library may pick another kernel, blocking or split of the inner
  dimension for another row count (MKL's fp32 product takes a GEMV path for one row, whose
  sums differ from the GEMM's; cuBLAS picks algorithms by shape). `make_batch_invariant`
  probes each linear layer of a model once, at load, with row blocks of several sizes and
  positions; a layer whose rows all equal their one-row products keeps its kernel, and any
  other is wrapped in `RowwiseLinear`, which multiplies one row at a time, the same [1, K]
  call for every row, which is invariant by construction.

What is measured on the project's CPU (torch 2.13, AVX2, MKL): bf16 `F.linear` rows are
invariant for every row count tried (1 to 300), so bf16 layers keep their kernel and the mode
costs only the per-query attention; fp32 `F.linear` is not (one row differs from the same row
among two or more), so fp32 layers go row by row. The packed GGUF product
(csrc/gguf_linear.cpp) quantizes each row's activations on their own and sums each output as
one row's dot product (in blocks of four rows or one, with the same per-row arithmetic), so it
is row-invariant by design; its probe confirms that, and its layers keep their kernel.

What is not guaranteed: the probe tries a few row counts, not all, so a library that changes
its arithmetic at an untried size could slip through (the model-level tests would show it);
verdicts hold for the thread count at load time. On CUDA the same scheme applies: cuBLAS
layers that fail the probe run one row at a time (a fixed-shape call, deterministic), the
Triton norm/activation/RoPE kernels run one program per row, and attention uses the per-query
SDPA call rather than the split-KV paged kernel, whose split count follows the batch. The CUDA
path has a test (marked gpu) but has not been run on a GPU. The chunked decoder (decode_chunk
!= 1, CUDA graphs) reads lengths only on the device and is refused with this mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Row blocks the probe compares against one-row products: sizes around SIMD widths and
# register tiles (2, 3, 8, 17), each taken from a different offset of the probe rows so
# that a row sits at another position of its block than in any other call.
PROBE_ROWS = (2, 3, 8, 17)


def is_linear(module: nn.Module) -> bool:
    """A linear layer of any kind (nn.Linear, the CPU-packed and quantized layers): what maps
    rows of in_features to rows of out_features. Known by its shape attributes, so a new kind
    of layer is probed too rather than silently trusted."""
    return (not isinstance(module, RowwiseLinear) and isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int))


class RowwiseLinear(nn.Module):
    """A linear layer applied one row at a time: every row goes through the same [1, K] call,
    whatever the number of rows around it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 1:
            return self.inner(x)
        out = torch.cat([self.inner(row) for row in rows.split(1)])
        return out.reshape(*x.shape[:-1], self.out_features)


@torch.inference_mode()
def rows_invariant(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `layer` gives each row of a block the bits of that row alone, for the block
    sizes and offsets in PROBE_ROWS (a check on this device and build, not a proof)."""
    n = max(PROBE_ROWS)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, layer.in_features, generator=gen).to(device=device, dtype=dtype)
    alone = torch.cat([layer(row) for row in x.split(1)])
    for m in PROBE_ROWS:
        start = (n - m) // 2
        if not torch.equal(layer(x[start:start + m]), alone[start:start + m]):
            return False
    return True


@dataclass
class InvariantLayers:
    """What `make_batch_invariant` did: layers that kept their kernel, layers made row-wise."""

    kept: int = 0
    rowwise: int = 0


def make_batch_invariant(model: nn.Module, dtype: torch.dtype) -> InvariantLayers:
    """Wrap in `RowwiseLinear` every linear layer of `model` whose rows depend on the row count.

    One probe per distinct kind and description of layer; `dtype` is the model's activation
    dtype. Calling it again changes nothing (wrapped layers are not probed twice)."""
    verdict: dict[tuple, bool] = {}
    done = InvariantLayers()
    for module in list(model.modules()):
        if isinstance(module, RowwiseLinear):
            continue
        for name, child in list(module.named_children()):
            if not is_linear(child):
                continue
            tensors = list(child.parameters()) + list(child.buffers())
            device = tensors[0].device if tensors else torch.device("cpu")  # a bias-free PackedLinear: CPU only
            # Its kind and description (shapes, bias, quantized formats): what picks a kernel.
            key = (type(child), child.in_features, child.out_features, child.extra_repr())
            if key not in verdict:
                verdict[key] = rows_invariant(child, dtype, device)
            if verdict[key]:
                done.kept += 1
            else:
                setattr(module, name, RowwiseLinear(child))
                done.rowwise += 1
    return done
