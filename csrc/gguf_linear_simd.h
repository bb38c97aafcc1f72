// Vectorised row dots over GGUF blocks, one per format: dot(weight row, quantized activation
// row) with the contract of gguf_blocks.h. This header (deliberately without an include
// guard) is included once per instruction set by gguf_linear.cpp, inside its own namespace,
// with
//   AF_TARGET  the function attribute naming the instruction set (cpu_features.h), so the file
//              compiles in a baseline build and runs only where the CPU has those features;
//   AF_VNNI    1 where 8-bit products accumulate with AVX-512 VNNI (vpdpbusd, no saturation),
//              0 where AVX2's vpmaddubsw + vpmaddwd do it.
// Each group of 32 is one 256-bit integer dot. In the 32-input formats the group's float scale
// multiplies its eight int32 partial sums into a float accumulator; in the K-quants a
// super-block's groups meet their integer scales and add up in int32, and meet a float once
// (their activations share one scale per super-block). The row's sum is reduced once at the end.
// A kernel takes R activation rows at once (Rows): a weight group is decoded once and dotted
// with every row, which is what makes prefill cheaper per row than decode.
// Unsigned formats (nibbles, 5-bit) go straight into the u8 x s8 product and pay their offset
// or min through the activation group sums; signed ones (Q8_0, Q6_K, and Q5_0 made signed on
// decode) move their sign onto the activations first, as llama.cpp does.

AF_TARGET static inline __m256i dot_u8i8(__m256i u, __m256i s) {
#if AF_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  // |u| <= 128 and |s| <= 127 here, so a pair sum (<= 32512) never saturates int16.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

AF_TARGET static inline float fp16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

AF_TARGET static inline __m256i load32(const void* p) {
  return _mm256_loadu_si256(static_cast<const __m256i*>(p));
}

// 16 bytes of nibble pairs -> 32 bytes: low nibbles are inputs 0..15, high nibbles 16..31.
AF_TARGET static inline __m256i nibbles16(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

// The 32-bit word at p as bytes: all ones where its bit is set (vec::bit_bytes).
AF_TARGET static inline __m256i word_bits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  return vec::bit_bytes(bits);
}

// Bit i of the 32-bit word at p -> 0x10 in byte i (the fifth bit of a 5-bit weight).
AF_TARGET static inline __m256i fifth_bits(const uint8_t* p) {
  return _mm256_and_si256(word_bits(p), _mm256_set1_epi8(0x10));
}

// Asks for the weight bytes kPrefetch ahead of a block of `bytes` at w. A row dot streams its
// weights once; with two threads streaming, the hardware prefetcher alone leaves the kernel
// waiting on blocks (a pass over the 1.5B's layers takes about a tenth longer without this).
constexpr int kPrefetch = 1024;
AF_TARGET static inline void prefetch_block(const uint8_t* w, int bytes) {
  for (int o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + o), _MM_HINT_T0);
}

AF_TARGET static inline __m256 fma_group(__m256i p, float scale, __m256 acc) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale), acc);
}

