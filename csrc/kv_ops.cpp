#include "kv_ops.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstring>

namespace arbitrage_fast {
namespace {

bool is_kv_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Copies one [H, D] block between two strided layouts (strides in bytes). The common case,
// both blocks dense, is one memcpy; K/V rows are never converted, only moved.
void copy_block(char* dst, int64_t dst_head, int64_t dst_dim, const char* src, int64_t src_head,
                int64_t src_dim, int64_t heads, int64_t dim, int64_t elem) {
  const bool dims_dense = dst_dim == elem && src_dim == elem;
  if (dims_dense && dst_head == dim * elem && src_head == dim * elem) {
    std::memcpy(dst, src, heads * dim * elem);
  } else if (dims_dense) {
    for (int64_t h = 0; h < heads; ++h) {
      std::memcpy(dst + h * dst_head, src + h * src_head, dim * elem);
    }
  } else {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t d = 0; d < dim; ++d) {
        std::memcpy(dst + h * dst_head + d * dst_dim, src + h * src_head + d * src_dim, elem);
      }
    }
  }
}

}  // namespace

void check_write_kv_args(const at::Tensor& cache, int64_t layer, const at::Tensor& key,
                         const at::Tensor& value, const at::Tensor& slots) {
  TORCH_CHECK(cache.dim() == 6 && cache.size(2) == 2,
              "write_kv: cache must be [pages, layers, 2, block_size, heads, head_dim], got ",
              cache.sizes());
  TORCH_CHECK(0 <= layer && layer < cache.size(1), "write_kv: layer ", layer,
              " out of range [0, ", cache.size(1), ")");
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(),
              "write_kv: key and value must both be [tokens, heads, head_dim], got ",
              key.sizes(), " and ", value.sizes());
  TORCH_CHECK(key.size(1) == cache.size(4) && key.size(2) == cache.size(5),
              "write_kv: key rows are [", key.size(1), ", ", key.size(2),
              "] but cache rows are [", cache.size(4), ", ", cache.size(5), "]");
  TORCH_CHECK(is_kv_dtype(cache.scalar_type()),
              "write_kv: cache dtype must be float32, float16 or bfloat16, got ",
              cache.scalar_type());
  TORCH_CHECK(key.scalar_type() == cache.scalar_type() &&
                  value.scalar_type() == cache.scalar_type(),
              "write_kv: key/value dtype (", key.scalar_type(), "/", value.scalar_type(),
              ") must equal the cache dtype ", cache.scalar_type());
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == key.size(0),
              "write_kv: slots must be [", key.size(0), "], got ", slots.sizes());
  TORCH_CHECK(slots.scalar_type() == at::kLong, "write_kv: slots must be int64, got ",
              slots.scalar_type());
  TORCH_CHECK(key.device() == cache.device() && value.device() == cache.device() &&
                  slots.device() == cache.device(),
              "write_kv: cache, key, value and slots must share one device");
}

void check_copy_pages_args(const at::Tensor& arena, const at::Tensor& src,
                           const at::Tensor& dst) {
  TORCH_CHECK(arena.dim() == 2, "copy_pages: arena must be [pages, page_elems], got ",
              arena.sizes());
  TORCH_CHECK(arena.size(1) <= 1 || arena.stride(1) == 1,
              "copy_pages: a page's elements must be contiguous");
  TORCH_CHECK(src.dim() == 1 && dst.dim() == 1 && src.size(0) == dst.size(0),
              "copy_pages: src and dst must be 1-D of equal length, got ", src.sizes(),
              " and ", dst.sizes());
  TORCH_CHECK(src.scalar_type() == at::kLong && dst.scalar_type() == at::kLong,
              "copy_pages: src and dst must be int64");
  TORCH_CHECK(src.device() == arena.device() && dst.device() == arena.device(),
              "copy_pages: arena, src and dst must share one device");
}

void write_kv_cpu(const at::Tensor& cache, int64_t layer, const at::Tensor& key,
                  const at::Tensor& value, const at::Tensor& slots) {
  check_write_kv_args(cache, layer, key, value, slots);
  const int64_t elem = cache.element_size();
  const int64_t block_size = cache.size(3), heads = cache.size(4), dim = cache.size(5);
  const int64_t capacity = cache.size(0) * block_size;
  char* layer_base = static_cast<char*>(cache.data_ptr()) + layer * cache.stride(1) * elem;
  const char* key_base = static_cast<const char*>(key.data_ptr());
  const char* value_base = static_cast<const char*>(value.data_ptr());
  const auto slot = slots.accessor<int64_t, 1>();
  for (int64_t i = 0; i < slots.size(0); ++i) {
    TORCH_CHECK(-1 <= slot[i] && slot[i] < capacity, "write_kv: slot ", slot[i],
                " out of range [-1, ", capacity, ")");
  }
  // Rows are independent (distinct slots), so prefill-sized writes split across threads.
  at::parallel_for(0, slots.size(0), 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (slot[i] < 0) continue;
      char* k_dst = layer_base + ((slot[i] / block_size) * cache.stride(0) +
                                  (slot[i] % block_size) * cache.stride(3)) * elem;
      char* v_dst = k_dst + cache.stride(2) * elem;
      copy_block(k_dst, cache.stride(4) * elem, cache.stride(5) * elem,
                 key_base + i * key.stride(0) * elem, key.stride(1) * elem,
                 key.stride(2) * elem, heads, dim, elem);
      copy_block(v_dst, cache.stride(4) * elem, cache.stride(5) * elem,
                 value_base + i * value.stride(0) * elem, value.stride(1) * elem,
                 value.stride(2) * elem, heads, dim, elem);
    }
  });
}

void copy_pages_cpu(const at::Tensor& arena, const at::Tensor& src, const at::Tensor& dst) {
  check_copy_pages_args(arena, src, dst);
  const int64_t pages = arena.size(0);
  const int64_t row_bytes = arena.size(1) * arena.element_size();
  const int64_t row_stride = arena.stride(0) * arena.element_size();
  char* base = static_cast<char*>(arena.data_ptr());
  const auto s = src.accessor<int64_t, 1>();
  const auto d = dst.accessor<int64_t, 1>();
  for (int64_t i = 0; i < src.size(0); ++i) {
    TORCH_CHECK(0 <= s[i] && s[i] < pages && 0 <= d[i] && d[i] < pages,
                "copy_pages: page pair (", s[i], ", ", d[i], ") out of range [0, ", pages, ")");
    if (s[i] != d[i]) std::memcpy(base + d[i] * row_stride, base + s[i] * row_stride, row_bytes);
  }
}

}  // namespace arbitrage_fast
