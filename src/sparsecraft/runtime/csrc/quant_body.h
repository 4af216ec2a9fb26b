// The quantised GEMV / small-batch GEMM loops, written once with GCC vector extensions and
// included once per instruction set by quant_kernels.cpp, inside a namespace compiled under
// that set's `#pragma GCC target` (generic, avx2, avx512). The including namespace defines,
// before the include,
//   SC_W / W                   floats per vector for the dense loops (8 or 16)
//   vf8 cvt8(uint64_t)         8 byte codes -> 8 floats
//   vf16 cvt16(uint64_t lo, uint64_t hi)   16 byte codes -> 16 floats (when W == 16)
//   float hf(uint16_t)         fp16 bits -> float (F16C where the set has it)
// with that set's intrinsics (GCC turns a generic u8 -> float __builtin_convertvector into
// 8 scalar conversions). No system header is included here (they sit at the top of the .cpp).
//
// Layout (notes/quant_layout.md): w[r, c] = code[r, c] * scale[r, c / g] + offset[r, c / g].
// Every loop computes, per row r and token b,
//   y[b, r] = sum_q scale[r, q] * (codes . x)_q + offset[r, q] * sum_q(x) + bias[r]   (dense)
//   y[b, r] = sum_kept (codes * scale + offset) . x_group + bias[r]                  (group-sparse)
// so the offset costs one multiply per group (dense) or is folded into the weights (sparse).
//
// int4 nibbles: byte j of a row holds column 2j (low) and 2j+1 (high). Instead of
// interleaving nibbles, the caller permutes x once per call inside blocks of P columns
// (P = 16 for dense int4 and group:16, 8 for group:8) to [even columns..., odd columns...];
// then the low nibbles of P/2 bytes line up with the first P/2 x values, the high ones with
// the rest. A dot product does not care about the order of its terms.

static inline vf8 ld8(const float* p) {
  vf8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

static inline vf16 ld16(const float* p) {
  vf16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

static inline float hsum(vf8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline float hsum(vf16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

#if defined(SC_W) && SC_W == 16
typedef vf16 vf;
static inline vf ldv(const float* p) { return ld16(p); }
#else
typedef vf8 vf;
static inline vf ldv(const float* p) { return ld8(p); }
#endif

constexpr uint64_t kLowNibbles = 0x0F0F0F0F0F0F0F0FULL;

// The codes of 32 consecutive columns starting at c (a multiple of 32), as 4 words of 8 codes
// in the order of the permuted x.
template <int BITS>
static inline void codes32(const uint8_t* row, int64_t c, uint64_t w[4]) {
  if constexpr (BITS == 4) {
    uint64_t a, b;
    __builtin_memcpy(&a, row + c / 2, 8);
    __builtin_memcpy(&b, row + c / 2 + 8, 8);
    w[0] = a & kLowNibbles;
    w[1] = (a >> 4) & kLowNibbles;
    w[2] = b & kLowNibbles;
    w[3] = (b >> 4) & kLowNibbles;
  } else {
    __builtin_memcpy(w, row + c, 32);
  }
}

// Dense int4 / int8 rows [r0, r1) for B tokens. a.x: permuted x [B, in] (int4) or x (int8);
// a.xsum: [B, in / g] sums of x per quantisation group.
template <int BITS, int B>
void dense_rows(const QArgs& a, int64_t r0, int64_t r1) {
  constexpr int V = 32 / W;            // vectors per 32 columns
  constexpr int NCH = B <= 2 ? V : 1;  // independent FMA chains per token (hide FMA latency)
  const int64_t in = a.in, g = a.g, ng = in / g;
  const int64_t row_bytes = BITS == 4 ? in / 2 : in;
  const int64_t ahead = prefetch_rows(row_bytes);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.codes + r * row_bytes;
    prefetch_row(a, r, ahead, row_bytes, ng);
    vf acc[B];
    float zacc[B];
    for (int b = 0; b < B; ++b) {
      acc[b] = vf{};
      zacc[b] = 0.f;
    }
    for (int64_t q = 0; q < ng; ++q) {
      vf gacc[B][NCH];
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b)
#pragma GCC unroll 4
        for (int ch = 0; ch < NCH; ++ch) gacc[b][ch] = vf{};
      for (int64_t c = q * g; c < (q + 1) * g; c += 32) {
        uint64_t w[4];
        codes32<BITS>(row, c, w);
        vf wv[V];
#if defined(SC_W) && SC_W == 16
        wv[0] = cvt16(w[0], w[1]);
        wv[1] = cvt16(w[2], w[3]);
#else
        wv[0] = cvt8(w[0]);
        wv[1] = cvt8(w[1]);
        wv[2] = cvt8(w[2]);
        wv[3] = cvt8(w[3]);
#endif
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b)
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) gacc[b][v % NCH] += wv[v] * ldv(a.x + b * in + c + v * W);
      }
      const float s = hf(a.scale[r * ng + q]), z = hf(a.offset[r * ng + q]);
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) {
        vf t = gacc[b][0];
#pragma GCC unroll 4
        for (int ch = 1; ch < NCH; ++ch) t += gacc[b][ch];
        acc[b] += t * s;
        zacc[b] += z * a.xsum[b * ng + q];
      }
    }
    const float bias = a.bias ? a.bias[r] : 0.f;
    for (int b = 0; b < B; ++b) a.y[b * a.out + r] = hsum(acc[b]) + zacc[b] + bias;
  }
}