template <int R>
AF_TARGET static void dot_q8_0(const uint8_t* w, Rows x, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < x.groups; ++g, w += 34) {
    if (g % 2 == 0) prefetch_block(w, 68);
    const __m256i q = load32(w + 2), aq = _mm256_abs_epi8(q);
    const float d = fp16(w);
    for (int r = 0; r < R; ++r) {
      const __m256i xs = _mm256_sign_epi8(load32(x.xq + r * x.stride + 32 * g), q);
      acc[r] = fma_group(dot_u8i8(aq, xs), d * x.xd[r * x.scales + g], acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = vec::hsum8(acc[r]);
}

// Formats whose group decodes to unsigned integers u (q = u - offset, w = d * q + m): the
// dot takes u and pays d * (m / d - offset) * sum(x) through the activation group sums.
template <int R, int kOffset, bool kMin, int kBytes, typename Decode>
AF_TARGET static inline void dot_unsigned(const uint8_t* w, Rows x, float* out, Decode decode) {
  __m256 acc[R];
  float extra[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), extra[r] = 0.0f;
  for (int64_t g = 0; g < x.groups; ++g, w += kBytes) {
    if (g % 2 == 0) prefetch_block(w, 2 * kBytes);
    const __m256i u = decode(w);
    const float d = fp16(w);
    const float e = (kMin ? fp16(w + 2) : 0.0f) - kOffset * d;
    for (int r = 0; r < R; ++r) {
      acc[r] = fma_group(dot_u8i8(u, load32(x.xq + r * x.stride + 32 * g)), d * x.xd[r * x.scales + g], acc[r]);
      extra[r] += e * x.xs[r * x.groups + g];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = vec::hsum8(acc[r]) + extra[r];
}

// Group decoders of the unsigned formats (byte offsets of qs, and of qh where there is one).
struct NibblesAt2 {
  AF_TARGET __m256i operator()(const uint8_t* b) const { return nibbles16(b + 2); }
};
struct NibblesAt4 {
  AF_TARGET __m256i operator()(const uint8_t* b) const { return nibbles16(b + 4); }
};
struct FiveBitsAt8 {
  AF_TARGET __m256i operator()(const uint8_t* b) const {
    return _mm256_or_si256(nibbles16(b + 8), fifth_bits(b + 4));
  }
};

template <int R>
AF_TARGET static void dot_q4_0(const uint8_t* w, Rows x, float* out) {
  dot_unsigned<R, 8, false, 18>(w, x, out, NibblesAt2{});
}

template <int R>
AF_TARGET static void dot_q4_1(const uint8_t* w, Rows x, float* out) {
  dot_unsigned<R, 0, true, 20>(w, x, out, NibblesAt4{});
}

// Q5_0 (no min) takes the signed route instead: nibbles | 0xF0 where the fifth bit is clear
// is q = u - 16 as an int8, and the sign moves onto the activations as in Q8_0. That drops the
// offset's per-group scalar term (a float chain the vector work waited on).
AF_TARGET static inline __m256i q5_0_signed(const uint8_t* b) {
  return _mm256_or_si256(nibbles16(b + 6),
                         _mm256_andnot_si256(word_bits(b + 2), _mm256_set1_epi8(static_cast<char>(0xF0))));
}

// One Q5_0 group against R rows, into acc[0 .. R).
template <int R>
AF_TARGET static inline void q5_0_group(const uint8_t* w, Rows x, int64_t g, __m256* acc) {
  const __m256i q = q5_0_signed(w), aq = _mm256_abs_epi8(q);
  const float d = fp16(w);
  for (int r = 0; r < R; ++r) {
    const __m256i xs = _mm256_sign_epi8(load32(x.xq + r * x.stride + 32 * g), q);
    acc[r] = fma_group(dot_u8i8(aq, xs), d * x.xd[r * x.scales + g], acc[r]);
  }
}

template <int R>
AF_TARGET static void dot_q5_0(const uint8_t* w, Rows x, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < x.groups; ++g, w += 22) {
    if (g % 2 == 0) prefetch_block(w, 44);
    q5_0_group<R>(w, x, g, acc);
  }
  for (int r = 0; r < R; ++r) out[r] = vec::hsum8(acc[r]);
}

template <int R>
AF_TARGET static void dot_q5_1(const uint8_t* w, Rows x, float* out) {
  dot_unsigned<R, 0, true, 24>(w, x, out, FiveBitsAt8{});
}

#if AF_VNNI
// The signed 32-input formats (Q8_0, Q5_0) two groups at a time in 512-bit vectors, where the
// CPU has AVX-512 VNNI. A decode row is cheap either way; a batch of rows is not: per row and
// group the 256-bit loop spends about seven instructions on 32 products (the dot, the sign, the
// conversion and a scalar scale broadcast), which made a tile of eight rows compute-bound at a
// third of the memory's pace. Here a row spends six on 64 products: the two groups' scale
// products d_w * d_x are formed as one vector (lanes 0-7 the first group's, 8-15 the second's)
// from the weight's pair of scales and the row's (Rows::spread, laid out for this load).
// An odd last group takes the 256-bit step; every tile size runs this same code, so a row's
// result does not depend on how many rows share the call.
AF_TARGET static inline __m512i join(__m256i lo, __m256i hi) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// [a] * 8 then [b] * 8.
AF_TARGET static inline __m512 halves(float a, float b) {
  return _mm512_castsi512_ps(join(_mm256_castps_si256(_mm256_set1_ps(a)), _mm256_castps_si256(_mm256_set1_ps(b))));
}

// Decode(w) gives one group's 32 signed weights as int8; kBytes is a block's size.
template <int R, int kBytes, typename Decode>
AF_TARGET static inline void dot_signed_pairs(const uint8_t* w, Rows x, float* out, Decode decode) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= x.groups; g += 2, w += 2 * kBytes) {
    prefetch_block(w, 2 * kBytes);
    const __m512i q = join(decode(w), decode(w + kBytes));
    const __mmask64 negative = _mm512_movepi8_mask(q);
    const __m512i aq = _mm512_abs_epi8(q);
    const __m512 dw = halves(fp16(w), fp16(w + kBytes));
    for (int r = 0; r < R; ++r) {
      const __m512i xq = _mm512_loadu_si512(x.xq + r * x.stride + 32 * g);
      const __m512i xs = _mm512_mask_sub_epi8(xq, negative, _mm512_setzero_si512(), xq);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aq, xs);
      const __m512 dx = _mm512_loadu_ps(x.spread + r * x.spread_stride + 8 * g);  // Rows::spread
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, dx), acc[r]);
    }
  }
  if (g < x.groups) {  // an odd last group
    const __m256i q = decode(w), aq = _mm256_abs_epi8(q);
    const float d = fp16(w);
    for (int r = 0; r < R; ++r) {
      const __m256i xs = _mm256_sign_epi8(load32(x.xq + r * x.stride + 32 * g), q);
      const __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_u8i8(aq, xs)), _mm256_set1_ps(d * x.xd[r * x.scales + g]));
      acc[r] = _mm512_add_ps(acc[r], _mm512_zextps256_ps512(part));
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

