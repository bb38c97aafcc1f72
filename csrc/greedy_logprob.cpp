#include "greedy_logprob.h"

#include <ATen/Parallel.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_features.h"
#include "vec_math.h"

namespace arbitrage_fast {
namespace {

struct RowMax {
  float value;
  int64_t index;
  bool special;  // a NaN or an infinity somewhere in the row: torch's ops take it
};

constexpr float kInf = std::numeric_limits<float>::infinity();

RowMax row_max_scalar(const float* x, int64_t begin, int64_t n, RowMax best) {
  for (int64_t i = begin; i < n; ++i) {
    best.special |= !std::isfinite(x[i]);
    if (x[i] > best.value) best = {x[i], i, best.special};
  }
  return best;
}

// sum exp(x - max) and, when `weighted`, sum x * exp(x - max), both in fp64.
struct ExpSums {
  double plain = 0.0, weighted = 0.0;
};

ExpSums sum_exp_scalar(const float* x, int64_t begin, int64_t n, float max, bool weighted) {
  ExpSums s;
  for (int64_t i = begin; i < n; ++i) {
    const double e = std::exp(x[i] - max);
    s.plain += e;
    if (weighted) s.weighted += e * x[i];
  }
  return s;
}

#if AF_X86
// Per lane the first index of the lane's max (strictly greater replaces), then across lanes the
// smallest index among those holding the overall max: torch.argmax's first occurrence.
AF_TARGET_AVX2 RowMax row_max_avx2(const float* x, int64_t n) {
  const int64_t nv = n / 8 * 8;
  if (nv == 0) return row_max_scalar(x, 0, n, {-kInf, 0, false});
  __m256 best = _mm256_loadu_ps(x);
  __m256i best_i = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i idx = best_i;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(kInf);
  // |x| >= inf is false for finite x and true for +-inf; NaN compares unordered: not-less-than.
  __m256 special = _mm256_cmp_ps(_mm256_and_ps(best, abs_mask), inf, _CMP_NLT_UQ);
  const __m256i step = _mm256_set1_epi32(8);
  for (int64_t i = 8; i < nv; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    idx = _mm256_add_epi32(idx, step);
    special = _mm256_or_ps(special, _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), inf, _CMP_NLT_UQ));
    const __m256 greater = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, v, greater);
    best_i = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best_i), _mm256_castsi256_ps(idx), greater));
  }
  alignas(32) float values[8];
  alignas(32) int32_t indices[8];
  _mm256_store_ps(values, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(indices), best_i);
  RowMax out{values[0], indices[0], _mm256_movemask_ps(special) != 0};
  for (int lane = 1; lane < 8; ++lane) {
    if (values[lane] > out.value || (values[lane] == out.value && indices[lane] < out.index)) {
      out.value = values[lane];
      out.index = indices[lane];
    }
  }
  return row_max_scalar(x, nv, n, out);
}

AF_TARGET_AVX2 inline __m256d widen_lo(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
AF_TARGET_AVX2 inline __m256d widen_hi(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }

AF_TARGET_AVX2 double hsum4(__m256d v) {
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, v);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

// exp in fp32, eight lanes at a time, the sums in fp64 (an fp32 sum of ~150k terms would drift by
// several ulps of the log-prob, where torch's stays within one); x * e widened before the product.
AF_TARGET_AVX2 ExpSums sum_exp_avx2(const float* x, int64_t n, float max, bool weighted) {
  const int64_t nv = n / 8 * 8;
  const __m256 m = _mm256_set1_ps(max);
  __m256d plain_lo = _mm256_setzero_pd(), plain_hi = _mm256_setzero_pd();
  __m256d weighted_lo = _mm256_setzero_pd(), weighted_hi = _mm256_setzero_pd();
  for (int64_t i = 0; i < nv; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 e = vec::exp8(_mm256_sub_ps(v, m));
    const __m256d e_lo = widen_lo(e), e_hi = widen_hi(e);
    plain_lo = _mm256_add_pd(plain_lo, e_lo);
    plain_hi = _mm256_add_pd(plain_hi, e_hi);
    if (weighted) {
      weighted_lo = _mm256_fmadd_pd(e_lo, widen_lo(v), weighted_lo);
      weighted_hi = _mm256_fmadd_pd(e_hi, widen_hi(v), weighted_hi);
    }
  }
  ExpSums tail = sum_exp_scalar(x, nv, n, max, weighted);
  tail.plain += hsum4(_mm256_add_pd(plain_lo, plain_hi));
  if (weighted) tail.weighted += hsum4(_mm256_add_pd(weighted_lo, weighted_hi));
  return tail;
}
#endif

RowMax row_max(const float* x, int64_t n, bool avx2) {
#if AF_X86
  if (avx2) return row_max_avx2(x, n);
#endif
  return row_max_scalar(x, 0, n, {-kInf, 0, false});
}

ExpSums sum_exp(const float* x, int64_t n, float max, bool weighted, bool avx2) {
#if AF_X86
  if (avx2) return sum_exp_avx2(x, n, max, weighted);
#endif
  return sum_exp_scalar(x, 0, n, max, weighted);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_logprob_meta(const at::Tensor& logits, bool entropy) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "greedy_logprob: logits must be [rows, vocab], got ",
              logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "greedy_logprob: logits must be float32, got ",
              logits.scalar_type());
  const int64_t rows = logits.size(0);
  return {at::empty({rows}, logits.options().dtype(at::kLong)), at::empty({rows}, logits.options()),
          at::empty({entropy ? rows : 0}, logits.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_logprob_cpu(const at::Tensor& logits_in, bool entropy) {
  auto [tokens, logprobs, entropies] = greedy_logprob_meta(logits_in, entropy);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const float* xp = logits.data_ptr<float>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  float* hp = entropy ? entropies.data_ptr<float>() : nullptr;
  std::vector<char> fallback(rows, 0);
  const bool avx2 = cpu::has_avx2();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = xp + r * vocab;
      const RowMax m = row_max(x, vocab, avx2);
      if (m.special) {
        fallback[r] = 1;
        continue;
      }
      const ExpSums s = sum_exp(x, vocab, m.value, entropy, avx2);
      const float lse = static_cast<float>(std::log(s.plain)) + m.value;
      tp[r] = m.index;
      lp[r] = x[m.index] - lse;
      if (entropy) hp[r] = lse - static_cast<float>(s.weighted / s.plain);  // -sum p log p = lse - sum p x
    }
  });
  for (int64_t r = 0; r < rows; ++r) {  // NaN or an infinity: torch's own ops decide
    if (!fallback[r]) continue;
    const at::Tensor row = logits[r];
    const at::Tensor token = at::argmax(row);
    const at::Tensor lse = at::logsumexp(row, 0);
    tokens[r].copy_(token);
    logprobs[r].copy_(at::sub(row[token.item<int64_t>()], lse));
    if (entropy) entropies[r].copy_(at::sub(lse, at::sum(at::mul(at::softmax(row, 0), row))));
  }
  return {tokens, logprobs, entropies};
}

}  // namespace arbitrage_fast
