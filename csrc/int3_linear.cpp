#include "int3_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "gguf_blocks.h"
#include "vec_math.h"
#include "row_tiles.h"
#include "gguf_linear.h"

namespace arbitrage_fast {
namespace int3 {
namespace {

constexpr int64_t kCodeBytes = 12;  // one 32-input part of a group: qs[8], qh[4]
constexpr int64_t kHeadBytes = 4;   // d, m

int64_t row_bytes(int64_t k, int64_t group) {
  return kHeadBytes * ((k + group - 1) / group) + kCodeBytes * (k / 32);
}

// The codes of one 32-input part (the layout in int3_linear.h).
void decode_codes(const uint8_t* p, int8_t q[32]) {
  uint32_t high;
  std::memcpy(&high, p + 8, 4);
  for (int i = 0; i < 32; ++i) {
    q[i] = static_cast<int8_t>(((p[i % 8] >> (2 * (i / 8))) & 3) | (((high >> i) & 1) << 2));
  }
}

// R activation rows, `stride` int8 values apart (their scales `groups` apart).
struct Rows {
  const int8_t* xq;
  const float* xd;
  const float* xs;
  int64_t stride, groups;
};

// The vectorised dots for one, two, three, four and eight activation rows (none on other CPUs).
struct Kernels {
  void (*one)(const uint8_t*, int64_t, Rows, float*);
  void (*two)(const uint8_t*, int64_t, Rows, float*);
  void (*three)(const uint8_t*, int64_t, Rows, float*);
  void (*four)(const uint8_t*, int64_t, Rows, float*);
  void (*eight)(const uint8_t*, int64_t, Rows, float*);
};

// The portable path, and what the AVX2 one must reproduce up to float summation order. It is
// written as gguf_linear.cpp's portable dot over a Q4_1 block (d * q + m, halves of 16), so
// both give the same bits for the same values.
float dot_scalar(const uint8_t* w, int64_t per, const int8_t* xq, const float* xd,
                 const float* xs, int64_t groups) {
  float acc = 0.0f;
  int8_t q[32];
  for (int64_t g0 = 0; g0 < groups; g0 += per) {
    const float d = gguf::half_at(w), m = gguf::half_at(w + 2);
    w += kHeadBytes;
    for (int64_t g = g0; g < std::min(g0 + per, groups); ++g, w += kCodeBytes) {
      decode_codes(w, q);
      const int8_t* x = xq + 32 * g;
      int32_t lo = 0, hi = 0;
      for (int i = 0; i < 16; ++i) lo += q[i] * x[i];
      for (int i = 16; i < 32; ++i) hi += q[i] * x[i];
      acc += xd[g] * (d * lo + d * hi) + m * xs[g];
    }
  }
  return acc;
}

#if AF_X86
#define AF_AVX2 AF_TARGET_AVX2

AF_AVX2 static inline __m256i load32(const void* p) {
  return _mm256_loadu_si256(static_cast<const __m256i*>(p));
}

AF_AVX2 static inline float fp16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

// 12 bytes of codes -> 32 bytes, byte i = q[i] in [0, 7].
AF_AVX2 static inline __m256i unpack_codes(const uint8_t* p) {
  // qs: the 8 bytes in every 64-bit lane, lane t shifted right by 2t, give inputs 8t..8t+7 in
  // the low two bits of each byte (the shift lets the next byte's bits in only above them).
  int64_t qs;
  std::memcpy(&qs, p, 8);
  const __m256i two = _mm256_and_si256(
      _mm256_srlv_epi64(_mm256_set1_epi64x(qs), _mm256_set_epi64x(6, 4, 2, 0)), _mm256_set1_epi8(3));
  // qh: bit i of the word -> 0x04 in byte i (byte k of the word spread over bytes 8k..8k+7).
  uint32_t bits;
  std::memcpy(&bits, p + 8, 4);
  return _mm256_or_si256(two, _mm256_and_si256(vec::bit_bytes(bits), _mm256_set1_epi8(4)));
}

// As gguf_linear_simd.h's unsigned formats: the codes (<= 7) and int8 activations go through
// vpmaddubsw (pair sums far below int16's limit) and vpmaddwd into eight int32 lanes; the
// group's d * xd scales them into a float accumulator and m pays through the activation sums.
// The operations and their order are those of its Q4_1 kernel, so a group of 32 adds the same
// bits as a Q4_1 block with the same d, m and codes.
template <int R>
AF_AVX2 static void dot_avx2(const uint8_t* w, int64_t per, Rows x, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  float extra[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), extra[r] = 0.0f;
  for (int64_t g0 = 0; g0 < x.groups; g0 += per) {
    const float d = fp16(w), m = fp16(w + 2);
    w += kHeadBytes;
    for (int64_t g = g0; g < std::min(g0 + per, x.groups); ++g, w += kCodeBytes) {
      const __m256i u = unpack_codes(w);
      for (int r = 0; r < R; ++r) {
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, load32(x.xq + r * x.stride + 32 * g)), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x.xd[r * x.groups + g]), acc[r]);
        extra[r] += m * x.xs[r * x.groups + g];
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = vec::hsum8(acc[r]) + extra[r];
}

Kernels avx2_kernels() { return {AF_ROW_TILES(dot_avx2)}; }
#else
Kernels avx2_kernels() { return {nullptr, nullptr, nullptr, nullptr, nullptr}; }
#endif

// K from x (or given), checked against the weight's row bytes for that K and group.
void check_shapes(const at::Tensor& weight, int64_t k, int64_t group, const char* op) {
  TORCH_CHECK(group == 32 || group == 64 || group == 128, op,
              ": group must be 32, 64 or 128, got ", group);
  TORCH_CHECK(k > 0 && k % 32 == 0, op, ": rows of ", k,
              " inputs; the int3 blocks take a positive multiple of 32");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte, op,
              ": weight must be a 2-D uint8 tensor of int3 blocks [out_features, row_bytes], got ",
              weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(weight.size(1) == row_bytes(k, group), op, ": a row of ", k,
              " inputs in groups of ", group, " takes ", row_bytes(k, group),
              " bytes of int3 blocks, the weight's rows hold ", weight.size(1));
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [rows, in_features], got ", x.sizes());
}

}  // namespace
}  // namespace int3

at::Tensor int3_linear_meta(const at::Tensor& x, const at::Tensor& weight, int64_t group,
                            c10::string_view) {
  int3::check_x(x, "int3_linear");
  int3::check_shapes(weight, x.size(1), group, "int3_linear");
  return at::empty({x.size(0), weight.size(0)}, x.options());
}

at::Tensor int3_linear_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t group,
                           c10::string_view isa) {
  int3::check_x(x, "int3_linear");
  int3::check_shapes(weight, x.size(1), group, "int3_linear");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "int3_linear: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "int3_linear: this implementation runs on CPU tensors only");

  int3::Kernels simd{nullptr, nullptr, nullptr, nullptr, nullptr};
  if (isa == "auto") {
    if (cpu::has_avx2()) simd = int3::avx2_kernels();
  } else if (isa == "avx2") {
    TORCH_CHECK(cpu::has_avx2(), "int3_linear: this CPU lacks AVX2/FMA/F16C");
    simd = int3::avx2_kernels();
  } else {
    TORCH_CHECK(isa == "scalar", "int3_linear: unknown isa '", std::string(isa),
                "'; expected auto, avx2 or scalar");
  }

  const int64_t rows = x.size(0), n = weight.size(0), k = x.size(1), groups = k / 32;
  const int64_t per = group / 32;
  const at::Tensor w = weight.contiguous();
  const gguf::QuantizedActivations xa = gguf::quantize_activations(x);
  at::Tensor out = at::empty({rows, n}, xa.q.options().dtype(x.scalar_type()));

  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int8_t* xqp = xa.q.data_ptr<int8_t>();
  const float* xdp = xa.d.data_ptr<float>();
  const float* xsp = xa.s.data_ptr<float>();
  const int64_t row_bytes = w.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "int3_linear", [&] {
    row_tiles::run(rows, n, row_bytes, simd.eight, simd.four, simd.two != nullptr, out.data_ptr<scalar_t>(),
                   [&](int64_t j, int64_t r, int tile, float* dots) {
      const uint8_t* wr = wp + j * row_bytes;
      const int3::Rows xr{xqp + r * k, xdp + r * groups, xsp + r * groups, k, groups};
      if (tile == 8) {
        simd.eight(wr, per, xr, dots);
      } else if (tile == 4) {
        simd.four(wr, per, xr, dots);
      } else if (tile == 3) {
        simd.three(wr, per, xr, dots);
      } else if (tile == 2) {
        simd.two(wr, per, xr, dots);
      } else if (simd.one) {
        simd.one(wr, per, xr, dots);
      } else {
        dots[0] = int3::dot_scalar(wr, per, xr.xq, xr.xd, xr.xs, groups);
      }
    });
  });
  return out;
}

