"""The engine's own weight quantization, applied at load: int8 per output channel, int4 and
int3 group-wise, round to nearest.

    int8       symmetric, one scale per output row: q = round(w / s) in [-127, 127], w ~ q * s
    int4/int3  asymmetric, per group of `group` (32, 64 or 128) consecutive inputs of a row:
               q = round((w - min) / s) in [0, 2**bits - 1], w ~ q * s + min

Scales and minima are stored in float16 and chosen *after* that rounding, so the rounding can
only widen the grid: the minimum is rounded down and the scale up, so every weight of a group
lies on [min, min + (2**bits - 1) * s] and is within s / 2 of its grid point (likewise |w| <=
127 * s for int8). Storing the group's minimum as the zero point, as GGUF's Q4_1 does, keeps
that bound; an integer zero point would add up to another half step at the clamped end. The
last group of a row may be partial (K need not be a multiple of the group).

The packed layout and its dequantisation are defined beside the kernel that reads them
(`triton_kernels/quant_matmul.py`). For the CPU, `to_gguf_blocks` rewrites an int8 or int4
weight as GGUF Q8_0 / Q4_1 blocks and `to_int3_blocks` an int3 weight as the engine's 3-bit
blocks (`int3_blocks`), each holding exactly the same dequantised values, which is how the CPU
runs them (the kernels of `gguf_ops` and `int3_blocks`). `to_q8_0` writes any weight as
Q8_0 blocks of 32 (the CPU's form of a quantized LM head).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from arbitrage_fast.triton_kernels.quant_matmul import dequantize_reference, pack_words, unpack_words

from . import gguf_ops, int3_blocks

FORMATS: dict[str, int] = {"int8": 8, "int4": 4, "int3": 3}  # name -> bits
GROUPS = (32, 64, 128)
Q4_1, Q8_0 = gguf_ops.TYPE_IDS["Q4_1"], gguf_ops.TYPE_IDS["Q8_0"]
_FP16_MAX = float(torch.finfo(torch.float16).max)


class QuantizationError(ValueError):
    """A weight cannot be stored in the asked format (non-finite values, out of fp16 range)."""


@dataclass(frozen=True)
class QuantScheme:
    """What to quantize a checkpoint's linear layers to: a format name and (int4/int3) a group."""

    name: str
    group: int = 64

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise ValueError(f"unknown quantization {self.name!r}; expected one of {sorted(FORMATS)}")
        if self.group not in GROUPS:
            raise ValueError(f"quantization group must be one of {list(GROUPS)}, got {self.group!r}")

    @property
    def bits(self) -> int:
        return FORMATS[self.name]


