#include "paged_attention_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "vec_math.h"

namespace arbitrage_fast {
namespace {

void check_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& block_tables, const at::Tensor& cu_query_lens, const at::Tensor& seq_lens) {
  TORCH_CHECK(q.dim() == 3, "paged_attention: q must be [tokens, heads, head_dim], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_attention: k_cache and v_cache must both be [pages, block_size, kv_heads, head_dim], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(3) == q.size(2), "paged_attention: head_dim ", q.size(2), " of q differs from the cache's ",
              k_cache.size(3));
  TORCH_CHECK(k_cache.size(2) > 0 && q.size(1) % k_cache.size(2) == 0, "paged_attention: ", q.size(1),
              " query heads do not split into groups over ", k_cache.size(2), " kv heads");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "paged_attention: cache rows must be dense in head_dim");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "paged_attention: q must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_attention: the cache dtype must be q's ", q.scalar_type(), ", got ", k_cache.scalar_type());
  const int64_t B = seq_lens.size(0);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == at::kInt,
              "paged_attention: block_tables must be int32 [", B, ", max_blocks], got ", block_tables.scalar_type(),
              " ", block_tables.sizes());
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kInt, "paged_attention: seq_lens must be int32 [B]");
  TORCH_CHECK(cu_query_lens.dim() == 1 && cu_query_lens.size(0) == B + 1 && cu_query_lens.scalar_type() == at::kInt,
              "paged_attention: cu_query_lens must be int32 [", B + 1, "], got ", cu_query_lens.scalar_type(), " ",
              cu_query_lens.sizes());
}

constexpr int64_t kKeyBlock = 64;  // keys per block: a block's K (or V) rows stay in L1 across the group

// Floats of work room one (token, kv head) item needs: the portable path's scores over the
// whole sequence, or the AVX2 path's accumulators, one key block of weights and each head's
// running max and sum.
int64_t work_floats(int64_t max_len, int64_t group, int64_t D) {
  return std::max<int64_t>(max_len, group * D + kKeyBlock + 2 * group);
}

#if AF_X86
// 16-bit caches widen on load (vec::load8), so every dtype shares the fp32 path.
using vec::load8;

