"""Weight-only quantized matmul over the engine's own group-wise layout: x @ W.T with W kept
packed, dequantised tile by tile inside the kernel.

The layout (written by `arbitrage_fast.models.group_quant.quantize`), for W of [N, K]:

    bits 8:    qweight int8 [N, K], signed, symmetric: W = q * scale
    bits 4, 3: qweight int32 [N, ceil(K / per)], per = 32 // bits values to a word (8 for
               int4, 10 for int3, whose top 2 bits stay 0): value k of a row sits in word
               k // per at bit (k % per) * bits, unsigned; W = q * scale + min
    scales:    float16 [N, G], one per group of `group` consecutive inputs of a row
               (G = ceil(K / group); the last group may be partial); int8 has one group, G = 1
    mins:      float16 [N, G] (the zero point, stored as the value q = 0 stands for), or None

A word holds whole values, so unpacking is one shift and one mask per value and a value's
word is found by integer division: cheaper in a kernel than int3 packed 8 to 3 bytes, which
straddles byte boundaries, for 7% more bytes (3.2 bits a weight instead of 3).

One kernel serves decode and prefill: a program owns a tile of rows and outputs and walks K,
dequantising a [BLOCK_K, BLOCK_N] tile of W in registers before `tl.dot`; only the row tile
changes with the batch (16 rows, the least `tl.dot` takes, for decode; 64 for prefill).
`quant_matmul` runs it on CUDA tensors and the torch twin, dequantise then an fp32 matmul, on
anything else (the dispatch rule of `_utils`).
"""
from __future__ import annotations

import torch

from ._utils import HAS_TRITON, cdiv, next_pow2, require_triton, tl, triton, triton_usable, use_triton

__all__ = ["HAS_TRITON", "dequantize_reference", "pack_words", "quant_matmul", "quant_matmul_reference",
           "quant_matmul_triton", "triton_usable", "unpack_words", "values_per_word"]

_BLOCK_N = 64
_BLOCK_K = 64


def values_per_word(bits: int) -> int:
    return 32 // bits


def pack_words(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] integers in [0, 2**bits) -> int32 words [N, ceil(K / per)] (the layout above)."""
    per = values_per_word(bits)
    N, K = q.shape
    padded = torch.zeros(N, cdiv(K, per) * per, dtype=torch.int64, device=q.device)
    padded[:, :K] = q
    shifts = torch.arange(per, device=q.device, dtype=torch.int64) * bits
    words = (padded.reshape(N, -1, per) << shifts).sum(-1)
    # Words above 2**31 (int4's top nibble set) wrap to negative int32: the same 32 bits.
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_words(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The inverse of `pack_words`: int32 [N, W] -> int32 [N, in_features]."""
    per = values_per_word(bits)
    shifts = torch.arange(per, device=words.device, dtype=torch.int32) * bits
    q = (words[..., None] >> shifts) & ((1 << bits) - 1)  # the mask undoes the sign-extending shift
    return q.reshape(words.shape[0], -1)[:, :in_features]


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int,
                         group: int, in_features: int) -> torch.Tensor:
    """W as float32 [N, K]: q * scale (+ min), each product and sum rounded once in fp32."""
    q = qweight.to(torch.int32) if bits == 8 else unpack_words(qweight, bits, in_features)
    idx = torch.arange(in_features, device=q.device) // group
    w = q.float() * scales.float()[:, idx]
    return w if mins is None else w + mins.float()[:, idx]


def quant_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                           bits: int, group: int) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype: dequantise, then an fp32 matmul."""
    w = dequantize_reference(qweight, scales, mins, bits, group, x.shape[-1])
    return (x.float() @ w.T).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _quant_matmul_kernel(
        x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, stride_sn, m_ptr, stride_mn, out_ptr, stride_om,
        M, N, K, group,
        BITS: tl.constexpr, PER: tl.constexpr, HAS_MIN: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & k_ok[None, :],
                        other=0.0)
            w_ok = k_ok[:, None] & (rn[None, :] < N)
            # W's tile is read transposed, [BLOCK_K, BLOCK_N], so the dot needs no tl.trans.
            if BITS == 8:
                q = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None], mask=w_ok, other=0)
            else:
                words = tl.load(w_ptr + rn[None, :] * stride_wn + (rk // PER)[:, None], mask=w_ok, other=0)
                q = (words >> ((rk % PER) * BITS)[:, None]) & ((1 << BITS) - 1)
            g = (rk // group)[:, None]
            s = tl.load(s_ptr + rn[None, :] * stride_sn + g, mask=w_ok, other=0.0)
            w = q.to(tl.float32) * s.to(tl.float32)
            if HAS_MIN:
                w += tl.load(m_ptr + rn[None, :] * stride_mn + g, mask=w_ok, other=0.0).to(tl.float32)
            if IEEE:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int,
           group: int) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [rows, in_features] and contiguous in its last dimension, got {tuple(x.shape)}")
    if bits not in (3, 4, 8):
        raise ValueError(f"bits must be 3, 4 or 8, got {bits}")
    K, N = x.shape[1], qweight.shape[0]
    width = K if bits == 8 else cdiv(K, values_per_word(bits))
    want = torch.int8 if bits == 8 else torch.int32
    if qweight.dtype != want or tuple(qweight.shape) != (N, width) or qweight.stride(-1) != 1:
        raise ValueError(f"qweight for {bits}-bit values and K={K} must be {want} [{N}, {width}], "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    groups = cdiv(K, group)
    for name, t in (("scales", scales), ("mins", mins)):
        if t is not None and (tuple(t.shape) != (N, groups) or t.stride(-1) != 1):
            raise ValueError(f"{name} must be [{N}, {groups}] for K={K} in groups of {group}, got {tuple(t.shape)}")


def quant_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                        bits: int, group: int) -> torch.Tensor:
    """Triton twin of `quant_matmul_reference`."""
    require_triton()
    _check(x, qweight, scales, mins, bits, group)
    M, K = x.shape
    N = qweight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    block_m = 16 if M <= 16 else 64
    has_min = mins is not None
    m = mins if has_min else scales  # never read without HAS_MIN
    _quant_matmul_kernel[(cdiv(M, block_m), cdiv(N, _BLOCK_N))](
        x, x.stride(0), qweight, qweight.stride(0), scales, scales.stride(0), m, m.stride(0), out, out.stride(0),
        M, N, K, group, BITS=bits, PER=values_per_word(bits), HAS_MIN=has_min, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_K=min(_BLOCK_K, next_pow2(K, 16)), num_warps=4)
    return out


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bits: int, group: int) -> torch.Tensor:
    """x [M, K] @ W.T from W's packed form: Triton on CUDA, the torch twin elsewhere."""
    if use_triton(x, qweight):
        return quant_matmul_triton(x, qweight, scales, mins, bits, group)
    return quant_matmul_reference(x, qweight, scales, mins, bits, group)
