#include "decoder_layer_cpu.h"

#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linear.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <vector>

#include "bf16_linear.h"
#include "decoder_ops.h"
#include "gguf_linear.h"
#include "int3_linear.h"
#include "paged_attention_cpu.h"

namespace arbitrage_fast {
namespace {

// Part tags besides the ggml types (decoder_layer_cpu.h).
constexpr int64_t kDense = -1, kInt3 = -2, kOneDnn = -3, kBf16 = -4, kLinear = -5;

// oneDNN's product over a weight it packed at load (cpu_linear.PackedLinear's call, bias inside).
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>)>();
  return op.call(x.contiguous(), packed, bias, "none", c10::List<std::optional<c10::Scalar>>(), "");
}

// x @ W.T + bias over a projection's parts, with its module's arithmetic: a QuantizedLinear's
// parts (GGUF blocks, dense tensors) or an Int3Linear's blocks add the bias after the product,
// as does Bf16Linear; an nn.Linear or a PackedLinear, one part each, sum it inside the product.
at::Tensor project(const at::Tensor& x, at::TensorList parts, at::IntArrayRef types,
                   const std::optional<at::Tensor>& bias, int64_t int3_group, const char* what) {
  TORCH_CHECK(!parts.empty() && parts.size() == types.size(), "decoder_layer: ", what, " has ", parts.size(),
              " parts and ", types.size(), " types");
  if (types[0] == kOneDnn || types[0] == kLinear) {
    TORCH_CHECK(parts.size() == 1, "decoder_layer: ", what, " is a single ", types[0] == kOneDnn ? "oneDNN" : "linear",
                " weight, got ", parts.size(), " parts");
    return types[0] == kOneDnn ? onednn_linear(x, parts[0], bias) : at::linear(x, parts[0], bias);
  }
  std::vector<at::Tensor> outs;
  outs.reserve(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    TORCH_CHECK(types[i] >= kBf16, "decoder_layer: ", what, " part ", i, " has unknown type ", types[i]);
    outs.push_back(types[i] == kDense  ? at::linear(x, parts[i])
                   : types[i] == kInt3 ? int3_linear_cpu(x, parts[i], int3_group, "auto")
                   : types[i] == kBf16 ? bf16_linear_cpu(x, parts[i], "auto")
                                       : gguf_linear_cpu(x, parts[i], types[i], "auto"));
  }
  at::Tensor y = outs.size() == 1 ? outs[0] : at::cat(outs, -1);
  return bias ? at::add(y, *bias) : y;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decoder_layer_cpu(
    const at::Tensor& h, const std::optional<at::Tensor>& residual, const at::Tensor& input_norm,
    const at::Tensor& post_norm, double eps, at::TensorList qkv, at::IntArrayRef qkv_types,
    const std::optional<at::Tensor>& qkv_bias, at::TensorList o, at::IntArrayRef o_types,
    const std::optional<at::Tensor>& o_bias, at::TensorList gate_up, at::IntArrayRef gate_up_types,
    const std::optional<at::Tensor>& gate_up_bias, at::TensorList down, at::IntArrayRef down_types,
    const std::optional<at::Tensor>& down_bias, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& kv_cache, int64_t layer, const at::Tensor& slots, const at::Tensor& block_tables,
    const at::Tensor& cu_query_lens, const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads,
    double scale, int64_t int3_group) {
  TORCH_CHECK(h.dim() == 2, "decoder_layer: h must be [tokens, hidden], got ", h.sizes());
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(4) == num_kv_heads,
              "decoder_layer: kv_cache must be [pages, layers, 2, block_size, ", num_kv_heads, ", head_dim], got ",
              kv_cache.sizes());
  const int64_t T = h.size(0), D = kv_cache.size(5), q_size = num_heads * D, kv_size = num_kv_heads * D;
  // The input norm; the first layer has no residual and its stream is the embedding itself.
  at::Tensor normed, stream;
  if (residual) {
    std::tie(normed, stream) = add_rms_norm_cpu(h, residual, input_norm, eps);
  } else {
    normed = std::get<0>(add_rms_norm_cpu(h, std::nullopt, input_norm, eps));
    stream = h;
  }
  // Attention: fused QKV, RoPE with the KV write, paged attention over this layer's pages.
  const at::Tensor qkv_out = project(normed, qkv, qkv_types, qkv_bias, int3_group, "qkv");
  TORCH_CHECK(qkv_out.size(1) == q_size + 2 * kv_size, "decoder_layer: qkv gives ", qkv_out.size(1),
              " outputs, the heads need ", q_size + 2 * kv_size);
  const std::vector<at::Tensor> qkv_parts = qkv_out.split_with_sizes({q_size, kv_size, kv_size}, -1);
  const at::Tensor q = rope_write_kv_cpu(qkv_parts[0].view({T, num_heads, D}), qkv_parts[1].view({T, num_kv_heads, D}),
                                         qkv_parts[2].view({T, num_kv_heads, D}), cos, sin, kv_cache, layer, slots);
  const std::vector<at::Tensor> kv = kv_cache.select(1, layer).unbind(1);
  const at::Tensor attn = paged_attention_cpu(q, kv[0], kv[1], block_tables, cu_query_lens, seq_lens, scale);
  const at::Tensor attn_out = project(attn.reshape({T, q_size}), o, o_types, o_bias, int3_group, "o");
  // The post-attention norm closes the attention's residual add; then the MLP.
  auto [mlp_in, mlp_stream] = add_rms_norm_cpu(attn_out, stream, post_norm, eps);
  const at::Tensor act = silu_and_mul_cpu(project(mlp_in, gate_up, gate_up_types, gate_up_bias, int3_group, "gate_up"));
  return {project(act, down, down_types, down_bias, int3_group, "down"), mlp_stream};
}

}  // namespace arbitrage_fast
