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

// Software prefetch for the row loops. On the machines measured (2-vCPU VMs) the hardware
// prefetchers did not keep up with rows of a few hundred bytes read once: the dense int4 x int8
// GEMV of SmolLM2's gate/up ran at 3 GB/s from memory against 11 GB/s for a plain sum (and
// at in-cache speed once told). Each row asks for the row about kPrefetchBytes ahead.
constexpr int64_t kPrefetchBytes = 4096;

// Rows ahead such that they start about kPrefetchBytes after the current one.
static inline int64_t prefetch_rows(int64_t row_bytes) {
  return row_bytes >= kPrefetchBytes ? 1 : (kPrefetchBytes + row_bytes - 1) / row_bytes;
}

// Prefetch `bytes` from p, one request per 64-byte line.
static inline void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

// Prefetch row r + ahead of a quantised row loop (when there is one): its row_bytes of codes
// and its first scale and offset (a row's ng fp16 values share a line or two).
static inline void prefetch_row(const QArgs& a, int64_t r, int64_t ahead, int64_t row_bytes, int64_t ng) {
  if (r + ahead >= a.out) return;
  prefetch_span(a.codes + (r + ahead) * row_bytes, row_bytes);
  __builtin_prefetch(a.scale + (r + ahead) * ng);
  __builtin_prefetch(a.offset + (r + ahead) * ng);
}

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));

// Dense int4 rows [r0, r1) against int8 activations (QArgs::xq, xscale; Linear::int8_x):
// per block of 32 columns the integer dot product of codes and activations, times the block's
// activation scale, summed per quantisation group, times the group's scale; plus offset * the
// float sum of x. SC_X8_BODY is the instruction-set independent frame; DOT32(row, c, xb)
// gives the block's integer dot product as a float vector or a float.
#define SC_X8_ROWS(ACC_T, ZERO, DOT_FMA, SCALE_ADD, HSUM)                                 \
  template <int B>                                                                         \
  void dense_rows_x8(const QArgs& a, int64_t r0, int64_t r1) {                             \
    const int64_t in = a.in, g = a.g, ng = in / g, nb = in / 32;                          \
    const int64_t ahead = prefetch_rows(in / 2);                                           \
    for (int64_t r = r0; r < r1; ++r) {                                                    \
      const uint8_t* row = a.codes + r * (in / 2);                                         \
      prefetch_row(a, r, ahead, in / 2, ng);                                               \
      ACC_T total[B];                                                                      \
      float zsum[B];                                                                       \
      for (int b = 0; b < B; ++b) {                                                        \
        total[b] = ZERO;                                                                   \
        zsum[b] = 0.f;                                                                     \
      }                                                                                    \
      for (int64_t q = 0; q < ng; ++q) {                                                   \
        ACC_T gacc[B];                                                                     \
        for (int b = 0; b < B; ++b) gacc[b] = ZERO;                                        \
        for (int64_t c = q * g; c < (q + 1) * g; c += 32) DOT_FMA;                         \
        const float s = hf(a.scale[r * ng + q]), z = hf(a.offset[r * ng + q]);            \
        for (int b = 0; b < B; ++b) {                                                      \
          total[b] = SCALE_ADD(gacc[b], s, total[b]);                                      \
          zsum[b] += z * a.xsum[b * ng + q];                                               \
        }                                                                                  \
      }                                                                                    \
      const float bias = a.bias ? a.bias[r] : 0.f;                                         \
      for (int b = 0; b < B; ++b) a.y[b * a.out + r] = HSUM(total[b]) + zsum[b] + bias;    \
    }                                                                                      \
  }

// The portable block dot product: 16 bytes of codes (low nibbles: the block's even columns,
// high: the odd ones) against 32 int8 activations in the same permuted order.
static inline int32_t dot32_u4i8(const uint8_t* codes, const int8_t* x) {
  int32_t s = 0;
  for (int j = 0; j < 16; ++j) s += (codes[j] & 15) * x[j] + (codes[j] >> 4) * x[16 + j];
  return s;
}
// 8 bytes of packed int4 -> their 16 codes in column order (byte j: columns 2j, 2j+1).
static inline void nibbles16(const uint8_t* p, uint8_t out[16]) {
  uint64_t w;
  __builtin_memcpy(&w, p, 8);
  const uint64_t lo = w & 0x0F0F0F0F0F0F0F0FULL, hi = (w >> 4) & 0x0F0F0F0F0F0F0F0FULL;
#ifdef SC_X86  // SSE2, the x86-64 baseline
  const __m128i v = _mm_unpacklo_epi8(_mm_cvtsi64_si128(static_cast<long long>(lo)),
                                      _mm_cvtsi64_si128(static_cast<long long>(hi)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), v);
#else
  for (int j = 0; j < 8; ++j) {
    out[2 * j] = static_cast<uint8_t>(lo >> (8 * j));
    out[2 * j + 1] = static_cast<uint8_t>(hi >> (8 * j));
  }
#endif
}

static inline float sc_id(float v) { return v; }
static inline float sc_scale_add(float v, float s, float acc) { return acc + v * s; }

namespace isa_generic {
#define SC_W 8
constexpr int W = 8;
static inline float hf(uint16_t h) { return h2f(h); }
static inline void halves_to_floats(const uint16_t* h, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = hf(h[i]);
}
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
SC_X8_ROWS(float, 0.f,
           for (int b = 0; b < B; ++b) gacc[b] += static_cast<float>(dot32_u4i8(row + c / 2, a.xq + b * in + c)) *
                                                 a.xscale[b * nb + c / 32],
           sc_scale_add, sc_id)
#undef SC_W
}  // namespace isa_generic

#ifdef SC_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#define SC_W 8
constexpr int W = 8;
static inline float hf(uint16_t h) { return _cvtsh_ss(h); }
static inline void halves_to_floats(const uint16_t* h, int64_t n, float* out) {  // fp16 -> float, 8 at a time
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) out[i] = hf(h[i]);
}
static inline vf8 cvt8(uint64_t w) {
  return (vf8)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(w))));
}
#include "quant_body.h"
#include "quant_x8_avx2.h"
#undef SC_W
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
namespace isa_avx512 {
#define SC_W 16
constexpr int W = 16;
static inline float hf(uint16_t h) { return _cvtsh_ss(h); }
using isa_avx2::halves_to_floats;  // F16C, 8 at a time
static inline vf8 cvt8(uint64_t w) {
  return (vf8)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(w))));
}
static inline vf16 cvt16(uint64_t lo, uint64_t hi) {
  const __m128i b = _mm_set_epi64x(static_cast<long long>(hi), static_cast<long long>(lo));
  return (vf16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}
#include "quant_body.h"
#include "quant_x8_avx2.h"
#undef SC_W
}  // namespace isa_avx512
#pragma GCC pop_options
#else
namespace isa_avx2 = isa_generic;  // other architectures: the portable loops only
namespace isa_avx512 = isa_generic;
#endif

}  // namespace sc