// The 8 codes of kept group k of a group:8 row, low nibbles first (permuted x order).
static inline uint64_t codes_g8(const uint8_t* row, int64_t k) {
  uint32_t t;
  __builtin_memcpy(&t, row + k * 4, 4);
  return static_cast<uint64_t>(t & 0x0F0F0F0Fu) | (static_cast<uint64_t>((t >> 4) & 0x0F0F0F0Fu) << 32);
}

// Group-sparse int4 rows: only the kept groups of G (8 or 16) columns are read; x is
// permuted inside blocks of G columns. A row's scales and offsets are converted to float32
// once (several kept groups share a quantisation group).
template <int G, int B>
void sparse_rows(const QArgs& a, int64_t r0, int64_t r1) {
  constexpr int WPG = G / 8;           // 8-code words per kept group
  constexpr int UG = 4 / WPG;          // kept groups per unrolled step (4 words)
  constexpr int NCH = B <= 2 ? 4 : 1;  // independent FMA chains per token
  const int64_t in = a.in, ng = in / a.g, kept = a.kept, per_q = a.g / G;
  const int shift = a.per_q_shift;  // log2(per_q) when a power of two, else -1
  std::vector<float> sz(2 * ng);
  const float* sr = sz.data();
  const float* zr = sz.data() + ng;
  const int64_t row_bytes = kept * (G / 2), ahead = prefetch_rows(row_bytes);
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t* gi = a.group_index + r * kept;
    const uint8_t* row = a.codes + r * row_bytes;
    prefetch_row(a, r, ahead, row_bytes, ng);
    if (r + ahead < a.out) prefetch_span(gi + ahead * kept, kept * 4);
    halves_to_floats(a.scale + r * ng, ng, sz.data());
    halves_to_floats(a.offset + r * ng, ng, sz.data() + ng);
    vf8 acc[B][NCH];
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b)
#pragma GCC unroll 4
      for (int ch = 0; ch < NCH; ++ch) acc[b][ch] = vf8{};
    int64_t k = 0;
    for (; k + UG <= kept; k += UG) {
#pragma GCC unroll 4
      for (int u = 0; u < UG; ++u) {
        const int64_t idx = gi[k + u];
        const int64_t q = shift >= 0 ? (idx >> shift) : idx / per_q;
        const float s = sr[q], z = zr[q];
        const float* xg = a.x + idx * G;
        uint64_t w[WPG];
        if constexpr (G == 8) {
          w[0] = codes_g8(row, k + u);
        } else {
          uint64_t t;
          __builtin_memcpy(&t, row + (k + u) * 8, 8);
          w[0] = t & kLowNibbles;
          w[1] = (t >> 4) & kLowNibbles;
        }
#pragma GCC unroll 2
        for (int h = 0; h < WPG; ++h) {
          const vf8 wv = cvt8(w[h]) * s + z;
#pragma GCC unroll 8
          for (int b = 0; b < B; ++b) acc[b][(u * WPG + h) % NCH] += wv * ld8(xg + b * in + h * 8);
        }
      }
    }
    for (; k < kept; ++k) {  // the last kept % UG groups
      const int64_t idx = gi[k];
      const int64_t q = shift >= 0 ? (idx >> shift) : idx / per_q;
      const float s = sr[q], z = zr[q];
      const float* xg = a.x + idx * G;
      uint64_t w[WPG];
      if constexpr (G == 8) {
        w[0] = codes_g8(row, k);
      } else {
        uint64_t t;
        __builtin_memcpy(&t, row + k * 8, 8);
        w[0] = t & kLowNibbles;
        w[1] = (t >> 4) & kLowNibbles;
      }
      for (int h = 0; h < WPG; ++h) {
        const vf8 wv = cvt8(w[h]) * s + z;
        for (int b = 0; b < B; ++b) acc[b][0] += wv * ld8(xg + b * in + h * 8);
      }
    }
    const float bias = a.bias ? a.bias[r] : 0.f;
    for (int b = 0; b < B; ++b) {
      vf8 t = acc[b][0];
      for (int ch = 1; ch < NCH; ++ch) t += acc[b][ch];
      a.y[b * a.out + r] = hsum(t) + bias;
    }
  }
}