at::Tensor int3_dequantize_meta(const at::Tensor& weight, int64_t group, int64_t in_features) {
  int3::check_shapes(weight, in_features, group, "int3_dequantize");
  return at::empty({weight.size(0), in_features}, weight.options().dtype(at::kFloat));
}

at::Tensor int3_dequantize_cpu(const at::Tensor& weight, int64_t group, int64_t in_features) {
  int3::check_shapes(weight, in_features, group, "int3_dequantize");
  const int64_t k = in_features, per = group / 32;
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty({w.size(0), k}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t row_bytes = w.size(1);
  at::parallel_for(0, w.size(0), 16, [&](int64_t begin, int64_t end) {
    int8_t q[32];
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* p = wp + r * row_bytes;
      for (int64_t g0 = 0; g0 < k / 32; g0 += per) {
        const float d = gguf::half_at(p), m = gguf::half_at(p + 2);
        p += int3::kHeadBytes;
        for (int64_t g = g0; g < std::min(g0 + per, k / 32); ++g, p += int3::kCodeBytes) {
          int3::decode_codes(p, q);
          float* o = op + r * k + 32 * g;
          for (int i = 0; i < 32; ++i) o[i] = d * q[i] + m;
        }
      }
    }
  });
  return out;
}

}  // namespace arbitrage_fast
