// CUDA kernels behind write_kv and copy_pages.
//
// Both ops move bits without arithmetic, so kernels are templated on the width of the word
// they move, not on the dtype: float16 and bfloat16 share one instantiation. When rows are
// dense and every address is aligned, rows move as 16-byte words (one uint4 per thread per
// step), as bandwidth-bound copies want; the strided fallback moves one element at a time.
#include <cuda_runtime.h>
#include <stdint.h>

#include "kv_ops_cuda.h"

namespace arbitrage_fast {
namespace {

constexpr int kThreads = 128;

// The widest power-of-two word (<= 16 bytes) that divides every byte quantity OR-ed into
// `quantities` (addresses, strides, row sizes): the lowest set bit of their union.
int64_t word_bytes(uint64_t quantities) {
  const uint64_t bits = quantities | 16u;
  return static_cast<int64_t>(bits & (~bits + 1));
}

template <typename Word>
__global__ void write_kv_dense_kernel(WriteKVLaunch a, int64_t row_words) {
  const int64_t slot = a.slots[blockIdx.x];
  if (slot < 0 || slot >= a.capacity) return;  // -1 is padding
  char* k_dst = a.cache + (slot / a.block_size) * a.c_page + (slot % a.block_size) * a.c_token;
  Word* kd = reinterpret_cast<Word*>(k_dst);
  Word* vd = reinterpret_cast<Word*>(k_dst + a.c_kv);
  const Word* ks = reinterpret_cast<const Word*>(a.key + blockIdx.x * a.k_token);
  const Word* vs = reinterpret_cast<const Word*>(a.value + blockIdx.x * a.v_token);
  for (int64_t w = threadIdx.x; w < row_words; w += blockDim.x) {
    kd[w] = ks[w];
    vd[w] = vs[w];
  }
}

template <typename Word>
__global__ void write_kv_strided_kernel(WriteKVLaunch a) {
  const int64_t slot = a.slots[blockIdx.x];
  if (slot < 0 || slot >= a.capacity) return;
  char* k_dst = a.cache + (slot / a.block_size) * a.c_page + (slot % a.block_size) * a.c_token;
  char* v_dst = k_dst + a.c_kv;
  const char* k_src = a.key + blockIdx.x * a.k_token;
  const char* v_src = a.value + blockIdx.x * a.v_token;
  for (int64_t e = threadIdx.x; e < a.heads * a.head_dim; e += blockDim.x) {
    const int64_t h = e / a.head_dim, d = e % a.head_dim;
    *reinterpret_cast<Word*>(k_dst + h * a.c_head + d * a.c_dim) =
        *reinterpret_cast<const Word*>(k_src + h * a.k_head + d * a.k_dim);
    *reinterpret_cast<Word*>(v_dst + h * a.c_head + d * a.c_dim) =
        *reinterpret_cast<const Word*>(v_src + h * a.v_head + d * a.v_dim);
  }
}

template <typename Word>
__global__ void copy_pages_kernel(CopyPagesLaunch a) {
  const int64_t words = a.row_bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t p = blockIdx.y; p < a.num_pairs; p += gridDim.y) {
    const int64_t s = a.src[p], d = a.dst[p];
    if (s == d || s < 0 || d < 0 || s >= a.num_pages || d >= a.num_pages) continue;
    const Word* from = reinterpret_cast<const Word*>(a.arena + s * a.row_stride);
    Word* to = reinterpret_cast<Word*>(a.arena + d * a.row_stride);
    for (int64_t w = blockIdx.x * blockDim.x + threadIdx.x; w < words;
         w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      to[w] = from[w];
    }
  }
}

}  // namespace

cudaError_t launch_write_kv(const WriteKVLaunch& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(a.num_tokens));
  const int64_t row_bytes = a.heads * a.head_dim * a.elem_bytes;
  const bool dense = a.c_dim == a.elem_bytes && a.k_dim == a.elem_bytes &&
                     a.v_dim == a.elem_bytes && a.c_head == a.head_dim * a.elem_bytes &&
                     a.k_head == a.head_dim * a.elem_bytes &&
                     a.v_head == a.head_dim * a.elem_bytes;
  if (dense) {
    const int64_t word = word_bytes(
        reinterpret_cast<uint64_t>(a.cache) | reinterpret_cast<uint64_t>(a.key) |
        reinterpret_cast<uint64_t>(a.value) | static_cast<uint64_t>(a.c_page) |
        static_cast<uint64_t>(a.c_kv) | static_cast<uint64_t>(a.c_token) |
        static_cast<uint64_t>(a.k_token) | static_cast<uint64_t>(a.v_token) |
        static_cast<uint64_t>(row_bytes));
    const int64_t row_words = row_bytes / word;
    switch (word) {
      case 16: write_kv_dense_kernel<uint4><<<grid, kThreads, 0, stream>>>(a, row_words); break;
      case 8: write_kv_dense_kernel<uint2><<<grid, kThreads, 0, stream>>>(a, row_words); break;
      case 4: write_kv_dense_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(a, row_words); break;
      default: write_kv_dense_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(a, row_words);
    }
  } else if (a.elem_bytes == 4) {
    write_kv_strided_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(a);
  } else {
    write_kv_strided_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t launch_copy_pages(const CopyPagesLaunch& a, cudaStream_t stream) {
  if (a.num_pairs == 0 || a.row_bytes == 0) return cudaSuccess;
  const int64_t word =
      word_bytes(reinterpret_cast<uint64_t>(a.arena) | static_cast<uint64_t>(a.row_stride) |
                 static_cast<uint64_t>(a.row_bytes));
  // About a thousand blocks in flight whatever the pair count: a single copy-on-write page
  // (the usual case) still spreads over the whole GPU.
  const int64_t pairs = a.num_pairs < 65535 ? a.num_pairs : 65535;
  const int64_t words = a.row_bytes / word;
  int64_t per_row = (words + kThreads - 1) / kThreads;
  const int64_t cap = 1024 / pairs > 1 ? 1024 / pairs : 1;
  if (per_row > cap) per_row = cap;
  const dim3 grid(static_cast<unsigned>(per_row), static_cast<unsigned>(pairs));
  switch (word) {
    case 16: copy_pages_kernel<uint4><<<grid, kThreads, 0, stream>>>(a); break;
    case 8: copy_pages_kernel<uint2><<<grid, kThreads, 0, stream>>>(a); break;
    case 4: copy_pages_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(a); break;
    case 2: copy_pages_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(a); break;
    default: copy_pages_kernel<uint8_t><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace arbitrage_fast
