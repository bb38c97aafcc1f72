// The small per-token ops of a decoder layer on the CPU, each one call in place of the
// several torch ops of its twin (triton_kernels/{rms_norm,rotary_kv,activation}.py), whose
// contracts they keep:
//
//   add_rms_norm(x[T, H], residual[T, H]?, weight[H], eps) -> (normed, stream)
//     stream = residual + x (a copy of x when there is no residual: an op's outputs never
//     alias its inputs); normed = weight * norm(stream),
//     the variance and scaling in fp32, cast to the stream's dtype before the weight.
//     The sum of squares is accumulated in double, so it can differ from torch's mean in
//     the last bit: callers that promise transformers' exact arithmetic keep the twin.
//   rope_write_kv(q[T, Hq, D], k[T, Hkv, D], v[T, Hkv, D], cos[T, D], sin[T, D], cache, layer,
//                 slots[T]) -> q rotated
//     rotate-half RoPE, each product and the sum rounded to the input dtype as torch rounds
//     them, so the result is the twin's bit for bit; k rotated and v go to the pages
//     (write_kv's contract, slot -1 skipped).
//   silu_and_mul(gate_up[T, 2I]) -> silu(gate) * up, rounded as the twin rounds (silu, then
//     the product); exp is a vectorised polynomial within 2 ulp of libm's.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace arbitrage_fast {

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                    const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm_meta(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                     const at::Tensor& weight, double eps);
at::Tensor rope_write_kv_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                             const at::Tensor& sin, const at::Tensor& cache, int64_t layer, const at::Tensor& slots);
at::Tensor rope_write_kv_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                              const at::Tensor& sin, const at::Tensor& cache, int64_t layer, const at::Tensor& slots);
at::Tensor silu_and_mul_cpu(const at::Tensor& gate_up);
at::Tensor silu_and_mul_meta(const at::Tensor& gate_up);

}  // namespace arbitrage_fast
