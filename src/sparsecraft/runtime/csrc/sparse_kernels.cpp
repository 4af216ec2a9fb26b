// CPU kernels for sparsecraft.runtime (float32 only; the Python side checks dtypes).
//
// csr_linear: y = x @ W^T + b with W in CSR (int32 row pointers, 16- or 32-bit column
//   indices, float32 values). Few rows of x: a gather per non-zero, the index stream read
//   once for all rows. More rows: x is transposed so the rows of x^T that a weight row
//   touches are contiguous, and each non-zero becomes a broadcast-FMA over a tile of tokens.
// act_gemv: y = W x + b for ONE token, reading only the columns j of W (rows of W^T) whose
//   score |x_j| * scale_j exceeds a threshold (activation sparsity for decoding).
//
// Threads come from at::parallel_for, so torch.set_num_threads governs them.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Few tokens (N <= 4): per weight row, one accumulator pair per token; x row-major.
template <typename I, int N>
void csr_rowwise(const int32_t* rp, const I* col, const float* val, const float* x, int64_t in,
                 const float* bias, float* y, int64_t out) {
  at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      float acc[N][2];
      for (int n = 0; n < N; ++n) { acc[n][0] = 0.f; acc[n][1] = 0.f; }
      int32_t k = rp[o];
      const int32_t end = rp[o + 1];
      // two interleaved chains hide FMA latency
      for (; k + 2 <= end; k += 2) {
        const float w0 = val[k], w1 = val[k + 1];
        const int64_t c0 = col[k], c1 = col[k + 1];
        for (int n = 0; n < N; ++n) {
          acc[n][0] += w0 * x[n * in + c0];
          acc[n][1] += w1 * x[n * in + c1];
        }
      }
      for (; k < end; ++k) {
        const float w = val[k];
        const int64_t c = col[k];
        for (int n = 0; n < N; ++n) acc[n][0] += w * x[n * in + c];
      }
      const float b0 = bias ? bias[o] : 0.f;
      for (int n = 0; n < N; ++n) y[n * out + o] = acc[n][0] + acc[n][1] + b0;
    }
  });
}

// 8 floats; GCC/Clang vector extension, so the compiler keeps tiles in registers (AVX, or
// two SSE registers where AVX is missing) without architecture-specific intrinsics.
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// Tokens [n0, n0 + 8V) of weight rows [b, e): yt[o, n] = sum_k val[k] * xt[col[k], n] + bias[o].
// xt is x^T ([in, ntok], row stride ntok) and yt is y^T; both keep tokens contiguous, so
// every non-zero is a broadcast-FMA over V vectors held in registers.
template <typename I, int V>
inline void csr_tile(const int32_t* rp, const I* col, const float* val, const float* xt, int64_t ntok,
                     int64_t n0, const float* bias, float* yt, int64_t b, int64_t e) {
  for (int64_t o = b; o < e; ++o) {
    v8f acc[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[v] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
    for (int32_t k = rp[o]; k < rp[o + 1]; ++k) {
      const float w = val[k];
      const v8f wv = v8f{w, w, w, w, w, w, w, w};
      const float* xr = xt + static_cast<int64_t>(col[k]) * ntok + n0;
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[v] += wv * load8(xr + 8 * v);
    }
    const float b0 = bias ? bias[o] : 0.f;
    const v8f bv = v8f{b0, b0, b0, b0, b0, b0, b0, b0};
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const v8f r = acc[v] + bv;
      __builtin_memcpy(yt + o * ntok + n0 + 8 * v, &r, sizeof(v8f));
    }
  }
}

// The last ntok - n0 < 8 tokens, scalar.
template <typename I>
inline void csr_tail(const int32_t* rp, const I* col, const float* val, const float* xt, int64_t ntok,
                     int64_t n0, const float* bias, float* yt, int64_t b, int64_t e) {
  const int64_t rem = ntok - n0;
  for (int64_t o = b; o < e; ++o) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int32_t k = rp[o]; k < rp[o + 1]; ++k) {
      const float w = val[k];
      const float* xr = xt + static_cast<int64_t>(col[k]) * ntok + n0;
      for (int64_t t = 0; t < rem; ++t) acc[t] += w * xr[t];
    }
    const float b0 = bias ? bias[o] : 0.f;
    for (int64_t t = 0; t < rem; ++t) yt[o * ntok + n0 + t] = acc[t] + b0;
  }
}

template <typename I>
void csr_tiled(const int32_t* rp, const I* col, const float* val, const float* xt, int64_t ntok,
               const float* bias, float* yt, int64_t out) {
  at::parallel_for(0, out, 8, [&](int64_t b, int64_t e) {
    // small row blocks: a block's indices and values stay in L1 across the token tiles
    constexpr int64_t kRowBlock = 32;
    for (int64_t rb = b; rb < e; rb += kRowBlock) {
      const int64_t re = std::min(e, rb + kRowBlock);
      int64_t n0 = 0;
      for (; n0 + 64 <= ntok; n0 += 64) csr_tile<I, 8>(rp, col, val, xt, ntok, n0, bias, yt, rb, re);
      for (; n0 + 32 <= ntok; n0 += 32) csr_tile<I, 4>(rp, col, val, xt, ntok, n0, bias, yt, rb, re);
      for (; n0 + 16 <= ntok; n0 += 16) csr_tile<I, 2>(rp, col, val, xt, ntok, n0, bias, yt, rb, re);
      for (; n0 + 8 <= ntok; n0 += 8) csr_tile<I, 1>(rp, col, val, xt, ntok, n0, bias, yt, rb, re);
      if (n0 < ntok) csr_tail<I>(rp, col, val, xt, ntok, n0, bias, yt, rb, re);
    }
  });
}