// Dequantisation of rows [r0, r1) into a.y as float32 [out, in]: code * scale + offset, a
// multiply then an add, each rounded, as quant.grid.dequantize_codes does (so no fused
// multiply-add: the result is bit-equal to the Python reference). Group-sparse rows are zero
// outside their kept runs. The prefill's path: dequantise once, then one GEMM.
static inline void store_affine8(const uint8_t* codes8, float s, float z, float* out)
    __attribute__((optimize("fp-contract=off")));
static inline void store_affine8(const uint8_t* codes8, float s, float z, float* out) {
  uint64_t w;
  __builtin_memcpy(&w, codes8, 8);
  const vf8 v = cvt8(w) * s + z;
  __builtin_memcpy(out, &v, sizeof v);
}

template <int BITS>
void dequant_dense_rows(const QArgs& a, int64_t r0, int64_t r1) {
  const int64_t in = a.in, g = a.g, ng = in / g, row_bytes = BITS == 4 ? in / 2 : in;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.codes + r * row_bytes;
    float* out = a.y + r * in;
    for (int64_t q = 0; q < ng; ++q) {
      const float s = hf(a.scale[r * ng + q]), z = hf(a.offset[r * ng + q]);
      for (int64_t c = q * g; c < (q + 1) * g; c += 16) {
        uint8_t codes[16];
        if constexpr (BITS == 4) {
          nibbles16(row + c / 2, codes);
        } else {
          __builtin_memcpy(codes, row + c, 16);
        }
        store_affine8(codes, s, z, out + c);
        store_affine8(codes + 8, s, z, out + c + 8);
      }
    }
  }
}

template <int G>
void dequant_sparse_rows(const QArgs& a, int64_t r0, int64_t r1) {
  const int64_t in = a.in, ng = in / a.g, kept = a.kept, per_q = a.g / G;
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t* gi = a.group_index + r * kept;
    const uint8_t* row = a.codes + r * kept * (G / 2);
    float* out = a.y + r * in;
    std::fill(out, out + in, 0.f);
    for (int64_t k = 0; k < kept; ++k) {
      const int64_t idx = gi[k], q = idx / per_q;
      const float s = hf(a.scale[r * ng + q]), z = hf(a.offset[r * ng + q]);
      uint8_t packed[8] = {}, codes[16];
      __builtin_memcpy(packed, row + k * (G / 2), G / 2);
      nibbles16(packed, codes);
      for (int h = 0; h < G / 8; ++h) store_affine8(codes + 8 * h, s, z, out + idx * G + 8 * h);
    }
  }
}

// Dense float32 rows (the decode step's unquantised layers): y = W x + b, W [out, in].
template <int B>
void float_rows(const QArgs& a, int64_t r0, int64_t r1) {
  constexpr int NCH = B <= 2 ? 4 : 1;
  const int64_t in = a.in;
  const int64_t main = in - in % (W * NCH);
  const int64_t ahead = prefetch_rows(in * 4);
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = a.weight + r * in;
    if (r + ahead < a.out) prefetch_span(wr + ahead * in, in * 4);
    vf acc[B][NCH];
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b)
#pragma GCC unroll 4
      for (int ch = 0; ch < NCH; ++ch) acc[b][ch] = vf{};
    for (int64_t c = 0; c < main; c += W * NCH) {
#pragma GCC unroll 4
      for (int ch = 0; ch < NCH; ++ch) {
        const vf wv = ldv(wr + c + ch * W);
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) acc[b][ch] += wv * ldv(a.x + b * in + c + ch * W);
      }
    }
    const float bias = a.bias ? a.bias[r] : 0.f;
    for (int b = 0; b < B; ++b) {
      vf t = acc[b][0];
      for (int ch = 1; ch < NCH; ++ch) t += acc[b][ch];
      float s = hsum(t);
      for (int64_t c = main; c < in; ++c) s += wr[c] * a.x[b * in + c];
      a.y[b * a.out + r] = s + bias;
    }
  }
}

