// Vectorised row dots over GGUF blocks, one per format: dot(weight row, quantized activation
// row) with the contract of gguf_blocks.h. This header (deliberately without an include
// guard) is included once per instruction set by gguf_linear.cpp, inside its own namespace,
// with
//   AF_TARGET  the function attribute naming the instruction set (cpu_features.h), so the file
//              compiles in a baseline build and runs only where the CPU has those features;
//   AF_VNNI    1 where 8-bit products accumulate with AVX-512 VNNI (vpdpbusd, no saturation),
//              0 where AVX2's vpmaddubsw + vpmaddwd do it.
// Each group of 32 is one 256-bit integer dot; the group's float scale multiplies the eight
// int32 partial sums into a float accumulator, and the row's sum is reduced once at the end
// (Q4_K first sums each group's lanes in int32 and scales eight groups at once: dot_q4_k).
// A kernel takes R activation rows at once (Rows): a weight group is decoded once and dotted
// with every row, which is what makes prefill cheaper per row than decode.
// Unsigned formats (nibbles, 5-bit) go straight into the u8 x s8 product and pay their offset
// or min through the activation group sums; signed ones (Q8_0, Q6_K) move their sign onto the
// activations first, as llama.cpp does.

AF_TARGET static inline __m256i dot_u8i8(__m256i u, __m256i s) {
#if AF_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  // |u| <= 128 and |s| <= 127 here, so a pair sum (<= 32512) never saturates int16.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

AF_TARGET static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
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

// Bit i of the 32-bit word at p -> 0x10 in byte i (the fifth bit of a 5-bit weight).
AF_TARGET static inline __m256i fifth_bits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i bytes = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

AF_TARGET static inline __m256 fma_group(__m256i p, float scale, __m256 acc) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale), acc);
}