template <typename I>
torch::Tensor csr_dispatch(const int32_t* rp, const I* col, const float* val, const torch::Tensor& x,
                           const float* bias, int64_t out) {
  const int64_t ntok = x.size(0), in = x.size(1);
  if (ntok <= 4) {
    const auto xc = x.contiguous();
    auto y = torch::empty({ntok, out}, x.options());
    const float* xp = xc.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    switch (ntok) {
      case 1: csr_rowwise<I, 1>(rp, col, val, xp, in, bias, yp, out); break;
      case 2: csr_rowwise<I, 2>(rp, col, val, xp, in, bias, yp, out); break;
      case 3: csr_rowwise<I, 3>(rp, col, val, xp, in, bias, yp, out); break;
      default: csr_rowwise<I, 4>(rp, col, val, xp, in, bias, yp, out); break;
    }
    return y;
  }
  // free when x arrives transposed (the output of another sparse layer before .contiguous())
  const auto xt = x.t().contiguous();
  auto yt = torch::empty({out, ntok}, x.options());
  csr_tiled<I>(rp, col, val, xt.data_ptr<float>(), ntok, bias, yt.data_ptr<float>(), out);
  return yt.t().contiguous();  // the layout nn.Linear returns
}

}  // namespace

torch::Tensor csr_linear(const torch::Tensor& x, const torch::Tensor& rowptr, const torch::Tensor& col,
                         const torch::Tensor& val, const c10::optional<torch::Tensor>& bias,
                         int64_t out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x: 2-D float32");
  TORCH_CHECK(rowptr.scalar_type() == torch::kInt && rowptr.numel() == out + 1, "rowptr: int32 [out + 1]");
  TORCH_CHECK(val.scalar_type() == torch::kFloat && val.numel() == col.numel(), "val: float32 [nnz]");
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->numel() == out, "bias: float32 [out]");
    bp = bias->data_ptr<float>();
  }
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  if (col.scalar_type() == torch::kShort) {
    TORCH_CHECK(x.size(1) <= 65536, "16-bit column indices need in_features <= 65536");
    const auto* c = reinterpret_cast<const uint16_t*>(col.data_ptr<int16_t>());
    return csr_dispatch<uint16_t>(rp, c, val.data_ptr<float>(), x, bp, out);
  }
  TORCH_CHECK(col.scalar_type() == torch::kInt, "col: int16 or int32");
  return csr_dispatch<int32_t>(rp, col.data_ptr<int32_t>(), val.data_ptr<float>(), x, bp, out);
}

torch::Tensor act_gemv(const torch::Tensor& x, const torch::Tensor& wt, const c10::optional<torch::Tensor>& scale,
                       double threshold, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(wt.dim() == 2 && wt.scalar_type() == torch::kFloat && wt.is_contiguous(), "wt: contiguous [in, out] float32");
  const int64_t in = wt.size(0), out = wt.size(1);
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.numel() == in, "x: contiguous float32 [in]");
  const float* xp = x.data_ptr<float>();
  const float* sp = nullptr;
  if (scale.has_value() && scale->defined()) {
    TORCH_CHECK(scale->scalar_type() == torch::kFloat && scale->numel() == in, "scale: float32 [in]");
    sp = scale->data_ptr<float>();
  }
  // active inputs: their values and the rows of W^T they select
  std::vector<float> xa;
  std::vector<const float*> rows;
  xa.reserve(in);
  rows.reserve(in);
  const float thr = static_cast<float>(threshold);
  const float* w = wt.data_ptr<float>();
  for (int64_t j = 0; j < in; ++j) {
    const float s = std::fabs(xp[j]) * (sp ? sp[j] : 1.f);
    if (s > thr) {
      xa.push_back(xp[j]);
      rows.push_back(w + j * out);
    }
  }
  auto y = (bias.has_value() && bias->defined()) ? bias->to(torch::kFloat).contiguous().clone()
                                                 : torch::zeros({out}, x.options());
  TORCH_CHECK(y.numel() == out, "bias: [out]");
  float* yp = y.data_ptr<float>();
  const int64_t na = static_cast<int64_t>(xa.size());
  at::parallel_for(0, out, 256, [&](int64_t b, int64_t e) {
    float* yb = yp + b;
    const int64_t len = e - b;
    int64_t k = 0;
    for (; k + 4 <= na; k += 4) {
      const float x0 = xa[k], x1 = xa[k + 1], x2 = xa[k + 2], x3 = xa[k + 3];
      const float *w0 = rows[k] + b, *w1 = rows[k + 1] + b, *w2 = rows[k + 2] + b, *w3 = rows[k + 3] + b;
      for (int64_t t = 0; t < len; ++t) yb[t] += x0 * w0[t] + x1 * w1[t] + x2 * w2[t] + x3 * w3[t];
    }
    for (; k < na; ++k) {
      const float x0 = xa[k];
      const float* w0 = rows[k] + b;
      for (int64_t t = 0; t < len; ++t) yb[t] += x0 * w0[t];
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("csr_linear", &csr_linear, "y = x @ W^T + b, W in CSR (float32)");
  m.def("act_gemv", &act_gemv, "one-token W x + b over the active inputs only");
}
