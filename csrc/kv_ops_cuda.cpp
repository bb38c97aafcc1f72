// Torch glue for the CUDA kernels: argument checks, device guard, current stream, byte
// strides. Compiled only when the installed torch has CUDA. Nothing here synchronizes with
// the host, so both ops can be captured in CUDA graphs.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kv_ops.h"
#include "kv_ops_cuda.h"

namespace arbitrage_fast {

void write_kv_cuda(const at::Tensor& cache, int64_t layer, const at::Tensor& key,
                   const at::Tensor& value, const at::Tensor& slots) {
  check_write_kv_args(cache, layer, key, value, slots);
  TORCH_CHECK(cache.is_cuda(), "write_kv_cuda: tensors must be on a CUDA device");
  if (key.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(cache.device());
  const at::Tensor slots_c = slots.contiguous();
  const int64_t e = cache.element_size();
  WriteKVLaunch a{};
  a.cache = static_cast<char*>(cache.data_ptr()) + layer * cache.stride(1) * e;
  a.key = static_cast<const char*>(key.data_ptr());
  a.value = static_cast<const char*>(value.data_ptr());
  a.slots = slots_c.data_ptr<int64_t>();
  a.num_tokens = key.size(0);
  a.capacity = cache.size(0) * cache.size(3);
  a.block_size = cache.size(3);
  a.heads = cache.size(4);
  a.head_dim = cache.size(5);
  a.elem_bytes = e;
  a.c_page = cache.stride(0) * e;
  a.c_kv = cache.stride(2) * e;
  a.c_token = cache.stride(3) * e;
  a.c_head = cache.stride(4) * e;
  a.c_dim = cache.stride(5) * e;
  a.k_token = key.stride(0) * e;
  a.k_head = key.stride(1) * e;
  a.k_dim = key.stride(2) * e;
  a.v_token = value.stride(0) * e;
  a.v_head = value.stride(1) * e;
  a.v_dim = value.stride(2) * e;
  C10_CUDA_CHECK(launch_write_kv(a, c10::cuda::getCurrentCUDAStream()));
}

void copy_pages_cuda(const at::Tensor& arena, const at::Tensor& src, const at::Tensor& dst) {
  check_copy_pages_args(arena, src, dst);
  TORCH_CHECK(arena.is_cuda(), "copy_pages_cuda: tensors must be on a CUDA device");
  if (src.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(arena.device());
  const at::Tensor src_c = src.contiguous();
  const at::Tensor dst_c = dst.contiguous();
  CopyPagesLaunch a{};
  a.arena = static_cast<char*>(arena.data_ptr());
  a.src = src_c.data_ptr<int64_t>();
  a.dst = dst_c.data_ptr<int64_t>();
  a.num_pairs = src.size(0);
  a.num_pages = arena.size(0);
  a.row_bytes = arena.size(1) * arena.element_size();
  a.row_stride = arena.stride(0) * arena.element_size();
  C10_CUDA_CHECK(launch_copy_pages(a, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace arbitrage_fast
