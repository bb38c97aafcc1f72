// One whole decoder layer on the CPU, as one op: what the Python modules (DecoderLayer ->
// RMSNorm, PagedAttention, GatedMLP, and the layer's linears) do with exact arithmetic off,
// calling the same kernels in the same order, so its outputs are theirs bit
// for bit; only the per-op Python and dispatch between them is gone (about a sixth of a
// decode token of a 0.5B model on two cores, where llama.cpp runs its graph in C++).
//
//   decoder_layer(h[T, H], residual[T, H]?, input_norm[H], post_norm[H], eps,
//                 qkv[], qkv_types[], qkv_bias?, o[], o_types[], o_bias?,
//                 gate_up[], gate_up_types[], gate_up_bias?, down[], down_types[], down_bias?,
//                 cos[T, D], sin[T, D], kv_cache[P, L, 2, bs, Hkv, D], layer, slots[T],
//                 block_tables, cu_query_lens, seq_lens, num_heads, num_kv_heads, scale, int3_group)
//     -> (this layer's MLP output, the residual stream before it)  (DecoderLayer.forward)
//   A projection is its parts in output order (QuantizedLinear): uint8 GGUF blocks with their
//   ggml type, a dense [rows, K] weight with type -1, or the engine's int3 blocks
//   (Int3Linear, int3_linear.h) with type -2 and groups of `int3_group` inputs. A 16/32-bit
//   layer's projection is one part: oneDNN's packed weight (cpu_linear.PackedLinear) -3, a
//   bf16 weight for the engine's row-invariant kernel (Bf16Linear, bf16_linear.h) -4, or an
//   nn.Linear's weight -5.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace arbitrage_fast {

std::tuple<at::Tensor, at::Tensor> decoder_layer_cpu(
    const at::Tensor& h, const std::optional<at::Tensor>& residual, const at::Tensor& input_norm,
    const at::Tensor& post_norm, double eps, at::TensorList qkv, at::IntArrayRef qkv_types,
    const std::optional<at::Tensor>& qkv_bias, at::TensorList o, at::IntArrayRef o_types,
    const std::optional<at::Tensor>& o_bias, at::TensorList gate_up, at::IntArrayRef gate_up_types,
    const std::optional<at::Tensor>& gate_up_bias, at::TensorList down, at::IntArrayRef down_types,
    const std::optional<at::Tensor>& down_bias, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& kv_cache, int64_t layer, const at::Tensor& slots, const at::Tensor& block_tables,
    const at::Tensor& cu_query_lens, const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads,
    double scale, int64_t int3_group);

}  // namespace arbitrage_fast
