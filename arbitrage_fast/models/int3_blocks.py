"""The engine's 3-bit weight blocks on the CPU (int3 quantize-on-load) and their products.

The layout (csrc/int3_linear.h states it in full): a row of K inputs, a multiple of 32,
quantized in groups of `group` (32, 64 or 128) inputs is its groups end to end, the last one
possibly partial; a group is an fp16 scale d and an fp16 minimum m, then 12 bytes of 3-bit
codes q per 32 inputs (8 bytes of 2-bit fields, byte j holding inputs j, j + 8, j + 16,
j + 24 from its low bits up; then a 32-bit word of each input's third bit), and
weight = d * q + m. That is 3.5 bits a weight at group 64, where the Q4_1 blocks int3 used to
borrow take 5.

    int3_linear(x[M, K], blocks[N, row_bytes] uint8, group) -> [M, N] in x's dtype
        x @ W.T from the blocks as stored; x is first rounded to int8 per 32 inputs exactly as
        for the GGUF formats (`gguf_ops.quantize_activations`), dots are integer, sums fp32.
    int3_dequantize(blocks, group, K) -> [N, K] float32

The compiled ops (`torch.ops.arbitrage_fast.int3_*`, csrc/int3_linear.cpp) serve CPU
tensors; everything else runs the references below, which define what is correct: `unpack`
reads the layout in torch, independently of the C++ decoder, and `linear_reference`
multiplies in float64 by the activations after the kernels' int8 round trip.
"""
from __future__ import annotations

import torch

from arbitrage_fast.kv.ops import native_available

from . import gguf_ops

GROUPS = (32, 64, 128)
PART = 32  # inputs per 12 bytes of codes (and per activation scale)
HEAD_BYTES, CODE_BYTES = 4, 12


class CorruptBlocksError(ValueError):
    """A tensor's int3 blocks are truncated, misshapen or carry non-finite scales."""


def _check_group(group: int) -> None:
    if group not in GROUPS:
        raise ValueError(f"int3 blocks take groups of {list(GROUPS)} inputs, got {group!r}")


