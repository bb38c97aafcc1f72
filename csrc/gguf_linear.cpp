#include "gguf_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_features.h"
#include "gguf_blocks.h"
#include "row_tiles.h"
#include "vec_math.h"

namespace arbitrage_fast {
namespace gguf {

void decode_group(int64_t type, const uint8_t* row, int64_t g, Group* out) {
  auto nibbles = [&](const uint8_t* qs, int offset) {
    for (int i = 0; i < 16; ++i) {
      out->q[i] = static_cast<int8_t>((qs[i] & 0xF) - offset);
      out->q[i + 16] = static_cast<int8_t>((qs[i] >> 4) - offset);
    }
  };
  auto fifth = [&](const uint8_t* qh, const uint8_t* qs, int offset) {
    uint32_t h;
    std::memcpy(&h, qh, 4);
    for (int i = 0; i < 16; ++i) {
      out->q[i] = static_cast<int8_t>(((qs[i] & 0xF) | (((h >> i) & 1) << 4)) - offset);
      out->q[i + 16] = static_cast<int8_t>(((qs[i] >> 4) | (((h >> (i + 16)) & 1) << 4)) - offset);
    }
  };
  out->min = 0.0f;
  switch (type) {
    case Q8_0: {
      const uint8_t* b = row + g * 34;
      out->scale_lo = out->scale_hi = half_at(b);
      std::memcpy(out->q, b + 2, 32);
      return;
    }
    case Q4_0: {
      const uint8_t* b = row + g * 18;
      out->scale_lo = out->scale_hi = half_at(b);
      nibbles(b + 2, 8);
      return;
    }
    case Q4_1: {
      const uint8_t* b = row + g * 20;
      out->scale_lo = out->scale_hi = half_at(b);
      out->min = half_at(b + 2);
      nibbles(b + 4, 0);
      return;
    }
    case Q5_0: {
      const uint8_t* b = row + g * 22;
      out->scale_lo = out->scale_hi = half_at(b);
      fifth(b + 2, b + 6, 16);
      return;
    }
    case Q5_1: {
      const uint8_t* b = row + g * 24;
      out->scale_lo = out->scale_hi = half_at(b);
      out->min = half_at(b + 2);
      fifth(b + 4, b + 8, 0);
      return;
    }
    case Q4_K: {
      const uint8_t* b = row + (g / 8) * 144;
      const int j = static_cast<int>(g % 8);
      int scale, min;
      q4k_scale_min(j, b + 4, &scale, &min);
      out->scale_lo = out->scale_hi = half_at(b) * scale;
      out->min = -(half_at(b + 2) * min);
      const uint8_t* qs = b + 16 + 32 * (j / 2);
      for (int i = 0; i < 32; ++i) out->q[i] = static_cast<int8_t>(j % 2 ? qs[i] >> 4 : qs[i] & 0xF);
      return;
    }
    case Q6_K: {
      const uint8_t* b = row + (g / 8) * 210;
      const int gg = static_cast<int>(g % 8), h = gg / 4, k = gg % 4;
      const uint8_t* ql = b + 64 * h + 32 * (k & 1);
      const uint8_t* qh = b + 128 + 32 * h;
      const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
      const float d = half_at(b + 208);
      out->scale_lo = d * scales[2 * gg];
      out->scale_hi = d * scales[2 * gg + 1];
      for (int i = 0; i < 32; ++i) {
        const int nib = (ql[i] >> (4 * (k >> 1))) & 0xF;
        out->q[i] = static_cast<int8_t>((nib | (((qh[i] >> (2 * k)) & 3) << 4)) - 32);
      }
      return;
    }
    default:
      TORCH_CHECK(false, "gguf: no decoder for ggml type ", type);
  }
}

// R activation rows, `stride` int8 values apart (their sums `groups` apart, their scales
// `scales` apart), against one weight row; out[r] receives row r's dot. Where the activation
// scales are per group of 32, `spread` holds each row's scales as the 512-bit kernels read
// them: for every pair of groups, the first's scale eight times, then the second's
// (`spread_stride` floats a row; null elsewhere).
struct Rows {
  const int8_t* xq;
  const float* xd;
  const float* xs;
  int64_t stride, groups, scales;
  const float* spread;
  int64_t spread_stride;
};

// A vectorised kernel of one format, for one activation row and for two, three, four and eight at once;
// `spread` says whether it reads Rows::spread.
struct Kernels {
  void (*one)(const uint8_t* w, Rows x, float* out);
  void (*two)(const uint8_t* w, Rows x, float* out);
  void (*three)(const uint8_t* w, Rows x, float* out);
  void (*four)(const uint8_t* w, Rows x, float* out);
  void (*eight)(const uint8_t* w, Rows x, float* out);
  bool spread = false;
};

namespace {

// The portable path: what every vectorised path must reproduce up to float summation order.
float dot_reference(int64_t type, const uint8_t* w, const int8_t* xq, const float* xd,
                    const float* xs, int64_t groups, int64_t per_scale) {
  float acc = 0.0f;
  Group grp;
  for (int64_t g = 0; g < groups; ++g) {
    decode_group(type, w, g, &grp);
    const int8_t* x = xq + 32 * g;
    int32_t lo = 0, hi = 0;
    for (int i = 0; i < 16; ++i) lo += grp.q[i] * x[i];
    for (int i = 16; i < 32; ++i) hi += grp.q[i] * x[i];
    acc += xd[g / per_scale] * (grp.scale_lo * lo + grp.scale_hi * hi) + grp.min * xs[g];
  }
  return acc;
}

#if AF_X86
namespace avx2 {
#define AF_TARGET AF_TARGET_AVX2
#define AF_VNNI 0
#include "gguf_linear_simd.h"
#undef AF_VNNI
#undef AF_TARGET
}  // namespace avx2

namespace avx512_vnni {
#define AF_TARGET AF_TARGET_AVX512_VNNI
#define AF_VNNI 1
#include "gguf_linear_simd.h"
#undef AF_VNNI
#undef AF_TARGET
}  // namespace avx512_vnni
#else
// Other architectures run the portable path.
namespace avx2 {
inline Kernels kernels(int64_t) { return {nullptr, nullptr, nullptr}; }
}  // namespace avx2
namespace avx512_vnni {
inline Kernels kernels(int64_t) { return {nullptr, nullptr, nullptr}; }
}  // namespace avx512_vnni
#endif

Format checked_format(int64_t type, const char* op) {
  const Format f = format_of(type);
  TORCH_CHECK(f.block_elems > 0, op, ": ggml type ", type,
              " has no kernel here (supported: Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8, Q4_K=12, "
              "Q6_K=14); dequantise such tensors at load instead");
  return f;
}

// K, the inputs per row, from a [N, row_bytes] uint8 block tensor.
int64_t checked_in_features(const at::Tensor& weight, const Format& f, const char* op) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte,
              op, ": weight must be a 2-D uint8 tensor of blocks [out_features, row_bytes], got ",
              weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(weight.size(1) % f.block_bytes == 0, op, ": a row of ", weight.size(1),
              " bytes is not a whole number of ", f.block_bytes, "-byte blocks");
  return weight.size(1) / f.block_bytes * f.block_elems;
}

}  // namespace

namespace {

// Quantizes `rows` activation rows of k inputs (k a multiple of `group`, itself a multiple of
// 32) as gguf_blocks.h's header comment says: xq [rows, k] int8, the scale xd [rows, k / group]
// and per group of 32 the sum xs [rows, k / 32]. Half-to-even rounding, so the torch twin
// (torch.round) gives the same integers. T is the activations' dtype: 16-bit rows are widened
// value by value, exactly, instead of in a copy.
template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t k, int64_t group, int8_t* xq, float* xd, float* xs) {
  const int64_t scales = k / group, groups = k / 32;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t s = 0; s < scales; ++s) {
        const T* v = x + r * k + group * s;
        float amax = 0.0f;
        for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(static_cast<float>(v[i])));
        const float d = amax / 127.0f;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        xd[r * scales + s] = d;
        for (int64_t g = s * group / 32; g < (s + 1) * group / 32; ++g) {
          int8_t* q = xq + r * k + 32 * g;
          int32_t sum = 0;
          for (int i = 0; i < 32; ++i) {
            q[i] = static_cast<int8_t>(std::nearbyint(static_cast<float>(x[r * k + 32 * g + i]) * id));
            sum += q[i];
          }
          xs[r * groups + g] = d * static_cast<float>(sum);
        }
      }
    }
  });
}

}  // namespace

