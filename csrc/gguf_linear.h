// Weight-only quantized linear layers over GGUF blocks, registered as
// torch.ops.arbitrage_fast.{gguf_linear,gguf_dequantize,gguf_cpu_paths}.
//
//   gguf_linear(x[M, K] float32|bfloat16|float16, weight[N, row_bytes] uint8, type, isa)
//     -> [M, N] in x's dtype: x @ W.T where W is the row-major GGUF tensor `weight` holds
//     (N rows of K / block_elems blocks of ggml type `type`). x is quantized to int8 first,
//     one scale per block of the weight (gguf_blocks.h), as llama.cpp does; integer dots are
//     summed in fp32.
//     `isa` picks the code path: "auto" (the best this CPU runs), "avx512_vnni", "avx2" or
//     "scalar" (the portable path every other one is tested against).
//   gguf_dequantize(weight[N, row_bytes] uint8, type, K) -> [N, K] float32.
//   gguf_cpu_paths() -> the paths this CPU runs, best first.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <string>
#include <vector>

namespace arbitrage_fast {

at::Tensor gguf_linear_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t type,
                           c10::string_view isa);
at::Tensor gguf_linear_meta(const at::Tensor& x, const at::Tensor& weight, int64_t type,
                            c10::string_view isa);
at::Tensor gguf_dequantize_cpu(const at::Tensor& weight, int64_t type, int64_t in_features);
at::Tensor gguf_dequantize_meta(const at::Tensor& weight, int64_t type, int64_t in_features);
std::vector<std::string> gguf_cpu_paths();

namespace gguf {

// x [rows, K] (K a multiple of `group`, a multiple of 32) quantized for the int8 products
// (gguf_blocks.h): q [rows, K] int8, the scale d [rows, K / group] and per group of 32 the
// scaled sum s [rows, K / 32], both float32. Every product over int8 activations (the GGUF
// formats, the engine's int3 blocks) starts here.
struct QuantizedActivations {
  at::Tensor q, d, s;
};
QuantizedActivations quantize_activations(const at::Tensor& x, int64_t group = 32);

}  // namespace gguf

}  // namespace arbitrage_fast
