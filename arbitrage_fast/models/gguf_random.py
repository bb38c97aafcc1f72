"""Random GGUF quantized blocks of the packed types, for the kernels' benchmarks and tests.

A kernel's speed does not depend on the values it multiplies, and its correctness is checked
against its torch twin on any values, so neither needs a real file. Every byte is random
except the fp16 scales, which are drawn finite and of a chosen size: random bits would often
be NaN or huge, and a NaN block is a corrupt tensor, not a test of the arithmetic.
"""
from __future__ import annotations

import torch

from . import gguf_ops


def random_blocks(qtype: int, rows: int, in_features: int, gen: torch.Generator, scale: float = 0.02) -> torch.Tensor:
    """[rows, row_bytes] uint8 blocks of ggml type `qtype` holding a [rows, in_features] weight.
    scale: the largest block scale d (weights reach d * the format's largest integer)."""
    elems, size = gguf_ops.block_shape(qtype)
    if in_features % elems:
        raise ValueError(f"in_features={in_features} is not a whole number of {elems}-input blocks "
                         f"of ggml type {qtype}")
    n = in_features // elems
    blocks = torch.randint(0, 256, (rows, n, size), dtype=torch.uint8, generator=gen)
    for i, off in enumerate(gguf_ops.SCALE_OFFSETS[qtype]):
        # d > 0; a min (second field) of either sign, as Q4_1/Q5_1 store it.
        d = (torch.rand(rows, n, generator=gen) * 0.95 + 0.05) * scale
        if i:
            d = d * torch.where(torch.rand(rows, n, generator=gen) < 0.5, -1.0, 1.0)
        blocks[:, :, off:off + 2] = d.to(torch.float16).view(torch.uint8).reshape(rows, n, 2)
    return blocks.reshape(rows, n * size)
