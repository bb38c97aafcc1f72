#include "greedy_logprob.h"

#include <ATen/Parallel.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/sub.h>
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
  bool nan;
};

RowMax row_max_scalar(const float* x, int64_t begin, int64_t n, RowMax best) {
  for (int64_t i = begin; i < n; ++i) {
    best.nan |= std::isnan(x[i]);
    if (x[i] > best.value) best = {x[i], i, best.nan};
  }
  return best;
}

double sum_exp_scalar(const float* x, int64_t begin, int64_t n, float max) {
  double s = 0.0;
  for (int64_t i = begin; i < n; ++i) s += std::exp(x[i] - max);
  return s;
}

#if AF_X86
// Per lane the first index of the lane's max (strictly greater replaces), then across lanes the
// smallest index among those holding the overall max: torch.argmax's first occurrence.
AF_TARGET_AVX2 RowMax row_max_avx2(const float* x, int64_t n) {
  const int64_t nv = n / 8 * 8;
  if (nv == 0) return row_max_scalar(x, 0, n, {-std::numeric_limits<float>::infinity(), 0, false});
  __m256 best = _mm256_loadu_ps(x);
  __m256i best_i = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i idx = best_i;
  __m256 nan = _mm256_cmp_ps(best, best, _CMP_UNORD_Q);
  const __m256i step = _mm256_set1_epi32(8);
  for (int64_t i = 8; i < nv; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    idx = _mm256_add_epi32(idx, step);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256 greater = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, v, greater);
    best_i = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best_i), _mm256_castsi256_ps(idx), greater));
  }
  alignas(32) float values[8];
  alignas(32) int32_t indices[8];
  _mm256_store_ps(values, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(indices), best_i);
  RowMax out{values[0], indices[0], _mm256_movemask_ps(nan) != 0};
  for (int lane = 1; lane < 8; ++lane) {
    if (values[lane] > out.value || (values[lane] == out.value && indices[lane] < out.index)) {
      out.value = values[lane];
      out.index = indices[lane];
    }
  }
  return row_max_scalar(x, nv, n, out);
}

// exp in fp32, eight lanes at a time, summed in fp64 (four accumulators of four): an fp32 sum of
// ~150k terms would drift by several ulps of the log-prob, where torch's stays within one.
AF_TARGET_AVX2 double sum_exp_avx2(const float* x, int64_t n, float max) {
  const int64_t nv = n / 16 * 16;
  const __m256 m = _mm256_set1_ps(max);
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  for (int64_t i = 0; i < nv; i += 16) {
    for (int k = 0; k < 2; ++k) {
      const __m256 e = vec::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8 * k), m));
      acc[2 * k] = _mm256_add_pd(acc[2 * k], _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
      acc[2 * k + 1] = _mm256_add_pd(acc[2 * k + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3])));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + sum_exp_scalar(x, nv, n, max);
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> greedy_logprob_meta(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "greedy_logprob: logits must be [rows, vocab], got ",
              logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "greedy_logprob: logits must be float32, got ",
              logits.scalar_type());
  return {at::empty({logits.size(0)}, logits.options().dtype(at::kLong)),
          at::empty({logits.size(0)}, logits.options())};
}

std::tuple<at::Tensor, at::Tensor> greedy_logprob_cpu(const at::Tensor& logits_in) {
  auto [tokens, logprobs] = greedy_logprob_meta(logits_in);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const float* xp = logits.data_ptr<float>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  std::vector<char> fallback(rows, 0);
  const bool avx2 = cpu::has_avx2();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = xp + r * vocab;
#if AF_X86
      const RowMax m = avx2 ? row_max_avx2(x, vocab)
                            : row_max_scalar(x, 0, vocab, {-std::numeric_limits<float>::infinity(), 0, false});
#else
      const RowMax m = row_max_scalar(x, 0, vocab, {-std::numeric_limits<float>::infinity(), 0, false});
#endif
      if (m.nan || !std::isfinite(m.value)) {
        fallback[r] = 1;
        continue;
      }
#if AF_X86
      const double s = avx2 ? sum_exp_avx2(x, vocab, m.value) : sum_exp_scalar(x, 0, vocab, m.value);
#else
      const double s = sum_exp_scalar(x, 0, vocab, m.value);
#endif
      const float lse = static_cast<float>(std::log(s)) + m.value;
      tp[r] = m.index;
      lp[r] = x[m.index] - lse;
    }
  });
  for (int64_t r = 0; r < rows; ++r) {  // NaN or no finite max: torch's own ops decide
    if (!fallback[r]) continue;
    const at::Tensor row = logits[r];
    const at::Tensor token = at::argmax(row);
    tokens[r].copy_(token);
    logprobs[r].copy_(at::sub(row[token.item<int64_t>()], at::logsumexp(row, 0)));
  }
  return {tokens, logprobs};
}

}  // namespace arbitrage_fast