struct SignedQ8_0 {
  AF_TARGET __m256i operator()(const uint8_t* b) const { return load32(b + 2); }
};
struct SignedQ5_0 {
  AF_TARGET __m256i operator()(const uint8_t* b) const { return q5_0_signed(b); }
};

template <int R>
AF_TARGET static void dot_q8_0_512(const uint8_t* w, Rows x, float* out) {
  dot_signed_pairs<R, 34>(w, x, out, SignedQ8_0{});
}

template <int R>
AF_TARGET static void dot_q5_0_512(const uint8_t* w, Rows x, float* out) {
  dot_signed_pairs<R, 22>(w, x, out, SignedQ5_0{});
}
#endif

// Lanes 2k and 2k + 1 of sixteen int16 scales (one int32 lane) broadcast to both 128-bit
// halves: the low half takes scale 2k, the high half scale 2k + 1 (`pair_lo_hi`), or both halves
// take scale 2k (`pair_lo`) or 2k + 1 (`pair_hi`).
AF_TARGET static inline __m256i scale_pair(__m256i scales16, int k, __m256i shuffle) {
  return _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(scales16, _mm256_set1_epi32(k)), shuffle);
}
AF_TARGET static inline __m256i pair_lo() { return _mm256_set1_epi16(0x0100); }
AF_TARGET static inline __m256i pair_hi() { return _mm256_set1_epi16(0x0302); }
AF_TARGET static inline __m256i pair_lo_hi() {
  return _mm256_set_m128i(_mm_set1_epi16(0x0302), _mm_set1_epi16(0x0100));
}

