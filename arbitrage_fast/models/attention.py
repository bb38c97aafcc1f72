"""Attention over the shared paged KV arena.

Each layer writes its new K/V into the pages named by the slot mapping, then attends over
the sequence's pages. Three implementations:

- the paged kernel ops (`paged_decode_attention`, `paged_prefill_attention`: Triton on CUDA,
  their torch references elsewhere, by the kernel modules' one dispatch rule) read K/V in
  place through the block table, one launch for the whole batch. They serve every layer
  without a sliding window on CUDA, and device-form decode batches everywhere (no host
  lengths, see AttentionMetadata.for_device_decode, so a CUDA graph can capture them). A
  layer whose `exact` is False (LlamaDecoder.set_exact_arithmetic) also takes them on the
  CPU, where they then run the compiled kernel: its sums in another order than SDPA's.
  Prefill goes through the kernel on CUDA because the other path gathers every page of every
  sequence into a contiguous copy per layer and loops over sequences on the host: the catch-up
  prefill of an escalation is a few dozen query tokens over a context of thousands, where that
  copy costs more than the attention itself.
- SDPA over gathered pages, on the CPU for host-form batches: transformers' own arithmetic,
  which greedy outputs equal to transformers' `generate` rely on; and for sliding-window layers
  (which the kernels do not model), with a masked gather over the whole block table in the
  device form.
- In batch-invariant mode (`meta.batch_invariant`, any device), one SDPA call per query over
  exactly its visible keys: a prefill or verification query is computed by the very call that
  decodes that position alone (models/batch_invariant.py says why).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arbitrage_fast.runtime.attention_metadata import AttentionMetadata
from arbitrage_fast.triton_kernels.paged_attention import paged_decode_attention, paged_prefill_attention
from arbitrage_fast.triton_kernels.rotary_kv import rope_write_kv


class PagedAttention(nn.Module):
    def __init__(self, layer_idx: int, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qkv_bias: bool, o_bias: bool, sliding_window: int | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=o_bias)
        self.exact = True  # False: the compiled CPU kernel for full-attention layers (see the module doc)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = rope_write_kv(q.view(T, self.num_heads, self.head_dim), k.view(T, self.num_kv_heads, self.head_dim),
                          v.view(T, self.num_kv_heads, self.head_dim), cos, sin, kv_cache, self.layer_idx,
                          meta.slot_mapping)
        k_cache, v_cache = kv_cache.select(1, self.layer_idx).unbind(1)
        if meta.batch_invariant:
            out = self._per_query_attention(q, k_cache, v_cache, meta)
        elif self.sliding_window is None and (meta.on_device_only or x.is_cuda or not self.exact):
            out = self._paged_attention(q, k_cache, v_cache, meta)
        elif meta.on_device_only:
            out = self._windowed_decode(q, k_cache, v_cache, meta)
        else:
            out = self._torch_attention(q, k_cache, v_cache, meta)
        return self.o_proj(out.reshape(T, self.q_size))

    def _paged_attention(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        if meta.is_decode:
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor, self.scale,
                                          exact=self.exact)
        return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_query_lens,
                                       meta.seq_lens_tensor, self.scale, max_query_len=max(meta.query_lens),
                                       exact=self.exact)

    def _windowed_decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Sliding-window decode from device lengths: gather every page the table names and
        mask keys outside (len - window, len]. It reads the whole table width, so the caller
        keeps tables narrow where it can; correctness, not speed, is its job."""
        B, W = meta.block_tables.shape
        S = W * meta.block_size
        table = meta.block_tables.long().reshape(-1)
        k = k_cache.index_select(0, table).reshape(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v_cache.index_select(0, table).reshape(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        n = torch.arange(S, device=q.device)[None, :]
        lens = meta.seq_lens_tensor.long()[:, None]
        visible = (n < lens) & (n >= lens - self.sliding_window)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=visible[:, None, None, :], scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return o.squeeze(2)

    def _torch_attention(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        outs = []
        start = 0
        bs = meta.block_size
        for b, (q_len, kv_len) in enumerate(zip(meta.query_lens, meta.seq_lens)):
            # index_select copies whole pages (contiguous runs); advanced indexing of this strided
            # view goes element by element and costs about 4x as much on the CPU.
            pages = meta.block_tables[b, : (kv_len + bs - 1) // bs].long()
            k = k_cache.index_select(0, pages).reshape(-1, self.num_kv_heads, self.head_dim)[:kv_len]
            v = v_cache.index_select(0, pages).reshape(-1, self.num_kv_heads, self.head_dim)[:kv_len]
            qb = q[start : start + q_len]
            mask = self._mask(q_len, kv_len, q.device)
            o = F.scaled_dot_product_attention(
                qb.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                attn_mask=mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads,
            )
            outs.append(o.squeeze(0).transpose(0, 1))
            start += q_len
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _per_query_attention(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Each query over exactly its keys (its window's, on a sliding-window layer), in a call
        of its own: no masked longer row, so a query's reduction is the same whether it arrives
        alone, among other sequences' rows, or inside a prefill or verification chunk. For a
        decode row of a full-attention layer this is `_torch_attention`'s very call."""
        outs = []
        start = 0
        bs = meta.block_size
        for b, (q_len, kv_len) in enumerate(zip(meta.query_lens, meta.seq_lens)):
            pages = meta.block_tables[b, : (kv_len + bs - 1) // bs].long()
            k = k_cache[pages].reshape(-1, self.num_kv_heads, self.head_dim)[:kv_len].transpose(0, 1).unsqueeze(0)
            v = v_cache[pages].reshape(-1, self.num_kv_heads, self.head_dim)[:kv_len].transpose(0, 1).unsqueeze(0)
            for i in range(q_len):
                end = kv_len - q_len + i + 1  # keys 0..pos of the query at pos = end - 1
                lo = 0 if self.sliding_window is None else max(0, end - self.sliding_window)
                qi = q[start + i : start + i + 1].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qi, k[:, :, lo:end], v[:, :, lo:end], scale=self.scale,
                                                   enable_gqa=self.num_heads != self.num_kv_heads)
                outs.append(o.squeeze(0).transpose(0, 1))
            start += q_len
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _mask(self, q_len: int, kv_len: int, device) -> torch.Tensor | None:
        """Causal mask aligned to the end: query i sits at position kv_len - q_len + i."""
        if q_len == 1 and (self.sliding_window is None or kv_len <= self.sliding_window):
            return None
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        kv_pos = torch.arange(kv_len, device=device)[None, :]
        mask = kv_pos <= q_pos
        if self.sliding_window is not None:
            mask &= kv_pos > q_pos - self.sliding_window
        return mask
