// GGUF quantized block layouts (as llama.cpp stores them) and the activation blocks the
// quantized products read. Shared by the portable reference path (gguf_linear.cpp) and the
// vectorised paths (gguf_linear_simd.h).
//
// A weight row of K inputs is K / block_elems whole blocks laid end to end. Every format is
// described to the kernels in groups of 32 inputs: a group decodes to 32 signed integers q
// (the format's offset already subtracted), one float scale per 16 of them and one float
// `min`, so that weight[i] = scale[i / 16] * q[i] + min. Q6_K is the one format whose two
// halves of a group have different scales.
//
// Activations are quantized per scale group of S inputs: xd = amax / 127 over the group,
// xq = round_half_even(x / xd) in [-127, 127], and per group of 32 xs = xd * sum(xq), the sum
// that a format with a `min` (or an unsigned offset) needs. S is the weight's block size
// (activation_group): 32 for the 32-input formats, as llama.cpp's Q8_1; 256 for the K-quants,
// as its Q8_K, so that a super-block's eight group dots meet their integer scales in int32 and
// a float only once per super-block. Then one group's contribution is
//   xd * (scale_lo * dot(q[0:16], xq[0:16]) + scale_hi * dot(q[16:32], xq[16:32])) + min * xs.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace arbitrage_fast::gguf {

// ggml's type ids (the numbers stored in a GGUF file's tensor headers).
enum QuantType : int64_t {
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q4_K = 12,
  Q6_K = 14,
};

struct Format {
  int64_t block_elems;
  int64_t block_bytes;
};

// {0, 0} for a type without a kernel here.
inline Format format_of(int64_t type) {
  switch (type) {
    case Q4_0: return {32, 18};   // d, qs[16]
    case Q4_1: return {32, 20};   // d, m, qs[16]
    case Q5_0: return {32, 22};   // d, qh[4], qs[16]
    case Q5_1: return {32, 24};   // d, m, qh[4], qs[16]
    case Q8_0: return {32, 34};   // d, qs[32]
    case Q4_K: return {256, 144}; // d, dmin, scales[12], qs[128]
    case Q6_K: return {256, 210}; // ql[128], qh[64], scales[16] (int8), d
    default: return {0, 0};
  }
}

// Inputs per activation scale for a weight of this format (see the header comment).
inline int64_t activation_group(const Format& f) { return f.block_elems; }

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Q4_K packs eight 6-bit (scale, min) pairs into 12 bytes; pair j of a super-block.
inline void q4k_scale_min(int j, const uint8_t* s, int* scale, int* min) {
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[j + 4] & 63;
  } else {
    *scale = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// One decoded group of 32 weights (see the header comment).
struct Group {
  int8_t q[32];
  float scale_lo, scale_hi, min;
};

// Decodes group g (0-based, counted in 32s from the row start) of a row of `type` blocks.
void decode_group(int64_t type, const uint8_t* row, int64_t g, Group* out);

}  // namespace arbitrage_fast::gguf
