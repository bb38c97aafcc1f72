#include "decoder_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <type_traits>

#include "cpu_features.h"
#include "kv_ops.h"
#include "vec_math.h"

namespace arbitrage_fast {
namespace {

void check_float(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              op, ": ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

void check_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2, "add_rms_norm: x must be [tokens, hidden], got ", x.sizes());
  check_float(x, "add_rms_norm", "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "add_rms_norm: weight must be [", x.size(1),
              "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "add_rms_norm: weight dtype ", weight.scalar_type(),
              " differs from x's ", x.scalar_type());
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "add_rms_norm: residual must match x (", x.sizes(), " ", x.scalar_type(), "), got ",
                residual->sizes(), " ", residual->scalar_type());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> add_rms_norm_meta(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                     const at::Tensor& weight, double) {
  check_norm_args(x, residual, weight);
  return {at::empty(x.sizes(), x.options()), at::empty(x.sizes(), x.options())};
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& residual,
                                                    const at::Tensor& weight_in, double eps) {
  check_norm_args(x_in, residual, weight_in);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor res = residual ? residual->contiguous() : at::Tensor();
  const int64_t rows = x.size(0), hidden = x.size(1);
  at::Tensor normed = at::empty_like(x);
  at::Tensor stream = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = residual ? res.data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* np = normed.data_ptr<scalar_t>();
    scalar_t* sp = stream.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * hidden;
        scalar_t* sr = sp + r * hidden;
        double sq = 0.0;
        for (int64_t i = 0; i < hidden; ++i) {
          // The add rounds to the stream's dtype, as torch's add of two such tensors does.
          const scalar_t h = rp ? static_cast<scalar_t>(static_cast<float>(rp[r * hidden + i]) +
                                                        static_cast<float>(xr[i]))
                                : xr[i];
          sr[i] = h;
          const float hf = static_cast<float>(h);
          sq += static_cast<double>(hf * hf);
        }
        const float rstd = 1.0f / std::sqrt(static_cast<float>(sq / static_cast<double>(hidden)) +
                                            static_cast<float>(eps));
        for (int64_t i = 0; i < hidden; ++i) {
          const scalar_t scaled = static_cast<scalar_t>(static_cast<float>(sr[i]) * rstd);
          np[r * hidden + i] = static_cast<scalar_t>(static_cast<float>(wp[i]) * static_cast<float>(scaled));
        }
      }
    });
  });
  return {normed, stream};
}

namespace {

void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                     const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "rope_write_kv: q and k must be [tokens, heads, head_dim], got ",
              q.sizes(), " and ", k.sizes());
  const int64_t T = q.size(0), D = q.size(2);
  TORCH_CHECK(k.size(0) == T && k.size(2) == D && v.sizes() == k.sizes(), "rope_write_kv: k ", k.sizes(),
              " and v ", v.sizes(), " must be [", T, ", kv_heads, ", D, "]");
  TORCH_CHECK(D % 2 == 0, "rope_write_kv: head_dim ", D, " is odd");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "rope_write_kv: cos and sin must be [", T, ", ", D, "], got ", cos.sizes(), " and ", sin.sizes());
  check_float(q, "rope_write_kv", "q");
  for (const at::Tensor* t : {&k, &v, &cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "rope_write_kv: every input must be ", q.scalar_type(),
                ", got ", t->scalar_type());
  }
}

// Rotates `heads` rows of one token (x rows `stride_h` apart, innermost stride 1) into out
// (dense rows): x * cos + rotate_half(x) * sin, each product and the sum rounded to scalar_t.
template <typename scalar_t>
void rotate_token(const scalar_t* x, int64_t stride_h, int64_t heads, int64_t D, const scalar_t* c,
                  const scalar_t* s, scalar_t* out) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const scalar_t* xr = x + h * stride_h;
    scalar_t* o = out + h * D;
    for (int64_t i = 0; i < D; ++i) {
      const float rot = i < half ? -static_cast<float>(xr[i + half]) : static_cast<float>(xr[i - half]);
      const scalar_t a = static_cast<scalar_t>(static_cast<float>(xr[i]) * static_cast<float>(c[i]));
      const scalar_t b = static_cast<scalar_t>(rot * static_cast<float>(s[i]));
      o[i] = static_cast<scalar_t>(static_cast<float>(a) + static_cast<float>(b));
    }
  }
}

}  // namespace

