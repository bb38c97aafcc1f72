// Dense bf16 linear layers for CPUs without native bf16 matmul, registered as
// torch.ops.arbitrage_fast.bf16_linear.
//
//   bf16_linear(x[M, K] float32|bfloat16, weight[N, K] bfloat16, isa) -> [M, N] in x's dtype:
//     x @ W.T with products summed in fp32. Each output element is one dot product whose
//     summation order depends only on K, never on M or on where the row sits in the batch, so a
//     row gets the same bits alone, in a batch or inside a prefill. `isa`: "auto" (the best this
//     CPU runs), "avx2" or "scalar" (the portable path).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace arbitrage_fast {

at::Tensor bf16_linear_cpu(const at::Tensor& x, const at::Tensor& weight, c10::string_view isa);
at::Tensor bf16_linear_meta(const at::Tensor& x, const at::Tensor& weight, c10::string_view isa);

}  // namespace arbitrage_fast
