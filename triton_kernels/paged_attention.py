"""Attention over the paged KV arena, for when flash-attn is absent.

The arena is one buffer shared by both models; each model sees it as a strided view
`[pages, layers, 2, block_size, kv_heads, head_dim]`, and a layer's K (or V) cache is the
slice `view[:, layer, 0]`. Its page stride therefore spans all layers, so the kernels take
every stride rather than assuming a packed layout, and they look up the page of every token
(`block_tables[b, n // block_size]`) so any block size works -- the draft's pages hold more
tokens than the target's, and neither needs to be a power of two.

Decode: one program per (sequence, KV head) owns the whole GQA query group, so each K/V
row is read from memory once per group rather than once per query head. Scores use an
online softmax in fp32 (exp2 with the scale folded in). When the batch alone cannot fill
the GPU, the context is split flash-decoding style: each split writes a partial output and
its log-sum-exp, and a second kernel merges them. Splits divide each sequence's *own*
length, so no host sync is needed and the launch can live in a CUDA graph.

Prefill/verification (`paged_prefill_attention*`): the q_len_b query tokens of sequence b
are the last q_len_b of its seq_lens[b] cached tokens (their K/V already written), and
each attends causally to every cached position up to its own.

Empty sequences (seq_len 0, e.g. padded slots of a captured batch) produce zeros.
"""
from __future__ import annotations

import functools

import torch

from ._utils import (HAS_TRITON, cdiv, native_cpu, next_pow2, num_sms, require_triton, tl, triton, triton_usable,
                     use_triton)

__all__ = ["HAS_TRITON", "choose_num_splits", "paged_decode_attention", "paged_decode_attention_reference",
           "paged_decode_attention_triton", "paged_prefill_attention", "paged_prefill_attention_reference",
           "paged_prefill_attention_triton"]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 16


# --------------------------------------------------------------------------- references

def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, [length, Hkv, D]."""
    bs = cache.shape[1]
    n = torch.arange(length, device=cache.device)
    pages = block_table[n // bs].long()
    return cache[pages, n % bs]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Dense fp32 softmax attention of q [T, Hq, D] over k, v [S, Hkv, D], keys <= q_pos."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), k) * scale
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key: zeros
    return torch.einsum("hts,shd->thd", probs, v)


def paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, cu_query_lens, seq_lens,
                                      scale: float) -> torch.Tensor:
    """Varlen causal attention of q [T, Hq, D] over the paged cache, in fp32, out in q's dtype."""
    out = torch.zeros_like(q)
    cu, lens = cu_query_lens.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        k = _gather_kv(k_cache, block_tables[b], seq_len)
        v = _gather_kv(v_cache, block_tables[b], seq_len)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        out[start:end] = _attend(q[start:end], k, v, q_pos, scale).to(q.dtype)
    return out


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens,
                                     scale: float) -> torch.Tensor:
    """One query token per sequence, the last of its seq_lens[b] cached tokens."""
    B = q.shape[0]
    cu = torch.arange(B + 1, device=q.device)
    return paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, cu, seq_lens, scale)


# --------------------------------------------------------------------------- kernels

