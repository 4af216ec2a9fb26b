// The int8-activation int4 rows (SC_X8_ROWS, quant_isa.h) with AVX2 integer instructions,
// included inside the AVX2 and the AVX-512 namespaces of quant_isa.h (each compiled under its
// own `#pragma GCC target`, which enables AVX2). No header is included here.

static inline __m256 scale_add256(__m256 v, float s, __m256 acc) { return _mm256_fmadd_ps(v, _mm256_set1_ps(s), acc); }
static inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
// codes * x for one block: maddubs (u8 x i8 -> pairs summed in i16; at most 2 * 15 * 127),
// madd with ones (-> i32), to float, times the block's activation scale
#define SC_DOT_AVX2                                                                                  \
  {                                                                                                  \
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2));             \
    const __m256i codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),           \
                                           _mm256_set1_epi8(0x0F));                                  \
    for (int b = 0; b < B; ++b) {                                                                    \
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + b * in + c));   \
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), _mm256_set1_epi16(1));   \
      gacc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(a.xscale[b * nb + c / 32]), gacc[b]); \
    }                                                                                                \
  }
SC_X8_ROWS(__m256, _mm256_setzero_ps(), SC_DOT_AVX2, scale_add256, hsum256)
#undef SC_DOT_AVX2
