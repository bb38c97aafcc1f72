"""Random GGUF quantized blocks for kernel tests: every byte random except the fp16 scales,
which are drawn finite and of a realistic size (random bits would often be NaN or huge)."""
from __future__ import annotations

import torch

from arbitrage_fast.models import gguf_ops


def random_blocks(qtype: int, rows: int, in_features: int, gen: torch.Generator, scale: float = 0.02) -> torch.Tensor:
    """scale: the largest block scale d (weights reach d * the format's largest integer)."""
    elems, size = gguf_ops.block_shape(qtype)
    n = in_features // elems
    blocks = torch.randint(0, 256, (rows, n, size), dtype=torch.uint8, generator=gen)
    for i, off in enumerate(gguf_ops.SCALE_OFFSETS[qtype]):
        # d > 0; a min (second field) of either sign, as Q4_1/Q5_1 store it.
        d = (torch.rand(rows, n, generator=gen) * 0.95 + 0.05) * scale
        if i:
            d = d * torch.where(torch.rand(rows, n, generator=gen) < 0.5, -1.0, 1.0)
        blocks[:, :, off:off + 2] = d.to(torch.float16).view(torch.uint8).reshape(rows, n, 2)
    return blocks.reshape(rows, n * size)


def valid_in_features(qtype: int, multiple: int) -> int:
    return gguf_ops.block_shape(qtype)[0] * multiple