// The `group` query heads that share one kv head, over its keys, in fp32 with head_dim
// 8 * ND: flash-attention style, key block by key block with a running max and sum per head,
// so each block of K and V rows is read from memory once for the whole group rather than
// once per query head. q and out are [group, D]; work holds work_floats(.., group, D) floats.
template <int ND, typename KRow, typename VRow>
AF_TARGET_AVX2 void attend_group_avx2(const float* q, int64_t group, int64_t keys, float scale, const KRow& k_row,
                                      const VRow& v_row, float* work, float* out) {
  constexpr int64_t D = 8 * ND;
  float* acc = work;                   // [group, D]
  float* p = work + group * D;         // [kKeyBlock]: one head's block of scores, then weights
  float* m = p + kKeyBlock;            // [group]: running max of each head's scores
  float* l = m + group;                // [group]: running sum of its weights
  std::fill(acc, acc + group * D, 0.0f);
  std::fill(m, m + group, -std::numeric_limits<float>::infinity());
  std::fill(l, l + group, 0.0f);
  for (int64_t j0 = 0; j0 < keys; j0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, keys - j0);
    for (int64_t g = 0; g < group; ++g) {
      __m256 qv[ND];
      for (int i = 0; i < ND; ++i) qv[i] = _mm256_loadu_ps(q + g * D + 8 * i);
      float block_max = -std::numeric_limits<float>::infinity();
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {  // four keys at once: four independent FMA chains
        const decltype(k_row(0)) k[4] = {k_row(j0 + j), k_row(j0 + j + 1), k_row(j0 + j + 2), k_row(j0 + j + 3)};
        __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int i = 0; i < ND; ++i) {
          for (int r = 0; r < 4; ++r) s[r] = _mm256_fmadd_ps(qv[i], load8(k[r] + 8 * i), s[r]);
        }
        for (int r = 0; r < 4; ++r) block_max = std::max(block_max, p[j + r] = vec::hsum8(s[r]) * scale);
      }
      for (; j < n; ++j) {
        __m256 s = _mm256_setzero_ps();
        for (int i = 0; i < ND; ++i) s = _mm256_fmadd_ps(qv[i], load8(k_row(j0 + j) + 8 * i), s);
        block_max = std::max(block_max, p[j] = vec::hsum8(s) * scale);
      }
      const float new_max = std::max(m[g], block_max);
      const float rescale = std::exp(m[g] - new_max);  // 0 on the first block (m = -inf)
      __m256 sum = _mm256_setzero_ps();
      j = 0;
      for (; j + 8 <= n; j += 8) {
        const __m256 e = vec::exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), _mm256_set1_ps(new_max)));
        _mm256_storeu_ps(p + j, e);
        sum = _mm256_add_ps(sum, e);
      }
      float block_sum = vec::hsum8(sum);
      for (; j < n; ++j) block_sum += (p[j] = std::exp(p[j] - new_max));
      l[g] = l[g] * rescale + block_sum;
      m[g] = new_max;
      __m256 o[ND];
      for (int i = 0; i < ND; ++i) o[i] = _mm256_mul_ps(_mm256_loadu_ps(acc + g * D + 8 * i), _mm256_set1_ps(rescale));
      for (j = 0; j < n; ++j) {
        const __m256 w = _mm256_set1_ps(p[j]);
        const auto* v = v_row(j0 + j);
        for (int i = 0; i < ND; ++i) o[i] = _mm256_fmadd_ps(w, load8(v + 8 * i), o[i]);
      }
      for (int i = 0; i < ND; ++i) _mm256_storeu_ps(acc + g * D + 8 * i, o[i]);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d] * inv;
  }
}
#endif

// The portable path (any dtype, any head_dim): the same two passes, scalar.
template <typename T, typename KRow, typename VRow>
void attend_scalar(const float* q, int64_t D, int64_t keys, float scale, const KRow& k_row, const VRow& v_row,
                   float* scores, float* out) {
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < keys; ++j) {
    const T* k = k_row(j);
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += q[d] * static_cast<float>(k[d]);
    max = std::max(max, scores[j] = s * scale);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < keys; ++j) total += (scores[j] = std::exp(scores[j] - max));
  std::fill(out, out + D, 0.0f);
  for (int64_t j = 0; j < keys; ++j) {
    const T* v = v_row(j);
    for (int64_t d = 0; d < D; ++d) out[d] += scores[j] * static_cast<float>(v[d]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] /= total;
}

// The rows of one sequence's keys (or values) for one kv head, in order: walked page by page,
// so the per-key lookup is an array read (a division per key cost more than its dot product).
template <typename T>
void gather_rows(const T* base, const int32_t* pages, int64_t keys, int64_t bs, int64_t page_stride,
                 int64_t slot_stride, std::vector<const T*>& rows) {
  rows.resize(keys);
  for (int64_t j = 0, p = 0; j < keys; ++p) {
    const T* page = base + pages[p] * page_stride;
    for (int64_t o = 0; o < bs && j < keys; ++o, ++j) rows[j] = page + o * slot_stride;
  }
}

// One token's `group` query heads (q, out: [group, D] fp32) over one kv head's rows: the AVX2
// path for the common head sizes, the portable one otherwise.
template <typename T>
void attend(const std::vector<const T*>& k, const std::vector<const T*>& v, const float* q, int64_t group,
            int64_t D, int64_t keys, float scale, bool avx2, float* scores, float* out) {
  auto k_row = [&](int64_t j) { return k[j]; };
  auto v_row = [&](int64_t j) { return v[j]; };
#if AF_X86
  if constexpr (!std::is_same_v<T, double>) {  // the dispatch instantiates double; the checks refuse it
    if (avx2 && D == 64) return attend_group_avx2<8>(q, group, keys, scale, k_row, v_row, scores, out);
    if (avx2 && D == 128) return attend_group_avx2<16>(q, group, keys, scale, k_row, v_row, scores, out);
  }
#endif
  for (int64_t g = 0; g < group; ++g) attend_scalar<T>(q + g * D, D, keys, scale, k_row, v_row, scores, out + g * D);
}

}  // namespace

