// Attention over the paged KV arena on the CPU, reading K/V in place through the block table
// (the contract of triton_kernels/paged_attention.py's paged_prefill_attention):
//
//   paged_attention(q[T, Hq, D], k_cache[P, bs, Hkv, D], v_cache, block_tables[B, W] int32,
//                   cu_query_lens[B + 1] int32, seq_lens[B] int32, scale) -> [T, Hq, D]
//     the q_len_b = cu[b + 1] - cu[b] queries of sequence b are the last q_len_b of its
//     seq_lens[b] cached tokens and each attends causally to every cached position up to its
//     own; a decode batch is cu = 0..B. Scores, softmax and the weighted sum in fp32.
//
// One work item per (query token, kv head): its query heads go over the keys together, block
// by block with a running max and sum (flash-attention style), reading each K/V row in place
// once for the group; nothing is gathered into a contiguous copy. Summation order differs
// from torch's, so this serves callers that accept an ulp-level departure (LlamaDecoder's
// exact arithmetic off).
#pragma once

#include <ATen/core/Tensor.h>

namespace arbitrage_fast {

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& cu_query_lens,
                               const at::Tensor& seq_lens, double scale);
at::Tensor paged_attention_meta(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& cu_query_lens,
                                const at::Tensor& seq_lens, double scale);

}  // namespace arbitrage_fast