def row_bytes(in_features: int, group: int) -> int:
    """Bytes of one row: a 4-byte head per group (the last may be partial) and 12 per 32 inputs."""
    _check_group(group)
    return HEAD_BYTES * -(-in_features // group) + CODE_BYTES * (in_features // PART)


def pack(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int) -> torch.Tensor:
    """Codes q [N, K] in [0, 7] with fp16 scales and minima [N, ceil(K / group)] -> uint8
    blocks [N, row_bytes(K, group)]."""
    N, K = q.shape
    _check_group(group)
    if K % PART:
        raise ValueError(f"int3 blocks take rows of a multiple of {PART} inputs, got {K}")
    parts, per = K // PART, group // PART
    G = -(-K // group)
    q = q.to(torch.int64).reshape(N, parts, 4, 8)  # [.., t, j] = input 8t + j of a part
    qs = (q & 3) << (2 * torch.arange(4).reshape(1, 1, 4, 1))
    qs = qs.sum(2)  # byte j: inputs j, j + 8, j + 16, j + 24 at bits 0, 2, 4, 6
    high = ((q >> 2) & 1) << torch.arange(8)
    qh = high.sum(-1)  # byte b of the little-endian word: third bits of inputs 8b .. 8b + 7
    codes = torch.cat([qs, qh], -1).to(torch.uint8)  # [N, parts, 12]
    codes = torch.nn.functional.pad(codes, (0, 0, 0, G * per - parts)).reshape(N, G, per * CODE_BYTES)
    head = torch.stack([scales.to(torch.float16), mins.to(torch.float16)], -1)
    head = head.view(torch.uint8).reshape(N, G, HEAD_BYTES)
    # A partial last group's missing parts are padding at the very end of the row: cut off.
    return torch.cat([head, codes], -1).reshape(N, -1)[:, :row_bytes(K, group)].contiguous()


def unpack(blocks: torch.Tensor, group: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `pack`: (q int64 [N, K], scales fp16 [N, G], mins fp16 [N, G])."""
    N, K = blocks.shape[0], in_features
    parts, per, G = K // PART, group // PART, -(-K // group)
    width = HEAD_BYTES + per * CODE_BYTES
    full = torch.nn.functional.pad(blocks, (0, G * width - blocks.shape[1])).reshape(N, G, width)
    head = full[..., :HEAD_BYTES].contiguous().view(torch.float16)  # [N, G, 2]: d, m
    codes = full[..., HEAD_BYTES:].reshape(N, G * per, CODE_BYTES)[:, :parts].to(torch.int64)
    low = (codes[..., :8, None] >> (2 * torch.arange(4))) & 3  # [.., j, t]: input 8t + j
    low = low.transpose(-1, -2).reshape(N, parts, PART)
    high = (codes[..., 8:, None] >> torch.arange(8)) & 1  # [.., b, i]: input 8b + i
    q = low | (high.reshape(N, parts, PART) << 2)
    return q.reshape(N, K), head[..., 0], head[..., 1]


def dequantize_reference(blocks: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """W as float32 [N, K]: d * q + m, the product exact and the sum rounded once in fp32."""
    q, d, m = unpack(blocks, group, in_features)
    idx = torch.arange(in_features) // group
    return q.float() * d.float()[:, idx] + m.float()[:, idx]


def linear_reference(x: torch.Tensor, blocks: torch.Tensor, group: int, *, quantize_x: bool = True) -> torch.Tensor:
    """The torch twin of `int3_linear`, in float64 before the final cast (so its own rounding
    does not count against the kernel); `quantize_x=False` multiplies the unrounded x."""
    K = x.shape[-1]
    w = dequantize_reference(blocks, group, K).double()
    xr = gguf_ops.rounded_activations(x, PART) if quantize_x else x.double()
    return (xr @ w.T).to(x.dtype)


def check_blocks(blocks: torch.Tensor, group: int, in_features: int, name: str) -> None:
    """Refuse, naming the tensor, blocks that cannot be a [N, in_features] weight in groups of
    `group`: wrong dtype or rank, rows of the wrong length (truncated), or a NaN or infinite
    scale or minimum (every product with such a group would be NaN)."""
    _check_group(group)
    if in_features <= 0 or in_features % PART:
        raise CorruptBlocksError(f"{name}: int3 blocks take rows of a positive multiple of {PART} inputs, "
                                 f"not {in_features}")
    if blocks.dim() != 2 or blocks.dtype != torch.uint8:
        raise CorruptBlocksError(f"{name}: int3 blocks must be a 2-D uint8 tensor, got {blocks.dtype} "
                                 f"{tuple(blocks.shape)}")
    want = row_bytes(in_features, group)
    if blocks.shape[1] != want:
        raise CorruptBlocksError(f"{name}: rows of {blocks.shape[1]} bytes; {in_features} inputs in groups of "
                                 f"{group} take {want} (truncated or corrupt blocks)")
    _, d, m = unpack(blocks, group, in_features)
    bad = int((~torch.isfinite(d) | ~torch.isfinite(m)).sum())
    if bad:
        raise CorruptBlocksError(f"{name}: {bad} int3 group(s) with a NaN or infinite scale or minimum")


def _native(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and native_available("cpu")


def int3_linear(x: torch.Tensor, blocks: torch.Tensor, group: int) -> torch.Tensor:
    if _native(x):
        return torch.ops.arbitrage_fast.int3_linear(x, blocks, group)
    return linear_reference(x, blocks, group)


def int3_dequantize(blocks: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    if _native(blocks):
        return torch.ops.arbitrage_fast.int3_dequantize(blocks, group, in_features)
    return dequantize_reference(blocks, group, in_features)


def cpu_paths() -> list[str]:
    """The compiled int3 kernel's code paths this CPU runs, best first (AVX2 and the portable
    path; the GGUF kernels' AVX-512 path has no int3 twin)."""
    return [p for p in gguf_ops.cpu_paths() if p in ("avx2", "scalar")]