@dataclass
class GroupQuantized:
    """A weight [N, in_features] in the packed layout of `triton_kernels/quant_matmul.py`."""

    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    bits: int
    group: int
    in_features: int

    def dequantize(self) -> torch.Tensor:
        return dequantize_reference(self.qweight, self.scales, self.mins, self.bits, self.group, self.in_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def to(self, device: torch.device | str) -> GroupQuantized:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GroupQuantized(move(self.qweight), move(self.scales), move(self.mins), self.bits, self.group,
                              self.in_features)


def _fp16_at_least(v: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 >= v (v >= 0, finite, within fp16's range)."""
    h = v.half()
    return torch.where(h.float() < v, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _fp16_at_most(v: torch.Tensor) -> torch.Tensor:
    h = v.half()
    return torch.where(h.float() > v, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def quantize(weight: torch.Tensor, scheme: QuantScheme, name: str = "weight") -> GroupQuantized:
    """Round-to-nearest quantization of a [N, K] weight; `name` is for error messages."""
    w = weight.detach().float()
    if w.dim() != 2:
        raise QuantizationError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise QuantizationError(f"{name}: the weight holds NaN or infinite values")
    N, K = w.shape
    if scheme.bits == 8:
        amax = w.abs().amax(1, keepdim=True)
        _check_range(amax / 127, name)
        s = _fp16_at_least(amax / 127)
        sf = s.float()
        q = torch.where(sf > 0, w / sf, torch.zeros_like(w)).round().clamp(-127, 127)
        return GroupQuantized(q.to(torch.int8), s, None, 8, K, K)
    group, top = scheme.group, (1 << scheme.bits) - 1
    G = -(-K // group)
    padded = torch.nn.functional.pad(w, (0, G * group - K)).reshape(N, G, group)
    real = (torch.arange(G * group, device=w.device) < K).reshape(1, G, group)
    lo = torch.where(real, padded, torch.inf).amin(-1)
    hi = torch.where(real, padded, -torch.inf).amax(-1)
    _check_range(torch.maximum(lo.abs(), (hi - lo) / top), name)
    m = _fp16_at_most(lo)
    s = _fp16_at_least((hi - m.float()) / top)
    mf, sf = m.float()[..., None], s.float()[..., None]
    q = torch.where(sf > 0, (padded - mf) / sf, torch.zeros_like(padded)).round().clamp(0, top)
    q = q.reshape(N, G * group)[:, :K].to(torch.int64)
    return GroupQuantized(pack_words(q, scheme.bits), s, m, scheme.bits, group, K)


def _check_range(v: torch.Tensor, name: str) -> None:
    # A little headroom below fp16's largest value, for rounding the scale up.
    if (v > _FP16_MAX * 0.999).any():
        raise QuantizationError(f"{name}: weights up to {v.max().item():.3g} need scales beyond float16's range")


def _check_cpu_rows(K: int) -> None:
    if K % 32:
        raise QuantizationError(f"the CPU kernels take rows of a multiple of 32 inputs; this layer has {K}")


def to_gguf_blocks(qw: GroupQuantized) -> tuple[torch.Tensor, int]:
    """(uint8 blocks [N, row_bytes], ggml type) with the same dequantised values: Q8_0 for
    int8 (every block of a row repeats its scale), Q4_1 for int4 and int3 (a 3-bit value is a
    4-bit value below 8; each block of 32 repeats its group's scale and minimum). K must be a
    multiple of 32, the blocks' width, and so the group (32, 64, 128) is a whole number of
    blocks except for a partial last group, which still ends on a block boundary. The CPU
    runs int3 as `to_int3_blocks` instead, at 3.5 bits a weight rather than Q4_1's 5."""
    N, K = qw.qweight.shape[0], qw.in_features
    _check_cpu_rows(K)
    nb = K // 32
    block_group = torch.arange(nb) * 32 // qw.group
    if qw.bits == 8:
        d = qw.scales.expand(N, nb).contiguous().view(torch.uint8).reshape(N, nb, 2)
        qs = qw.qweight.reshape(N, nb, 32).view(torch.uint8)
        return torch.cat([d, qs], -1).reshape(N, -1).contiguous(), Q8_0
    q = unpack_words(qw.qweight, qw.bits, K).to(torch.uint8).reshape(N, nb, 32)
    qs = q[..., :16] | (q[..., 16:] << 4)  # Q4_1: byte j holds values j (low) and j + 16 (high)
    d = qw.scales[:, block_group].contiguous().view(torch.uint8).reshape(N, nb, 2)
    m = qw.mins[:, block_group].contiguous().view(torch.uint8).reshape(N, nb, 2)
    return torch.cat([d, m, qs], -1).reshape(N, -1).contiguous(), Q4_1


def to_q8_0(weight: torch.Tensor, name: str = "weight", rows_per_chunk: int = 8192) -> torch.Tensor:
    """A [N, K] weight as GGUF Q8_0 blocks (uint8 [N, K / 32 * 34]): int8 with one float16
    scale per 32 inputs, rounded as `quantize` rounds int8 (each block a row of its own). Rows
    go in chunks, so a vocabulary-sized head needs only a chunk's fp32 copy at a time."""
    N, K = weight.shape
    _check_cpu_rows(K)
    chunks = []
    for start in range(0, N, rows_per_chunk):
        rows = weight[start:start + rows_per_chunk]
        blocks, _ = to_gguf_blocks(quantize(rows.reshape(-1, 32), QuantScheme("int8"), name))
        chunks.append(blocks.reshape(rows.shape[0], -1))
    return torch.cat(chunks)


def to_int3_blocks(qw: GroupQuantized) -> torch.Tensor:
    """An int3 weight as the CPU's 3-bit blocks (`int3_blocks`), uint8 [N, row_bytes]: the
    same codes, scales and minima, so the same dequantised values. K must be a multiple of 32."""
    if qw.bits != 3:
        raise ValueError(f"int3 blocks hold 3-bit weights, this one is int{qw.bits}")
    _check_cpu_rows(qw.in_features)
    q = unpack_words(qw.qweight, 3, qw.in_features)
    return int3_blocks.pack(q, qw.scales, qw.mins, qw.group)
