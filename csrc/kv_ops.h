// Writing K/V into pages and copying pages: argument checks shared by every device, and the
// per-device implementations registered as torch.ops.arbitrage_fast.{write_kv,copy_pages}.
//
//   write_kv(cache[P, L, 2, bs, H, D], layer, key[N, H, D], value[N, H, D], slots[N] int64)
//     cache[slots[i] / bs, layer, 0, slots[i] % bs] = key[i]   (index 1 for value)
//     slots[i] == -1 is padding and is skipped. `cache` is a strided view of the arena, so
//     only its strides say where a page starts.
//   copy_pages(arena[P, E], src[n] int64, dst[n] int64)
//     arena[dst[i]] = arena[src[i]]; the dst pages must not appear in src (copy-on-write
//     always copies into fresh pages, so this never binds in practice).
#pragma once

#include <ATen/core/Tensor.h>

namespace arbitrage_fast {

void check_write_kv_args(const at::Tensor& cache, int64_t layer, const at::Tensor& key,
                         const at::Tensor& value, const at::Tensor& slots);
void check_copy_pages_args(const at::Tensor& arena, const at::Tensor& src,
                           const at::Tensor& dst);

void write_kv_cpu(const at::Tensor& cache, int64_t layer, const at::Tensor& key,
                  const at::Tensor& value, const at::Tensor& slots);
void copy_pages_cpu(const at::Tensor& arena, const at::Tensor& src, const at::Tensor& dst);

#ifdef ARBITRAGE_FAST_WITH_CUDA
void write_kv_cuda(const at::Tensor& cache, int64_t layer, const at::Tensor& key,
                   const at::Tensor& value, const at::Tensor& slots);
void copy_pages_cuda(const at::Tensor& arena, const at::Tensor& src, const at::Tensor& dst);
#endif

}  // namespace arbitrage_fast