template <int R>
AF_TARGET static void dot_q8_0(const uint8_t* w, Rows x, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < x.groups; ++g, w += 34) {
    const __m256i q = load32(w + 2), aq = _mm256_abs_epi8(q);
    const float d = fp16(w);
    for (int r = 0; r < R; ++r) {
      const __m256i xs = _mm256_sign_epi8(load32(x.xq + r * x.stride + 32 * g), q);
      acc[r] = fma_group(dot_u8i8(aq, xs), d * x.xd[r * x.groups + g], acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

// Formats whose group decodes to unsigned integers u (q = u - offset, w = d * q + m): the
// dot takes u and pays d * (m / d - offset) * sum(x) through the activation group sums.
template <int R, int kOffset, bool kMin, int kBytes, typename Decode>
AF_TARGET static inline void dot_unsigned(const uint8_t* w, Rows x, float* out, Decode decode) {
  __m256 acc[R];
  float extra[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), extra[r] = 0.0f;
  for (int64_t g = 0; g < x.groups; ++g, w += kBytes) {
    const __m256i u = decode(w);
    const float d = fp16(w);
    const float e = (kMin ? fp16(w + 2) : 0.0f) - kOffset * d;
    for (int r = 0; r < R; ++r) {
      acc[r] = fma_group(dot_u8i8(u, load32(x.xq + r * x.stride + 32 * g)), d * x.xd[r * x.groups + g], acc[r]);
      extra[r] += e * x.xs[r * x.groups + g];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + extra[r];
}

// Group decoders of the unsigned formats (byte offsets of qs, and of qh where there is one).
struct NibblesAt2 {
  AF_TARGET __m256i operator()(const uint8_t* b) const { return nibbles16(b + 2); }
};
struct NibblesAt4 {
  AF_TARGET __m256i operator()(const uint8_t* b) const { return nibbles16(b + 4); }
};
struct FiveBitsAt6 {
  AF_TARGET __m256i operator()(const uint8_t* b) const {
    return _mm256_or_si256(nibbles16(b + 6), fifth_bits(b + 2));
  }
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

template <int R>
AF_TARGET static void dot_q5_0(const uint8_t* w, Rows x, float* out) {
  dot_unsigned<R, 16, false, 22>(w, x, out, FiveBitsAt6{});
}

template <int R>
AF_TARGET static void dot_q5_1(const uint8_t* w, Rows x, float* out) {
  dot_unsigned<R, 0, true, 24>(w, x, out, FiveBitsAt8{});
}

// The eight int32 dots of a super-block's groups, each an [8 x int32] of partial sums, summed
// into one vector whose lane g holds group g's whole dot (exact in int32: |dot| <= 32*15*127).
AF_TARGET static inline __m256i group_sums8(const __m256i p[8]) {
  // hadd works within 128-bit halves: after two levels the low half holds the low-half sums
  // of groups 0..3 (then 4..7), the high half their high-half sums.
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// Q4_K: each group's dot is summed in int32 first and meets its float scale once, as one lane
// of an eight-group vector, and the mins ride in the same accumulator: per row and super-block
// that is one conversion and two fused multiply-adds instead of eight of each plus scalar work
// for the mins, which made batched rows (a prefill, a decode batch) compute-bound.
template <int R>
AF_TARGET static void dot_q4_k(const uint8_t* w, Rows x, float* out) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < x.groups; g += 8, w += 144) {
    int scale[8], min[8];
    for (int j = 0; j < 8; ++j) q4k_scale_min(j, w + 4, &scale[j], &min[j]);
    const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(fp16(w)), _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)scale)));
    const __m256 mn = _mm256_mul_ps(_mm256_set1_ps(fp16(w + 2)), _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)min)));
    __m256i u[8];
    for (int k = 0; k < 4; ++k) {
      // 32 bytes hold group 2k in their low nibbles and 2k + 1 in their high ones.
      const __m256i v = load32(w + 16 + 32 * k);
      u[2 * k] = _mm256_and_si256(v, low);
      u[2 * k + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xr = x.xq + r * x.stride + 32 * g;
      __m256i p[8];
      for (int j = 0; j < 8; ++j) p[j] = dot_u8i8(u[j], load32(xr + 32 * j));
      const __m256 xd = _mm256_loadu_ps(x.xd + r * x.groups + g);
      const __m256 xs = _mm256_loadu_ps(x.xs + r * x.groups + g);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(group_sums8(p)), _mm256_mul_ps(sc, xd), acc[r]);
      acc[r] = _mm256_fnmadd_ps(mn, xs, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

template <int R>
AF_TARGET static void dot_q6_k(const uint8_t* w, Rows x, float* out) {
  const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < x.groups; g += 8, w += 210) {
    const int8_t* scales = reinterpret_cast<const int8_t*>(w + 192);
    const float d = fp16(w + 208);
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
        // Lanes 0..3 of a product hold inputs 0..15, lanes 4..7 inputs 16..31.
        const __m256 halves = _mm256_mul_ps(
            _mm256_set_m128(_mm_set1_ps(scales[2 * gg + 1]), _mm_set1_ps(scales[2 * gg])), _mm256_set1_ps(d));
        for (int r = 0; r < R; ++r) {
          const __m256i xs = _mm256_sign_epi8(load32(x.xq + r * x.stride + 32 * (g + gg)), q);
          const __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_u8i8(aq, xs)), halves);
          acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(x.xd[r * x.groups + g + gg]), acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

AF_TARGET static Kernels kernels(int64_t type) {
  switch (type) {
    case Q4_0: return {dot_q4_0<1>, dot_q4_0<4>, dot_q4_0<8>};
    case Q4_1: return {dot_q4_1<1>, dot_q4_1<4>, dot_q4_1<8>};
    case Q5_0: return {dot_q5_0<1>, dot_q5_0<4>, dot_q5_0<8>};
    case Q5_1: return {dot_q5_1<1>, dot_q5_1<4>, dot_q5_1<8>};
    case Q8_0: return {dot_q8_0<1>, dot_q8_0<4>, dot_q8_0<8>};
    case Q4_K: return {dot_q4_k<1>, dot_q4_k<4>, dot_q4_k<8>};
    case Q6_K: return {dot_q6_k<1>, dot_q6_k<4>, dot_q6_k<8>};
    default: return {nullptr, nullptr, nullptr};
  }
}
