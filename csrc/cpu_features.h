// The x86 instruction sets the CPU kernels (bf16_linear.cpp, gguf_linear.cpp) are compiled for,
// and the run-time checks that guard them. Vector paths are compiled into a baseline build
// through a function attribute naming their instruction set, so the extension loads on any
// x86-64 CPU; a function marked AF_TARGET_X may only be called where cpu::has_x() is true.
// Elsewhere (not x86-64) every check is false and only the portable paths run.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>
#define AF_X86 1
// F16C converts the GGUF blocks' fp16 scales; the bf16 kernel needs only AVX2 and FMA, but no
// CPU with AVX2 lacks F16C, so one instruction set (and one check) serves both kernels.
#define AF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define AF_TARGET_AVX512_VNNI \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#else
#define AF_X86 0
#endif

namespace arbitrage_fast::cpu {

#if AF_X86
inline bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

inline bool has_avx512_vnni() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
#else
inline bool has_avx2() { return false; }
inline bool has_avx512_vnni() { return false; }
#endif

}  // namespace arbitrage_fast::cpu