at::Tensor paged_attention_meta(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& cu_query_lens,
                                const at::Tensor& seq_lens, double) {
  check_args(q, k_cache, v_cache, block_tables, cu_query_lens, seq_lens);
  return at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
}

at::Tensor paged_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables_in, const at::Tensor& cu_in, const at::Tensor& lens_in,
                               double scale) {
  check_args(q_in, k_cache, v_cache, block_tables_in, cu_in, lens_in);
  const at::Tensor q = q_in.contiguous(), tables = block_tables_in.contiguous();
  const at::Tensor cu_t = cu_in.contiguous(), lens_t = lens_in.contiguous();
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2), bs = k_cache.size(1);
  const int64_t B = lens_t.size(0), W = tables.size(1), P = k_cache.size(0), group = Hq / Hkv;
  const int32_t* cu = cu_t.data_ptr<int32_t>();
  const int32_t* lens = lens_t.data_ptr<int32_t>();
  const int32_t* table = tables.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0 && cu[B] == T, "paged_attention: cu_query_lens must run from 0 to ", T, " tokens");
  std::vector<int64_t> seq_of(T);
  int64_t max_len = 1;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t q_len = cu[b + 1] - cu[b];
    TORCH_CHECK(q_len >= 0 && q_len <= lens[b] && lens[b] <= W * bs, "paged_attention: sequence ", b, " has ", q_len,
                " queries over ", lens[b], " cached tokens (table room: ", W * bs, ")");
    for (int64_t t = cu[b]; t < cu[b + 1]; ++t) seq_of[t] = b;
    max_len = std::max<int64_t>(max_len, lens[b]);
    for (int64_t j = 0; j < (lens[b] + bs - 1) / bs; ++j) {
      TORCH_CHECK(0 <= table[b * W + j] && table[b * W + j] < P, "paged_attention: sequence ", b, " names page ",
                  table[b * W + j], " of ", P);
    }
  }
  at::Tensor out = at::empty({T, Hq, D}, q.options());
  const bool avx2 = cpu::has_avx2();
  // About 16K multiply-adds per chunk at least, so a short context stays on one thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / (max_len * D * group));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t k0 = k_cache.stride(0), k1 = k_cache.stride(1), k2 = k_cache.stride(2);
    const int64_t v0 = v_cache.stride(0), v1 = v_cache.stride(1), v2 = v_cache.stride(2);
    at::parallel_for(0, T * Hkv, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(work_floats(max_len, group, D)), qf(group * D), of(group * D);
      std::vector<const scalar_t*> k_rows, v_rows;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / Hkv, kvh = item % Hkv, b = seq_of[t];
        const int64_t keys = lens[b] - (cu[b + 1] - t) + 1;  // positions 0 .. this query's own
        const scalar_t* qt = qp + (t * Hq + kvh * group) * D;  // this kv head's query heads, adjacent
        for (int64_t i = 0; i < group * D; ++i) qf[i] = static_cast<float>(qt[i]);
        gather_rows(kp + kvh * k2, table + b * W, keys, bs, k0, k1, k_rows);
        gather_rows(vp + kvh * v2, table + b * W, keys, bs, v0, v1, v_rows);
        attend(k_rows, v_rows, qf.data(), group, D, keys, static_cast<float>(scale), avx2, scores.data(), of.data());
        scalar_t* ot = op + (t * Hq + kvh * group) * D;
        for (int64_t i = 0; i < group * D; ++i) ot[i] = static_cast<scalar_t>(of[i]);
      }
    });
  });
  return out;
}

}  // namespace arbitrage_fast