QuantizedActivations quantize_activations(const at::Tensor& x_in, int64_t group) {
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(group % 32 == 0 && k % group == 0, "quantize_activations: ", k,
              " inputs do not split into scale groups of ", group);
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  QuantizedActivations out{at::empty({rows, k}, x.options().dtype(at::kChar)), at::empty({rows, k / group}, f32),
                           at::empty({rows, k / 32}, f32)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_activations", [&] {
    quantize_rows(x.data_ptr<scalar_t>(), rows, k, group, out.q.data_ptr<int8_t>(), out.d.data_ptr<float>(),
                     out.s.data_ptr<float>());
  });
  return out;
}

}  // namespace gguf

std::vector<std::string> gguf_cpu_paths() {
  std::vector<std::string> paths;
  if (cpu::has_avx512_vnni()) paths.emplace_back("avx512_vnni");
  if (cpu::has_avx2()) paths.emplace_back("avx2");
  paths.emplace_back("scalar");
  return paths;
}

at::Tensor gguf_linear_meta(const at::Tensor& x, const at::Tensor& weight, int64_t type,
                            c10::string_view) {
  const gguf::Format f = gguf::checked_format(type, "gguf_linear");
  const int64_t k = gguf::checked_in_features(weight, f, "gguf_linear");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "gguf_linear: x must be [rows, ", k, "], got ",
              x.sizes());
  return at::empty({x.size(0), weight.size(0)}, x.options());
}

