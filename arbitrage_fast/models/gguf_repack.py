"""GGUF blocks rewritten, value for value, in the engine's group-wise layout, so that a GGUF
keeps its quantized weights off the CPU too: the Triton kernel of
`triton_kernels/quant_matmul.py` multiplies them (the CPU runs the blocks as stored).

Every type with a CPU kernel (`gguf_ops.PACKED_TYPES`) maps onto that layout without losing a
value. A GGUF weight is q * d (+ m) per block or sub-block, with q an unsigned or signed small
integer; the layout stores q (4-bit values in int32 words, or int8) with one scale and one
optional zero point per group of consecutive inputs:

    Q8_0   int8 q, group 32, scale d
    Q4_0   4-bit q, group 32, scale d, zero point -8 d         (w = d (q - 8))
    Q4_1   4-bit q, group 32, scale d, zero point m
    Q5_0   int8 q - 16, group 32, scale d
    Q5_1   int8 q, group 32, scale d, zero point m
    Q4_K   4-bit q, group 32, scale d * sc, zero point -dmin * m   (6-bit sc, m per 32 inputs)
    Q6_K   int8 q - 32, group 16, scale d * sc                   (int8 sc per 16 inputs)

Five- and six-bit values take a byte each (the layout's words hold 3- or 4-bit values), and a
K-quant's exact scales and zero points take fp32, so bits a weight, stored -> repacked: Q8_0
8.5 -> 8.5, Q4_0 4.5 -> 5, Q4_1 5 -> 5, Q5_0 5.5 -> 8.5, Q5_1 6 -> 9, Q4_K 4.5 -> 6, Q6_K
6.56 -> 10: the shipped 0.5B and 1.5B files take 1.35x and 1.39x their size repacked, 0.53x and
0.44x their bf16 weights.

Exactness: the kernel forms q * scale + zero in fp32, as `gguf.quants.dequantize` (the
reference) forms d * q + m. A K-quant's scale d * sc and zero point dmin * m are exact in fp32
(an fp16 significand times a 6- or 8-bit integer), so every dequantised value is the
reference's to the bit; scales and zero points are stored in fp16 where that holds them
exactly (the 32-input types) and in fp32 otherwise.
"""
from __future__ import annotations

import gguf
import torch

from arbitrage_fast.triton_kernels.quant_matmul import pack_words

from . import gguf_ops
from .group_quant import GroupQuantized

QT = gguf.GGMLQuantizationType


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian -> [...] float32."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n]: the n low nibbles, then the n high ones (ggml's order)."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[..., 4] bytes of a little-endian uint32 -> [..., 32] bits, bit j for value j."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh[..., :, None] >> shifts) & 1).reshape(*qh.shape[:-1], 32)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A K-quant's 12 bytes of 6-bit sub-block scales and mins -> (sc, m), each [..., 8]
    (ggml's get_scale_min_k4)."""
    s = s.to(torch.int32)
    lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], -1), torch.cat([lo_m, hi_m], -1)


def _unpack(b: torch.Tensor, qtype: int) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor | None]:
    """Blocks [R, nb, size] -> (q int32 [R, nb * elems], group, scale [R, G], zero [R, G] or None),
    w = q * scale + zero."""
    R, nb = b.shape[:2]
    flat = lambda t: t.reshape(R, -1)  # noqa: E731
    if qtype == QT.Q8_0:
        return flat(b[..., 2:].contiguous().view(torch.int8).int()), 32, flat(_fp16(b[..., 0:2])), None
    if qtype in (QT.Q4_0, QT.Q4_1):
        d = _fp16(b[..., 0:2])
        q = _nibbles(b[..., 4 if qtype == QT.Q4_1 else 2:]).int()
        zero = _fp16(b[..., 2:4]) if qtype == QT.Q4_1 else -8 * d
        return flat(q), 32, flat(d), flat(zero)
    if qtype in (QT.Q5_0, QT.Q5_1):
        d = _fp16(b[..., 0:2])
        off = 4 if qtype == QT.Q5_1 else 2
        q = (_nibbles(b[..., off + 4:]) | (_high_bits(b[..., off:off + 4]) << 4)).int()
        if qtype == QT.Q5_1:
            return flat(q), 32, flat(d), flat(_fp16(b[..., 2:4]))
        return flat(q - 16), 32, flat(d), None
    if qtype == QT.Q4_K:
        d, dmin = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
        sc, m = _k_scales(b[..., 4:16])
        qs = b[..., 16:144].reshape(R, nb, 4, 32)  # four runs of 32 bytes, each two sub-blocks
        q = torch.stack([qs & 0xF, qs >> 4], dim=3).int()  # [R, nb, 4, 2, 32]
        return flat(q), 32, flat(d[..., None] * sc), flat(-(dmin[..., None] * m))
    if qtype == QT.Q6_K:
        ql, qh = b[..., 0:128].reshape(R, nb, 2, 64), b[..., 128:192].reshape(R, nb, 2, 32)
        sc = b[..., 192:208].contiguous().view(torch.int8).float()
        d = _fp16(b[..., 208:210])
        # Each half of 128 values: four runs of 32, low nibbles of ql[0:32], ql[32:64], then
        # their high nibbles, each with two bits of qh[0:32] as its top bits.
        low = torch.stack([ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4], dim=3)
        high = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=3)
        q = (low | (high << 4)).int() - 32  # [R, nb, 2, 4, 32]
        return flat(q), 16, flat(d[..., None] * sc), None
    raise ValueError(f"ggml type {qtype} has no repacking")


def _compact(t: torch.Tensor | None) -> torch.Tensor | None:
    """fp16 where it holds every value exactly, else fp32 (the kernel reads either)."""
    if t is None:
        return None
    half = t.to(torch.float16)
    return half if torch.equal(half.float(), t) else t.contiguous()


def repack(blocks: torch.Tensor, qtype: int, in_features: int) -> GroupQuantized:
    """GGUF blocks [N, row_bytes] uint8 of a type in `gguf_ops.PACKED_TYPES` -> the same weight
    in the engine's group-wise layout (see the module's table)."""
    if qtype not in gguf_ops.PACKED_TYPES:
        raise ValueError(f"ggml type {qtype} has no repacking; repacked types: "
                         f"{sorted(gguf_ops.PACKED_TYPES.values())}")
    elems, size = gguf_ops.block_shape(qtype)
    N = blocks.shape[0]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != in_features // elems * size \
            or in_features % elems:
        raise ValueError(f"{gguf_ops.PACKED_TYPES[qtype]} blocks for {in_features} inputs must be uint8 "
                         f"[rows, {in_features // elems * size}], got {blocks.dtype} {tuple(blocks.shape)}")
    q, group, scale, zero = _unpack(blocks.cpu().reshape(N, -1, size), QT(qtype))
    bits = 4 if qtype in (QT.Q4_0, QT.Q4_1, QT.Q4_K) else 8
    qweight = pack_words(q, 4) if bits == 4 else q.to(torch.int8)
    return GroupQuantized(qweight.contiguous(), _compact(scale), _compact(zero), bits, group, in_features)