// -- the decode step's non-matmul loops (8 lanes in every instruction set) ---------------------
typedef int32_t vi8 __attribute__((vector_size(32)));

// exp of 8 floats (Cephes' single-precision polynomial, ~2 ulp); inputs clamped to [-87, 88].
static inline vf8 vexp8(vf8 x) {
  x = x < -87.f ? vf8{} - 87.f : x;
  x = x > 88.f ? vf8{} + 88.f : x;
  const vf8 t = x * 1.44269504088896341f;
  const vi8 n = __builtin_convertvector(t + (t >= 0.f ? vf8{} + 0.5f : vf8{} - 0.5f), vi8);  // round half away
  const vf8 nf = __builtin_convertvector(n, vf8);
  vf8 r = x - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  const vf8 z = r * r;
  vf8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.f;
  const vi8 bits = (n + 127) << 23;
  vf8 scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

static inline float exp1(float x) {  // the same exp for one value (loop tails)
  const vf8 v = vexp8(vf8{} + x);
  return v[0];
}

// One head: out[hd] = softmax(scaling * q . K[t], t < T) @ V; K, V rows of hd floats.
// `scores` holds T floats.
static void attend(const float* q, const float* K, const float* V, int64_t T, int64_t hd, float scaling,
                   float* scores, float* out) {
  const int64_t hv = hd - hd % 8;
  float mx = -3.4e38f;
  const int64_t ahead = prefetch_rows(hd * 4);
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) {  // four rows at once: four independent FMA chains
    const float* k = K + t * hd;
    if (t + 4 + ahead <= T) prefetch_span(k + ahead * hd, 4 * hd * 4);
    vf8 acc[4] = {};
    for (int64_t c = 0; c < hv; c += 8) {
      const vf8 qv = ld8(q + c);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) acc[i] += qv * ld8(k + i * hd + c);
    }
    for (int i = 0; i < 4; ++i) {
      float s = hsum(acc[i]);
      for (int64_t c = hv; c < hd; ++c) s += q[c] * k[i * hd + c];
      s *= scaling;
      scores[t + i] = s;
      mx = s > mx ? s : mx;
    }
  }
  for (; t < T; ++t) {
    const float* k = K + t * hd;
    vf8 acc = vf8{};
    for (int64_t c = 0; c < hv; c += 8) acc += ld8(q + c) * ld8(k + c);
    float s = hsum(acc);
    for (int64_t c = hv; c < hd; ++c) s += q[c] * k[c];
    s *= scaling;
    scores[t] = s;
    mx = s > mx ? s : mx;
  }
  float sum = 0.f;
  t = 0;
  vf8 vsum = vf8{};
  for (; t + 8 <= T; t += 8) {
    const vf8 e = vexp8(ld8(scores + t) - mx);
    __builtin_memcpy(scores + t, &e, sizeof e);
    vsum += e;
  }
  sum = hsum(vsum);
  for (; t < T; ++t) {
    scores[t] = exp1(scores[t] - mx);
    sum += scores[t];
  }
  const float inv = 1.f / sum;
  // V in one pass over its rows, 64 columns (8 accumulators) at a time
  for (int64_t c0 = 0; c0 < hv; c0 += 64) {
    const int64_t nv = std::min<int64_t>(8, (hv - c0) / 8);
    vf8 acc[8] = {};
    for (int64_t u = 0; u < T; ++u) {
      const float* vr = V + u * hd + c0;
      if (c0 == 0 && u + ahead < T) prefetch_span(V + (u + ahead) * hd, hd * 4);
      const float su = scores[u];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
        if (j < nv) acc[j] += su * ld8(vr + 8 * j);
    }
    for (int64_t j = 0; j < nv; ++j) {
      const vf8 r = acc[j] * inv;
      __builtin_memcpy(out + c0 + 8 * j, &r, sizeof r);
    }
  }
  for (int64_t c = hv; c < hd; ++c) {
    float a = 0.f;
    for (int64_t u = 0; u < T; ++u) a += scores[u] * V[u * hd + c];
    out[c] = a * inv;
  }
}

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i]
static void silu_mul(const float* gate, const float* up, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const vf8 g = ld8(gate + i);
    const vf8 r = g / (1.f + vexp8(vf8{} - g)) * ld8(up + i);
    __builtin_memcpy(out + i, &r, sizeof r);
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.f + exp1(-gate[i])) * up[i];
}
