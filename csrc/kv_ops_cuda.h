// Plain launch interface of the CUDA kernels in kv_ops.cu: raw pointers, sizes and byte
// strides only, so the .cu file compiles without torch headers and the torch glue
// (kv_ops_cuda.cpp) compiles without nvcc.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace arbitrage_fast {

struct WriteKVLaunch {
  char* cache;  // already offset to the layer being written
  const char* key;
  const char* value;
  const int64_t* slots;  // contiguous, num_tokens entries
  int64_t num_tokens;
  int64_t capacity;  // pages * block_size; slots outside [0, capacity) are skipped
  int64_t block_size, heads, head_dim;
  int64_t elem_bytes;  // 2 or 4: kernels move bits, so only the width matters
  // Byte strides. cache: page, K->V, token-in-page, head, dim. key/value: token, head, dim.
  int64_t c_page, c_kv, c_token, c_head, c_dim;
  int64_t k_token, k_head, k_dim;
  int64_t v_token, v_head, v_dim;
};

struct CopyPagesLaunch {
  char* arena;
  const int64_t* src;  // contiguous, num_pairs entries
  const int64_t* dst;
  int64_t num_pairs, num_pages;
  int64_t row_bytes, row_stride;  // bytes of one page, bytes between pages
};

cudaError_t launch_write_kv(const WriteKVLaunch& args, cudaStream_t stream);
cudaError_t launch_copy_pages(const CopyPagesLaunch& args, cudaStream_t stream);

}  // namespace arbitrage_fast