// The products of one 32-input group with its int16 scales, summed in int32: u8 x s8 pairs in
// int16 (no saturation: |u| <= 63 and |s| <= 127 here), then multiplied by the scale and
// summed in pairs. The K-quants' activations share one float scale per super-block, so a
// super-block's eight groups add up in int32 and meet a float once.
AF_TARGET static inline __m256i scaled_dot(__m256i u, __m256i s, __m256i scale16) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), scale16);
}

// A Q4_K super-block's eight 6-bit scales (bytes 0..7) and eight mins (bytes 8..15), decoded
// from their 12 bytes with word-wide masks and shifts (q4k_scale_min's layout, four pairs per
// 32-bit word).
AF_TARGET static inline __m128i q4k_scales_mins(const uint8_t* s) {
  uint32_t a, b, c;
  std::memcpy(&a, s, 4);
  std::memcpy(&b, s + 4, 4);
  std::memcpy(&c, s + 8, 4);
  const uint32_t scales_lo = a & 0x3F3F3F3F, mins_lo = b & 0x3F3F3F3F;
  const uint32_t scales_hi = (c & 0x0F0F0F0F) | ((a >> 2) & 0x30303030);
  const uint32_t mins_hi = ((c >> 4) & 0x0F0F0F0F) | ((b >> 2) & 0x30303030);
  return _mm_set_epi32(static_cast<int>(mins_hi), static_cast<int>(mins_lo), static_cast<int>(scales_hi),
                       static_cast<int>(scales_lo));
}

// What both Q4_K kernels read first from a 144-byte block: its eight scales widened to 16-bit
// lanes 0..7, its eight mins times dmin, and d.
struct Q4kHeader {
  __m256i scales16;
  __m256 mins;
  float d;
};

AF_TARGET static inline Q4kHeader q4k_header(const uint8_t* w) {
  const __m128i packed = q4k_scales_mins(w + 4);
  return {_mm256_cvtepu8_epi16(packed),
          _mm256_mul_ps(_mm256_set1_ps(fp16(w + 2)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(packed, 8)))),
          fp16(w)};
}

// Q4_K: group j's dot is scaled by its 6-bit scale in int32 (a lane sums four inputs of each
// group: |lane| <= 8 * 4 * 15 * 127 * 63 < 2**24, so it is also exact as a float), the
// super-block's sum meets d * xd once, and the mins ride in the same accumulator against the
// activation group sums.
template <int R>
AF_TARGET static void dot_q4_k(const uint8_t* w, Rows x, float* out) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < x.groups; g += 8, w += 144) {
    prefetch_block(w, 144);
    const auto [scales16, mn, d] = q4k_header(w);
    // Group by group, every row at once: the rows' sums and one group's weights and scales
    // are all that is live, which fits the sixteen vector registers even at eight rows.
    const int8_t* xg = x.xq + 32 * g;
    __m256i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k) {
      // 32 bytes hold group 2k in their low nibbles and 2k + 1 in their high ones.
      const __m256i v = load32(w + 16 + 32 * k);
      for (int half = 0; half < 2; ++half) {
        const __m256i u = half ? _mm256_and_si256(_mm256_srli_epi16(v, 4), low) : _mm256_and_si256(v, low);
        const __m256i sc = scale_pair(scales16, k, half ? pair_hi() : pair_lo());
        const int j = 2 * k + half;
        for (int r = 0; r < R; ++r) {
          sum[r] = _mm256_add_epi32(sum[r], scaled_dot(u, load32(xg + r * x.stride + 32 * j), sc));
        }
      }
    }
    const int64_t sb = g / 8;
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_set1_ps(d * x.xd[r * x.scales + sb]), acc[r]);
      acc[r] = _mm256_fnmadd_ps(mn, _mm256_loadu_ps(x.xs + r * x.groups + g), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = vec::hsum8(acc[r]);
}

