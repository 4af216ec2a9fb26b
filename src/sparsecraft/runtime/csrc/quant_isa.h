// The three instruction-set builds of quant_body.h (generic, AVX2+FMA, AVX-512F/BW/VL), each in
// its own namespace under its own `#pragma GCC target`, with that set's byte -> float
// conversions. Included by quant_kernels.cpp only (and by a standalone test harness).
#pragma once

#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#define SC_X86 1
#endif

namespace sc {

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));

namespace isa_generic {
#define SC_W 8
constexpr int W = 8;
static inline vf8 cvt8(uint64_t w) {
#ifdef SC_X86  // SSE2, the x86-64 baseline: widen bytes to int32 by interleaving with zeros
  const __m128i z = _mm_setzero_si128();
  const __m128i h = _mm_unpacklo_epi8(_mm_cvtsi64_si128(static_cast<long long>(w)), z);
  const __m128 a = _mm_cvtepi32_ps(_mm_unpacklo_epi16(h, z)), b = _mm_cvtepi32_ps(_mm_unpackhi_epi16(h, z));
  vf8 v;
  __builtin_memcpy(&v, &a, 16);
  __builtin_memcpy(reinterpret_cast<char*>(&v) + 16, &b, 16);
  return v;
#else  // portable: one byte at a time
  vf8 v;
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>((w >> (8 * i)) & 0xFF);
  return v;
#endif
}
#include "quant_body.h"
#undef SC_W
}  // namespace isa_generic

#ifdef SC_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#define SC_W 8
constexpr int W = 8;
static inline vf8 cvt8(uint64_t w) {
  return (vf8)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(w))));
}
#include "quant_body.h"
#undef SC_W
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
namespace isa_avx512 {
#define SC_W 16
constexpr int W = 16;
static inline vf8 cvt8(uint64_t w) {
  return (vf8)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(w))));
}
static inline vf16 cvt16(uint64_t lo, uint64_t hi) {
  const __m128i b = _mm_set_epi64x(static_cast<long long>(hi), static_cast<long long>(lo));
  return (vf16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}
#include "quant_body.h"
#undef SC_W
}  // namespace isa_avx512
#pragma GCC pop_options
#else
namespace isa_avx2 = isa_generic;  // other architectures: the portable loops only
namespace isa_avx512 = isa_generic;
#endif

}  // namespace sc
