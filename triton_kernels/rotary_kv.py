"""Rotary embedding of q and k fused with writing k and v into their KV pages.

Per layer and token, torch spends five launches on RoPE for q and five for k (two half
slices, a negation, a concatenation, two products and a sum each), plus the KV write: eleven
launches, and q and k each written and read back. The kernel reads q, k and v once (strided
slices of the fused QKV projection's output), writes the rotated q for attention and the
rotated k and v straight into the arena's pages.

RoPE is the "rotate half" form of Llama/Qwen: x * cos + rotate_half(x) * sin with
rotate_half(x) = [-x2, x1]; cos/sin [T, D] come once per forward from RotaryEmbedding. The
page layout is the arena's view [pages, layers, 2, block_size, kv_heads, head_dim] (see
arbitrage_fast.kv.ops.write_kv); slot -1 writes nothing (padding rows).

Rounding: the twin rounds each product and the sum to the input dtype, as torch does; the
kernel computes in fp32 and rounds once, within half an ulp of the twin (exact in fp32 up to
the order of the two products' sum).
"""
from __future__ import annotations

import torch

from arbitrage_fast.kv.ops import write_kv

from ._utils import HAS_TRITON, native_cpu, next_pow2, require_triton, tl, triton, use_triton

__all__ = ["HAS_TRITON", "apply_rotary", "rope_write_kv", "rope_write_kv_reference", "rope_write_kv_triton"]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, D] (transformers' apply_rotary_pos_emb, one tensor)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope_write_kv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                            slots: torch.Tensor) -> torch.Tensor:
    """Rotate q [T, Hq, D] and k [T, Hkv, D], store k and v at `slots` of `layer`; returns q rotated."""
    k = apply_rotary(k, cos, sin)
    write_kv(kv_cache, layer, k, v, slots)
    return apply_rotary(q, cos, sin)


if HAS_TRITON:

    @triton.jit
    def _rotate(x_ptr, stride_h, rows, row_mask, d, half, c1, c2, s1, s2):
        """The two rotated halves of rows [R, D/2] of one token (fp32)."""
        mask = row_mask[:, None] & (d[None, :] < half)
        x1 = tl.load(x_ptr + rows[:, None] * stride_h + d[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + rows[:, None] * stride_h + half + d[None, :], mask=mask, other=0.0).to(tl.float32)
        return x1 * c1[None, :] - x2 * s1[None, :], x2 * c2[None, :] + x1 * s2[None, :], mask

    @triton.jit
    def _rope_write_kv_kernel(
        q_ptr, stride_qt, stride_qh, k_ptr, stride_kt, stride_kh, v_ptr, stride_vt, stride_vh,
        cos_ptr, sin_ptr, stride_ct, q_out_ptr, stride_ot, stride_oh, slots_ptr,
        cache_ptr, stride_cp, stride_ckv, stride_cs, stride_ch, layer_offset, block_size,
        num_q_heads, num_kv_heads, half,
        BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_D2: tl.constexpr,
    ):
        t = tl.program_id(0)
        d = tl.arange(0, BLOCK_D2)
        d_mask = d < half
        c1 = tl.load(cos_ptr + t * stride_ct + d, mask=d_mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_ct + half + d, mask=d_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_ct + d, mask=d_mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_ct + half + d, mask=d_mask, other=0.0).to(tl.float32)

        hq = tl.arange(0, BLOCK_HQ)
        o1, o2, mask = _rotate(q_ptr + t * stride_qt, stride_qh, hq, hq < num_q_heads, d, half, c1, c2, s1, s2)
        out = q_out_ptr + t * stride_ot + hq[:, None] * stride_oh + d[None, :]
        tl.store(out, o1.to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(out + half, o2.to(q_out_ptr.dtype.element_ty), mask=mask)

        slot = tl.load(slots_ptr + t)
        if slot >= 0:
            # int64: page * page_stride overflows int32 once the arena passes 2^31 elements.
            page = (slot // block_size).to(tl.int64)
            base = cache_ptr + layer_offset + page * stride_cp + (slot % block_size) * stride_cs
            hk = tl.arange(0, BLOCK_HKV)
            hk_mask = hk < num_kv_heads
            k1, k2, kmask = _rotate(k_ptr + t * stride_kt, stride_kh, hk, hk_mask, d, half, c1, c2, s1, s2)
            dst = base + hk[:, None] * stride_ch + d[None, :]
            tl.store(dst, k1.to(cache_ptr.dtype.element_ty), mask=kmask)
            tl.store(dst + half, k2.to(cache_ptr.dtype.element_ty), mask=kmask)
            dd = tl.arange(0, 2 * BLOCK_D2)
            vmask = hk_mask[:, None] & (dd[None, :] < 2 * half)
            v = tl.load(v_ptr + t * stride_vt + hk[:, None] * stride_vh + dd[None, :], mask=vmask, other=0.0)
            tl.store(base + stride_ckv + hk[:, None] * stride_ch + dd[None, :], v.to(cache_ptr.dtype.element_ty),
                     mask=vmask)


def _check(q, k, v, cos, sin, kv_cache, slots) -> None:
    T, _, D = q.shape
    if k.dim() != 3 or v.shape != k.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k and v must both be [{T}, kv_heads, {D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if D % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {D}")
    if cos.shape != (T, D) or sin.shape != (T, D) or cos.stride() != sin.stride():
        raise ValueError(f"cos and sin must both be [{T}, {D}] with the same strides")
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2 or kv_cache.shape[4:] != k.shape[1:]:
        raise ValueError(f"kv_cache must be [pages, layers, 2, block_size, {k.shape[1]}, {D}], "
                         f"got {tuple(kv_cache.shape)}")
    if slots.shape != (T,):
        raise ValueError(f"slots must be [{T}], got {tuple(slots.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("kv_cache", kv_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def rope_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         kv_cache: torch.Tensor, layer: int, slots: torch.Tensor) -> torch.Tensor:
    """Triton twin of `rope_write_kv_reference`: one program per token, every head of it."""
    require_triton()
    _check(q, k, v, cos, sin, kv_cache, slots)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    q_out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    if T == 0:
        return q_out
    _rope_write_kv_kernel[(T,)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        cos, sin, cos.stride(0), q_out, q_out.stride(0), q_out.stride(1), slots,
        kv_cache, kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        layer * kv_cache.stride(1), kv_cache.shape[3], Hq, Hkv, D // 2,
        BLOCK_HQ=next_pow2(Hq), BLOCK_HKV=next_pow2(Hkv), BLOCK_D2=next_pow2(D // 2), num_warps=4,
    )
    return q_out


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kv_cache: torch.Tensor, layer: int, slots: torch.Tensor) -> torch.Tensor:
    """Rotated q, with rotated k and v written to the pages: Triton on CUDA, the compiled kernel
    on the CPU (the twin's rounding, bit for bit), the torch twin elsewhere."""
    if use_triton(q):
        return rope_write_kv_triton(q, k, v, cos, sin, kv_cache, layer, slots)
    if native_cpu(q, kv_cache) and len({q.dtype, k.dtype, v.dtype, cos.dtype, sin.dtype, kv_cache.dtype}) == 1:
        return torch.ops.arbitrage_fast.rope_write_kv(q, k, v, cos, sin, kv_cache, layer, slots)
    return rope_write_kv_reference(q, k, v, cos, sin, kv_cache, layer, slots)