// Q6_K: signed 6-bit weights (sign moved onto the activations) with an int8 scale per 16; the
// super-block's products add up in int32 (|lane| <= 8 * 4 * 32 * 127 * 128 < 2**24)
// and meet d * xd once.
template <int R>
AF_TARGET static void dot_q6_k(const uint8_t* w, Rows x, float* out) {
  const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < x.groups; g += 8, w += 210) {
    prefetch_block(w, 210);
    const __m256i scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 192)));
    const float d = fp16(w + 208);
    // Group by group, every row at once (as in dot_q4_k).
    const int8_t* xg = x.xq + 32 * g;
    __m256i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      const __m256i high = load32(w + 128 + 32 * h);
      for (int k = 0; k < 4; ++k) {
        const int gg = 4 * h + k;  // group within the super-block; scales gg*2, gg*2+1
        const __m256i l = load32(w + 64 * h + 32 * (k & 1));
        const __m256i nib = (k >> 1) ? _mm256_and_si256(_mm256_srli_epi16(l, 4), low)
                                     : _mm256_and_si256(l, low);
        const __m256i top = _mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(2 * k)), two);
        const __m256i q = _mm256_sub_epi8(_mm256_or_si256(nib, _mm256_slli_epi16(top, 4)), bias);
        const __m256i aq = _mm256_abs_epi8(q);
        // int16 lanes 0..7 of a product hold inputs 0..15 (scale 2gg), lanes 8..15 the rest.
        const __m256i sc = scale_pair(scales16, gg, pair_lo_hi());
        for (int r = 0; r < R; ++r) {
          const __m256i xs = _mm256_sign_epi8(load32(xg + r * x.stride + 32 * gg), q);
          sum[r] = _mm256_add_epi32(sum[r], scaled_dot(aq, xs, sc));
        }
      }
    }
    const int64_t sb = g / 8;
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_set1_ps(d * x.xd[r * x.scales + sb]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = vec::hsum8(acc[r]);
}

#if AF_VNNI
// The K-quants two groups at a time in 512-bit vectors, for the reason the 32-input formats
// have theirs (dot_signed_pairs): a batch of rows made the 256-bit loops compute-bound. The
// arithmetic is the 256-bit kernels' (u8 x s8 pairs in int16, times the int16 group scale and
// summed in pairs into int32, a super-block meeting its float scale once); only the lanes
// differ: groups j and j + 1 sit in one vector's halves, their activations adjacent in memory.

// int16 lane i takes scale `first + (i >> shift)` of sixteen: runs of 16 lanes (shift 4; Q4_K, a
// group's one scale over its 32 inputs) or of 8 (shift 3; Q6_K, a scale per 16 inputs).
AF_TARGET static inline __m512i scale_runs(__m512i scales16, int first, int shift) {
  const __m512i lane = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
                                        15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i idx = _mm512_add_epi16(_mm512_set1_epi16(static_cast<int16_t>(first)),
                                       _mm512_srl_epi16(lane, _mm_cvtsi32_si128(shift)));
  return _mm512_permutexvar_epi16(idx, scales16);
}

AF_TARGET static inline __m512i scaled_dot512(__m512i u, __m512i s, __m512i scale16) {
  return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), scale16);
}

template <int R>
AF_TARGET static void dot_q4_k_512(const uint8_t* w, Rows x, float* out) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  __m256 mins[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), mins[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < x.groups; g += 8, w += 144) {
    prefetch_block(w, 144);
    const Q4kHeader head = q4k_header(w);
    const __m512i scales16 = _mm512_castsi256_si512(head.scales16);
    const __m256 mn = head.mins;
    const float d = head.d;
    const int8_t* xg = x.xq + 32 * g;
    __m512i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_si512();
    for (int k = 0; k < 4; ++k) {
      // 32 bytes hold group 2k in their low nibbles and 2k + 1 in their high ones.
      const __m256i bytes = load32(w + 16 + 32 * k);
      const __m512i u = _mm512_and_si512(join(bytes, _mm256_srli_epi16(bytes, 4)), low);
      const __m512i sc = scale_runs(scales16, 2 * k, 4);
      for (int r = 0; r < R; ++r) {
        sum[r] = _mm512_add_epi32(sum[r], scaled_dot512(u, _mm512_loadu_si512(xg + r * x.stride + 64 * k), sc));
      }
    }
    const int64_t sb = g / 8;
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_set1_ps(d * x.xd[r * x.scales + sb]), acc[r]);
      mins[r] = _mm256_fnmadd_ps(mn, _mm256_loadu_ps(x.xs + r * x.groups + g), mins[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) + vec::hsum8(mins[r]);
}