at::Tensor gguf_linear_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t type,
                           c10::string_view isa) {
  const gguf::Format f = gguf::checked_format(type, "gguf_linear");
  const int64_t k = gguf::checked_in_features(weight, f, "gguf_linear");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "gguf_linear: x must be [rows, ", k, "], got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "gguf_linear: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "gguf_linear: this implementation runs on CPU tensors only");

  gguf::Kernels simd{nullptr, nullptr, nullptr, nullptr, nullptr};
  if (isa == "auto") {
    if (cpu::has_avx512_vnni()) {
      simd = gguf::avx512_vnni::kernels(type);
    } else if (cpu::has_avx2()) {
      simd = gguf::avx2::kernels(type);
    }
  } else if (isa == "avx512_vnni") {
    TORCH_CHECK(cpu::has_avx512_vnni(), "gguf_linear: this CPU lacks AVX-512 VNNI");
    simd = gguf::avx512_vnni::kernels(type);
  } else if (isa == "avx2") {
    TORCH_CHECK(cpu::has_avx2(), "gguf_linear: this CPU lacks AVX2/FMA/F16C");
    simd = gguf::avx2::kernels(type);
  } else {
    TORCH_CHECK(isa == "scalar", "gguf_linear: unknown isa '", std::string(isa),
                "'; expected auto, avx512_vnni, avx2 or scalar");
  }

  const int64_t rows = x.size(0), n = weight.size(0), groups = k / 32;
  const int64_t group = gguf::activation_group(f), scales = k / group;
  const at::Tensor w = weight.contiguous();
  const gguf::QuantizedActivations xa = gguf::quantize_activations(x, group);
  at::Tensor out = at::empty({rows, n}, xa.q.options().dtype(x.scalar_type()));

  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int8_t* xqp = xa.q.data_ptr<int8_t>();
  const float* xdp = xa.d.data_ptr<float>();
  const float* xsp = xa.s.data_ptr<float>();
  const int64_t row_bytes = w.size(1);
  // For the kernels that read it, each row's scales as Rows::spread lays them out: k bytes a
  // row, written once and read for every weight row.
  const int64_t spread_stride = simd.spread ? groups / 2 * 16 : 0;
  std::vector<float> spread(static_cast<size_t>(rows * spread_stride));
  float* row = spread.data();
  for (int64_t r = 0; r < rows && simd.spread; ++r) {
    for (int64_t g = 0; g + 2 <= groups; g += 2, row += 16) {
      std::fill(row, row + 8, xdp[r * scales + g]);
      std::fill(row + 8, row + 16, xdp[r * scales + g + 1]);
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "gguf_linear", [&] {
    row_tiles::run(rows, n, row_bytes, simd.eight, simd.four, simd.two != nullptr, out.data_ptr<scalar_t>(),
                   [&](int64_t j, int64_t r, int tile, float* dots) {
      const uint8_t* wr = wp + j * row_bytes;
      const gguf::Rows xr{xqp + r * k, xdp + r * scales, xsp + r * groups, k, groups, scales,
                          spread.data() + r * spread_stride, spread_stride};
      if (tile == 8) {
        simd.eight(wr, xr, dots);
      } else if (tile == 4) {
        simd.four(wr, xr, dots);
      } else if (tile == 3) {
        simd.three(wr, xr, dots);
      } else if (tile == 2) {
        simd.two(wr, xr, dots);
      } else if (simd.one) {
        simd.one(wr, xr, dots);
      } else {
        dots[0] = gguf::dot_reference(type, wr, xr.xq, xr.xd, xr.xs, groups, group / 32);
      }
    });
  });
  return out;
}

at::Tensor gguf_dequantize_meta(const at::Tensor& weight, int64_t type, int64_t in_features) {
  const gguf::Format f = gguf::checked_format(type, "gguf_dequantize");
  const int64_t k = gguf::checked_in_features(weight, f, "gguf_dequantize");
  TORCH_CHECK(k == in_features, "gguf_dequantize: rows hold ", k, " inputs, not ", in_features);
  return at::empty({weight.size(0), k}, weight.options().dtype(at::kFloat));
}

at::Tensor gguf_dequantize_cpu(const at::Tensor& weight, int64_t type, int64_t in_features) {
  const gguf::Format f = gguf::checked_format(type, "gguf_dequantize");
  const int64_t k = gguf::checked_in_features(weight, f, "gguf_dequantize");
  TORCH_CHECK(k == in_features, "gguf_dequantize: rows hold ", k, " inputs, not ", in_features);
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty({w.size(0), k}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t row_bytes = w.size(1);
  at::parallel_for(0, w.size(0), 16, [&](int64_t begin, int64_t end) {
    gguf::Group grp;
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t g = 0; g < k / 32; ++g) {
        gguf::decode_group(type, wp + r * row_bytes, g, &grp);
        float* o = op + r * k + 32 * g;
        for (int i = 0; i < 32; ++i) o[i] = (i < 16 ? grp.scale_lo : grp.scale_hi) * grp.q[i] + grp.min;
      }
    }
  });
  return out;
}

}  // namespace arbitrage_fast