at::Tensor rope_write_kv_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                              const at::Tensor& sin, const at::Tensor& cache, int64_t layer, const at::Tensor& slots) {
  check_rope_args(q, k, v, cos, sin);
  check_write_kv_args(cache, layer, k, v, slots);
  return at::empty(q.sizes(), q.options());
}

at::Tensor rope_write_kv_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v,
                             const at::Tensor& cos_in, const at::Tensor& sin_in, const at::Tensor& cache,
                             int64_t layer, const at::Tensor& slots) {
  check_rope_args(q_in, k_in, v, cos_in, sin_in);
  check_write_kv_args(cache, layer, k_in, v, slots);
  // Rows may be strided views of the fused QKV output; only the innermost stride must be 1.
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(2) == 1 ? k_in : k_in.contiguous();
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  at::Tensor q_out = at::empty({T, Hq, D}, q.options());
  at::Tensor k_out = at::empty({T, Hkv, D}, k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_write_kv", [&] {
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        rotate_token(q.data_ptr<scalar_t>() + t * q.stride(0), q.stride(1), Hq, D, cp + t * D, sp + t * D,
                     q_out.data_ptr<scalar_t>() + t * Hq * D);
        rotate_token(k.data_ptr<scalar_t>() + t * k.stride(0), k.stride(1), Hkv, D, cp + t * D, sp + t * D,
                     k_out.data_ptr<scalar_t>() + t * Hkv * D);
      }
    });
  });
  write_kv_cpu(cache, layer, k_out, v, slots);
  return q_out;
}

namespace {

#if AF_X86
// silu(gate) * up over n values of any float dtype in fp32; returns how many it did (a multiple
// of 8). A 16-bit silu is rounded to its dtype before the product, as the scalar tail (and
// torch's F.silu(gate) * up) rounds it.
template <typename T>
AF_TARGET_AVX2 int64_t silu_mul_avx2(const T* gate, const T* up, T* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = vec::load8(gate + i);
    __m256 act = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), vec::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    // exp8 clamps, so -inf / (1 + exp(inf)) would come out -inf; libm's exp, and torch, give NaN.
    act = _mm256_blendv_ps(act, _mm256_set1_ps(NAN),
                           _mm256_cmp_ps(g, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
    if constexpr (!std::is_same_v<T, float>) {
      T rounded[8];
      vec::store8(rounded, act);
      act = vec::load8(rounded);
    }
    vec::store8(out + i, _mm256_mul_ps(act, vec::load8(up + i)));
  }
  return i;
}
#endif

// The vectorised prefix of a row where the CPU has AVX2: how many values it did.
template <typename T>
int64_t silu_mul_simd(const T* gate, const T* up, T* out, int64_t n) {
#if AF_X86
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu::has_avx2()) return silu_mul_avx2(gate, up, out, n);
  }
#endif
  return 0;
}

}  // namespace

at::Tensor silu_and_mul_meta(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_and_mul: gate_up must be [tokens, 2 * I], got ",
              gate_up.sizes());
  check_float(gate_up, "silu_and_mul", "gate_up");
  return at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
}

at::Tensor silu_and_mul_cpu(const at::Tensor& gate_up_in) {
  at::Tensor out = silu_and_mul_meta(gate_up_in);
  const at::Tensor gate_up = gate_up_in.contiguous();
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = xp + r * 2 * inter;
        const scalar_t* u = g + inter;
        scalar_t* o = op + r * inter;
        int64_t i = silu_mul_simd(g, u, o, inter);
        for (; i < inter; ++i) {
          const float gf = static_cast<float>(g[i]);
          const scalar_t act = static_cast<scalar_t>(gf / (1.0f + std::exp(-gf)));
          o[i] = static_cast<scalar_t>(static_cast<float>(act) * static_cast<float>(u[i]));
        }
      }
    });
  });
  return out;
}

}  // namespace arbitrage_fast
