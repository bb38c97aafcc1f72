// Dense bf16 linear layers for CPUs without native bf16 matmul, registered as
// torch.ops.arbitrage_fast.bf16_linear, with their code paths as _C.bf16_cpu_paths.
//
//   bf16_linear(x[M, K] float32|bfloat16, weight[N, K] bfloat16, isa) -> [M, N] in x's dtype:
//     x @ W.T with products summed in fp32. Each output element is one dot product whose
//     summation order depends only on K, never on M or on where the row sits in the batch, so a
//     row gets the same bits alone, in a batch or inside a prefill. `isa`: "auto" (the best this
//     CPU runs), "avx2" or "scalar" (the portable path).
//   bf16_cpu_paths() -> the paths this build runs on this CPU, best first.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <string>
#include <vector>

namespace arbitrage_fast {

at::Tensor bf16_linear_cpu(const at::Tensor& x, const at::Tensor& weight, c10::string_view isa);
at::Tensor bf16_linear_meta(const at::Tensor& x, const at::Tensor& weight, c10::string_view isa);
std::vector<std::string> bf16_cpu_paths();

}  // namespace arbitrage_fast