template <int R>
AF_TARGET static void dot_q6_k_512(const uint8_t* w, Rows x, float* out) {
  const __m512i low = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(3), bias = _mm512_set1_epi8(32);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < x.groups; g += 8, w += 210) {
    prefetch_block(w, 210);
    const __m512i scales16 = _mm512_castsi256_si512(
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 192))));
    const float d = fp16(w + 208);
    const int8_t* xg = x.xq + 32 * g;
    __m512i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      const __m256i high = load32(w + 128 + 32 * h);
      // Groups 4h + k for k = 0, 1 take the low nibbles of the 64 bytes at 64h, k = 2, 3 their
      // high nibbles; group k's top two bits sit at bits 2k of `high`.
      const __m512i l = _mm512_loadu_si512(w + 64 * h);
      const __m512i hh = join(high, high);
      for (int pair = 0; pair < 2; ++pair) {
        const int k = 2 * pair;
        const __m512i nib = pair ? _mm512_and_si512(_mm512_srli_epi16(l, 4), low) : _mm512_and_si512(l, low);
        // shift 2k in the low half, 2k + 2 in the high half
        const __m512i shifts = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(2 * k)),
                                                  _mm256_set1_epi16(static_cast<int16_t>(2 * k + 2)), 1);
        const __m512i top = _mm512_and_si512(_mm512_srlv_epi16(hh, shifts), two);
        const __m512i q = _mm512_sub_epi8(_mm512_or_si512(nib, _mm512_slli_epi16(top, 4)), bias);
        const __mmask64 negative = _mm512_movepi8_mask(q);
        const __m512i aq = _mm512_abs_epi8(q);
        const int gg = 4 * h + k;  // the pair's first group within the super-block
        const __m512i sc = scale_runs(scales16, 2 * gg, 3);
        for (int r = 0; r < R; ++r) {
          const __m512i xq = _mm512_loadu_si512(xg + r * x.stride + 32 * gg);
          const __m512i xs = _mm512_mask_sub_epi8(xq, negative, _mm512_setzero_si512(), xq);
          sum[r] = _mm512_add_epi32(sum[r], scaled_dot512(aq, xs, sc));
        }
      }
    }
    const int64_t sb = g / 8;
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_set1_ps(d * x.xd[r * x.scales + sb]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

AF_TARGET static Kernels kernels(int64_t type) {
  switch (type) {
    case Q4_0: return {AF_ROW_TILES(dot_q4_0)};
    case Q4_1: return {AF_ROW_TILES(dot_q4_1)};
#if AF_VNNI
    case Q5_0: return {AF_ROW_TILES(dot_q5_0_512), true};
    case Q8_0: return {AF_ROW_TILES(dot_q8_0_512), true};
#else
    case Q5_0: return {AF_ROW_TILES(dot_q5_0)};
    case Q8_0: return {AF_ROW_TILES(dot_q8_0)};
#endif
    case Q5_1: return {AF_ROW_TILES(dot_q5_1)};
#if AF_VNNI
    case Q4_K: return {AF_ROW_TILES(dot_q4_k_512)};
    case Q6_K: return {AF_ROW_TILES(dot_q6_k_512)};
#else
    case Q4_K: return {AF_ROW_TILES(dot_q4_k)};
    case Q6_K: return {AF_ROW_TILES(dot_q6_k)};
#endif
    default: return {nullptr, nullptr, nullptr, nullptr, nullptr};
  }
}
