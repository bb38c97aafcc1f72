// The engine's own 3-bit weight blocks on the CPU (quantize-on-load int3), registered as
// torch.ops.arbitrage_fast.{int3_linear,int3_dequantize}.
//
// Layout of one weight row of K inputs (K a multiple of 32) quantized in groups of G inputs
// (G = 32, 64 or 128; the last group may be partial, a multiple of 32 still): the row is its
// groups laid end to end, and a group is
//   d  fp16 (2 bytes), m fp16 (2 bytes),
//   then for each 32 inputs of the group 12 bytes of 3-bit codes q in [0, 7]:
//     qs[8]  bits 2t..2t+1 of byte j hold the low two bits of input j + 8t (t = 0..3),
//     qh[4]  bit i of the little-endian 32-bit word holds the third bit of input i,
// and weight = d * q + m. A row holds 4 * ceil(K / G) + 12 * K / 32 bytes: 3.5 bits a weight
// at G = 64 (3.25 at 128, 4 at 32), against Q4_1's 5.
//
// Why this split of the bits: two-bit fields that never straddle a byte, and a third bit per
// input that one byte shuffle spreads, unpack to 32 bytes with shifts, masks and one
// compare, where 3-bit codes packed end to end would straddle bytes.
//
//   int3_linear(x[M, K] float32|bfloat16|float16, weight[N, row_bytes] uint8, group, isa)
//     -> [M, N] in x's dtype: x @ W.T. x is quantized to int8 per 32 inputs first, as for the
//     GGUF formats (gguf_blocks.h), dots are integer and sums fp32; a group of 32 adds exactly
//     what a Q4_1 block holding the same d, m and codes adds on the same code path.
//     `isa`: "auto" (AVX2 where the CPU has it), "avx2" or "scalar" (the portable path).
//   int3_dequantize(weight, group, K) -> [N, K] float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace arbitrage_fast {

at::Tensor int3_linear_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t group,
                           c10::string_view isa);
at::Tensor int3_linear_meta(const at::Tensor& x, const at::Tensor& weight, int64_t group,
                            c10::string_view isa);
at::Tensor int3_dequantize_cpu(const at::Tensor& weight, int64_t group, int64_t in_features);
at::Tensor int3_dequantize_meta(const at::Tensor& weight, int64_t group, int64_t in_features);

}  // namespace arbitrage_fast