if HAS_TRITON:

    @triton.jit
    def _scores(q, k, IEEE: tl.constexpr):
        # fp32 caches ask for exact fp32 products; tf32 would cost ~3 decimal digits.
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        return s

    @triton.jit
    def _weighted_values(p, v, IEEE: tl.constexpr):
        # Half-precision caches take p rounded to their dtype, as flash attention does.
        if IEEE:
            o = tl.dot(p, v, input_precision="ieee")
        else:
            o = tl.dot(p.to(v.dtype), v)
        return o

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_ptr, lse_ptr,
        stride_qb, stride_qh, stride_qd, stride_kp, stride_ks, stride_kh, stride_kd,
        stride_vp, stride_vs, stride_vh, stride_vd, stride_btb, stride_btn,
        stride_ob, stride_oh, stride_od, qk_scale, block_size, group, head_dim, num_q_heads,
        NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + b)
        tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), NUM_SPLITS)
        start = split * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = kvh * group + g
        g_mask = g < group
        d_mask = d < head_dim
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)

        # Finite start for the running max: a fully masked tile then yields p = 0, never NaN.
        m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < end
            # int64: page * page_stride overflows int32 once the arena passes 2^31 elements.
            page = tl.load(bt_ptr + b * stride_btb + (n // block_size) * stride_btn, mask=n_mask,
                           other=0).to(tl.int64)
            slot = n % block_size
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k_rows = page * stride_kp + slot * stride_ks + kvh * stride_kh
            k = tl.load(k_ptr + k_rows[:, None] + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            s = _scores(q, k, IEEE) * qk_scale
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_rows = page * stride_vp + slot * stride_vs + kvh * stride_vh
            v = tl.load(v_ptr + v_rows[:, None] + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _weighted_values(p, v, IEEE)
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_mask = g_mask[:, None] & d_mask[None, :]
        if NUM_SPLITS == 1:
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od,
                     out.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            # Partials are packed [B, Hq, NUM_SPLITS, D] fp32; lse (log2 domain) [B, Hq, NUM_SPLITS].
            row = (b * num_q_heads + heads) * NUM_SPLITS + split
            tl.store(part_ptr + row[:, None] * head_dim + d[None, :], out, mask=o_mask)
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + row, lse, mask=g_mask)

    @triton.jit
    def _merge_splits_kernel(
        part_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, stride_od, head_dim, num_q_heads,
        NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, NUM_SPLITS)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < head_dim
        row = (b * num_q_heads + h) * NUM_SPLITS + sp
        lse = tl.load(lse_ptr + row)
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: all weights become 0
        w = tl.exp2(lse - m)
        part = tl.load(part_ptr + row[:, None] * head_dim + d[None, :], mask=d_mask[None, :], other=0.0)
        total = tl.sum(w, axis=0)
        out = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=d_mask)

    @triton.jit
    def _paged_prefill_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, cu_ptr, seq_lens_ptr, out_ptr,
        stride_qt, stride_qh, stride_qd, stride_kp, stride_ks, stride_kh, stride_kd,
        stride_vp, stride_vs, stride_vh, stride_vd, stride_btb, stride_btn,
        stride_ot, stride_oh, stride_od, qk_scale, block_size, group, head_dim,
        BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # Rows of the tile are (query token, head of the group) pairs: BLOCK_Q tokens times
        # BLOCK_G heads share every K/V tile, as in decode.
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        q_block = tl.program_id(2)
        q_start = tl.load(cu_ptr + b)
        q_len = tl.load(cu_ptr + b + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + b)

        r = tl.arange(0, BLOCK_Q * BLOCK_G)
        qi = q_block * BLOCK_Q + r // BLOCK_G
        g = r % BLOCK_G
        heads = kvh * group + g
        row_mask = (qi < q_len) & (g < group)
        q_pos = seq_len - q_len + qi
        d = tl.arange(0, BLOCK_D)
        d_mask = d < head_dim
        tok = q_start + qi
        q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)

        # Keys past the last query of this block are invisible to all of its rows.
        last = tl.minimum(seq_len - q_len + (q_block + 1) * BLOCK_Q, seq_len)
        end = tl.where(q_block * BLOCK_Q < q_len, last, 0)
        m_i = tl.full([BLOCK_Q * BLOCK_G], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q * BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < end
            page = tl.load(bt_ptr + b * stride_btb + (n // block_size) * stride_btn, mask=n_mask,
                           other=0).to(tl.int64)
            slot = n % block_size
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k_rows = page * stride_kp + slot * stride_ks + kvh * stride_kh
            k = tl.load(k_ptr + k_rows[:, None] + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            s = _scores(q, k, IEEE) * qk_scale
            s = tl.where(n_mask[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_rows = page * stride_vp + slot * stride_vs + kvh * stride_vh
            v = tl.load(v_ptr + v_rows[:, None] + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _weighted_values(p, v, IEEE)
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------- launchers

def _check(q, k_cache, v_cache, block_tables, seq_lens) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [pages, block_size, kv_heads, head_dim], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    Hq, D = q.shape[-2:]
    Hkv = k_cache.shape[2]
    if D != k_cache.shape[3] or D > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim of q ({D}) and the cache ({k_cache.shape[3]}) must agree and be <= 256")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise ValueError(f"q, k_cache and v_cache must share a dtype, "
                         f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if block_tables.dim() != 2 or seq_lens.dim() != 1 or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError("block_tables must be [B, max_blocks] and seq_lens [B]")


def choose_num_splits(batch: int, kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits of the context so that batch * kv_heads * splits programs fill the GPU twice.

    `max_context` is what the block table can address (known on the host without a sync).
    Splits shorter than a few hundred tokens cost more in the merge than they win.
    """
    programs = batch * kv_heads
    if device.type == "cuda":
        sms = num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = num_sms(None)
    by_occupancy = cdiv(2 * sms, max(programs, 1))
    by_length = max_context // _MIN_TOKENS_PER_SPLIT
    return next_pow2(max(1, min(by_occupancy, by_length, _MAX_SPLITS))) if by_length >= 2 else 1


def _tile_sizes(head_dim: int) -> tuple[int, int, int]:
    """(max query rows, keys per tile, padded head_dim) per program: at head_dim 256 the
    fp32 accumulator and K/V tiles halve so they stay in registers."""
    block_d = next_pow2(head_dim, 16)
    return (64, 64, block_d) if block_d <= 128 else (32, 32, block_d)


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale: float,
                                  num_splits: int | None = None) -> torch.Tensor:
    """Triton twin of `paged_decode_attention_reference`; out is [B, Hq, D] in q's dtype."""
    require_triton()
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    B, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous even if q is a view
    if B == 0:
        return out
    group = Hq // Hkv
    _, block_n, block_d = _tile_sizes(D)
    block_g = next_pow2(group, 16)  # tl.dot needs >= 16 rows; padded heads are masked off
    if num_splits is None:
        num_splits = choose_num_splits(B, Hkv, block_tables.shape[1] * bs, q.device)
    num_splits = next_pow2(num_splits)  # the merge kernel reduces over a power-of-two arange
    if num_splits > 1:
        part = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # unused by the single-pass variant
    _paged_decode_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part, lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        float(scale) * _LOG2E, bs, group, D, Hq,
        NUM_SPLITS=num_splits, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _merge_splits_kernel[(B, Hq)](part, lse, out, *out.stride(), D, Hq,
                                      NUM_SPLITS=num_splits, BLOCK_D=block_d, num_warps=4)
    return out


def paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_query_lens, seq_lens, scale: float,
                                   max_query_len: int | None = None) -> torch.Tensor:
    """Triton twin of `paged_prefill_attention_reference`.

    Pass `max_query_len` (known to the scheduler) to avoid reading cu_query_lens on the host.
    Every tile applies the causal mask; for the short query runs of step verification the
    unmasked fast path a long prefill would want is not worth its code.
    """
    require_triton()
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    if cu_query_lens.shape != (B + 1,):
        raise ValueError(f"cu_query_lens must be [B + 1] = [{B + 1}], got {tuple(cu_query_lens.shape)}")
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # rows of idle sequences stay 0
    if T == 0 or B == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_query_lens[1:] - cu_query_lens[:-1]).max())
    group = Hq // Hkv
    max_rows, block_n, block_d = _tile_sizes(D)
    block_g = next_pow2(group)
    # Query tokens per program: as many as fit max_rows with the group, at least 16 rows
    # in all for tl.dot (padding rows are masked off).
    block_q = max(cdiv(16, block_g), min(next_pow2(max_query_len), max(1, max_rows // block_g)))
    _paged_prefill_kernel[(B, Hkv, cdiv(max_query_len, block_q))](
        q, k_cache, v_cache, block_tables, cu_query_lens, seq_lens, out,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        float(scale) * _LOG2E, bs, group, D,
        BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2,
    )
    return out


def _native_ok(q, k_cache, exact: bool) -> bool:
    """The compiled CPU kernel (csrc/paged_attention_cpu.cpp) where the caller accepts its
    summation order (`exact=False`) and the tensors are the CPU's."""
    return not exact and q.dtype == k_cache.dtype and native_cpu(q, k_cache)


@functools.lru_cache(maxsize=64)
def _decode_starts(batch: int) -> torch.Tensor:
    """0..batch as int32 on the CPU: where each row of a decode batch starts (one query each),
    built once per batch size rather than once per layer and token; never written to."""
    return torch.arange(batch + 1, dtype=torch.int32)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, *,
                           exact: bool = True) -> torch.Tensor:
    """Decode attention: Triton on CUDA; on the CPU the compiled kernel where `exact=False`
    allows it, else the torch reference."""
    if use_triton(q):
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale)
    if _native_ok(q, k_cache, exact):
        return torch.ops.arbitrage_fast.paged_attention(q, k_cache, v_cache, block_tables, _decode_starts(q.shape[0]),
                                                        seq_lens, scale)
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_query_lens, seq_lens, scale: float,
                            max_query_len: int | None = None, *, exact: bool = True) -> torch.Tensor:
    """Varlen causal attention: Triton on CUDA; on the CPU the compiled kernel where
    `exact=False` allows it, else the torch reference."""
    if use_triton(q):
        return paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_query_lens, seq_lens,
                                              scale, max_query_len)
    if _native_ok(q, k_cache, exact):
        return torch.ops.arbitrage_fast.paged_attention(q, k_cache, v_cache, block_tables, cu_query_lens,
                                                        seq_lens, scale)
    return paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, cu_query_lens, seq_lens,
                                             scale)

