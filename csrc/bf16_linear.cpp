#include "bf16_linear.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

#include "cpu_features.h"

namespace arbitrage_fast {
namespace bf16 {

// Every path sums a dot product the same way: eight fp32 lanes, lane i taking elements
// k = i (mod 8) of the first K - K % 8, in order; then the lanes pairwise (0+4, 1+5, 2+6, 3+7,
// then (0+2), (1+3), then the two); then the K % 8 tail, in order. The scalar path spells this
// out, so it is the twin of the vector one bit for bit.
inline float from_bf16(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float lanes_sum(const float l[8]) {
  const float a0 = l[0] + l[4], a1 = l[1] + l[5], a2 = l[2] + l[6], a3 = l[3] + l[7];
  return (a0 + a2) + (a1 + a3);
}

float dot_scalar(const float* x, const uint16_t* w, int64_t k) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t body = k - k % 8;
  for (int64_t i = 0; i < body; i += 8) {
    for (int l = 0; l < 8; ++l) lane[l] = std::fma(x[i + l], from_bf16(w[i + l]), lane[l]);
  }
  float s = lanes_sum(lane);
  for (int64_t i = body; i < k; ++i) s = std::fma(x[i], from_bf16(w[i]), s);
  return s;
}

#if AF_X86
AF_TARGET_AVX2 static inline __m256 load_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AF_TARGET_AVX2 static inline float finish(__m256 acc, const float* x, const uint16_t* w,
                                          int64_t body, int64_t k) {
  // The same pairing as lanes_sum: (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then the two.
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float r = _mm_cvtss_f32(s);
  for (int64_t i = body; i < k; ++i) r = std::fma(x[i], from_bf16(w[i]), r);
  return r;
}

// An R x C tile of outputs: R activation rows against C weight rows, one accumulator each,
// so a loaded weight vector serves R rows and a loaded activation vector C weight rows.
template <int R, int C>
AF_TARGET_AVX2 static void tile(const float* x, int64_t x_stride, const uint16_t* w,
                                int64_t w_stride, int64_t k, float* out, int64_t out_stride) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t body = k - k % 8;
  for (int64_t i = 0; i < body; i += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load_bf16(w + c * w_stride + i);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * x_stride + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      out[r * out_stride + c] = finish(acc[r][c], x + r * x_stride, w + c * w_stride, body, k);
}

// Row-tile heights and the weight rows each takes at once (at most 8 accumulators live).
template <int R, int C>
AF_TARGET_AVX2 static void rows_against(const float* x, int64_t k, const uint16_t* w,
                                        int64_t j0, int64_t j1, float* out, int64_t n) {
  int64_t j = j0;
  for (; j + C <= j1; j += C) tile<R, C>(x, k, w + j * k, k, k, out + j, n);
  for (; j < j1; ++j) tile<R, 1>(x, k, w + j * k, k, k, out + j, n);
}

AF_TARGET_AVX2 static void linear_avx2(const float* x, int64_t m, int64_t k, const uint16_t* w,
                                       int64_t j0, int64_t j1, float* out, int64_t n) {
  int64_t r = 0;
  for (; r + 8 <= m; r += 8) rows_against<8, 1>(x + r * k, k, w, j0, j1, out + r * n, n);
  for (; r + 4 <= m; r += 4) rows_against<4, 2>(x + r * k, k, w, j0, j1, out + r * n, n);
  // Two or three rows left (a few decode rows): one pass over the weight for all of them, where
  // one-row tiles streamed it once per row.
  if (m - r == 3) rows_against<3, 2>(x + r * k, k, w, j0, j1, out + r * n, n), r += 3;
  if (m - r == 2) rows_against<2, 4>(x + r * k, k, w, j0, j1, out + r * n, n), r += 2;
  for (; r < m; ++r) rows_against<1, 8>(x + r * k, k, w, j0, j1, out + r * n, n);
}
#else
static void linear_avx2(const float*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, float*,
                        int64_t) {}
#endif

}  // namespace bf16

std::vector<std::string> bf16_cpu_paths() {
  std::vector<std::string> paths;
  if (cpu::has_avx2()) paths.emplace_back("avx2");
  paths.emplace_back("scalar");
  return paths;
}

namespace {
void check_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
              "bf16_linear: weight must be a 2-D bfloat16 tensor, got ", weight.scalar_type(), " ",
              weight.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "bf16_linear: x must be [rows, ",
              weight.size(1), "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "bf16_linear: x must be float32 or bfloat16, got ", x.scalar_type());
}
}  // namespace

at::Tensor bf16_linear_meta(const at::Tensor& x, const at::Tensor& weight, c10::string_view) {
  check_args(x, weight);
  return at::empty({x.size(0), weight.size(0)}, x.options());
}

at::Tensor bf16_linear_cpu(const at::Tensor& x, const at::Tensor& weight, c10::string_view isa) {
  check_args(x, weight);
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "bf16_linear: this implementation runs on CPU tensors only");
  bool vector = false;
  if (isa == "auto") {
    vector = cpu::has_avx2();
  } else if (isa == "avx2") {
    TORCH_CHECK(cpu::has_avx2(), "bf16_linear: this CPU lacks AVX2/FMA/F16C");
    vector = true;
  } else {
    TORCH_CHECK(isa == "scalar", "bf16_linear: unknown isa '", std::string(isa),
                "'; expected auto, avx2 or scalar");
  }
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty({m, n}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  // Threads split the weight rows, so each streams its own slice of the weight once for all
  // activation rows (decode is bound by reading the weight; batching rows is nearly free).
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    if (vector) {
      bf16::linear_avx2(xp, m, k, wp, begin, end, op, n);
      return;
    }
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = begin; j < end; ++j) op[r * n + j] = bf16::dot_scalar(xp + r * k, wp + j * k, k);
  });
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace arbitrage_fast
