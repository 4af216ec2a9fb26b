// Quantised CPU kernels for sparsecraft.runtime: GEMV and small-batch GEMM (1..8 tokens) for
// int8, int4 and int4 group-sparse weights (notes/quant_layout.md), plus float32 GEMV for the
// decode step's unquantised layers, and full dequantisation for large batches.
//
// One build runs everywhere: the library is compiled for the baseline ISA, and the loops of
// quant_body.h are compiled three times under `#pragma GCC target` (generic, AVX2+FMA,
// AVX-512F/BW/VL); the set used is chosen at load time from cpuid (`isa()`, `set_isa()`;
// the Python side caps it with torch's own CPU capability, which also checks OS support).
// Threads come from at::parallel_for, so torch.set_num_threads governs them.
#include "quant_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "quant_isa.h"

namespace sc {

// Row-range functions by [kind][B - 1]. Filled here, in baseline-ISA code: a table filler
// compiled under an ISA pragma may itself use that ISA's instructions (and fault on older CPUs).
#define SC_ROW(ns, t, B)                       \
  t[kInt8][B - 1] = &ns::dense_rows<8, B>;     \
  t[kInt4][B - 1] = &ns::dense_rows<4, B>;     \
  t[kGroup8][B - 1] = &ns::sparse_rows<8, B>;  \
  t[kGroup16][B - 1] = &ns::sparse_rows<16, B>; \
  t[kFloat][B - 1] = &ns::float_rows<B>;
#define SC_TABLE(ns, t) \
  SC_ROW(ns, t, 1) SC_ROW(ns, t, 2) SC_ROW(ns, t, 3) SC_ROW(ns, t, 4) SC_ROW(ns, t, 5) SC_ROW(ns, t, 6) SC_ROW(ns, t, 7) SC_ROW(ns, t, 8)

namespace {

const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

#define SC_X8(ns, t) \
  t[0] = &ns::dense_rows_x8<1>; t[1] = &ns::dense_rows_x8<2>; t[2] = &ns::dense_rows_x8<3>; \
  t[3] = &ns::dense_rows_x8<4>; t[4] = &ns::dense_rows_x8<5>; t[5] = &ns::dense_rows_x8<6>; \
  t[6] = &ns::dense_rows_x8<7>; t[7] = &ns::dense_rows_x8<8>;

#define SC_DEQ(ns, t)                           \
  t[kInt8] = &ns::dequant_dense_rows<8>;        \
  t[kInt4] = &ns::dequant_dense_rows<4>;        \
  t[kGroup8] = &ns::dequant_sparse_rows<8>;     \
  t[kGroup16] = &ns::dequant_sparse_rows<16>;

struct Tables {
  RowFn t[3][kKinds][kMaxBatch];
  RowFn x8[3][kMaxBatch];  // dense int4 against int8 activations
  RowFn deq[3][kKinds - 1];  // dequantisation by kind (not kFloat)
  AttendFn attend[3] = {&isa_generic::attend, &isa_avx2::attend, &isa_avx512::attend};
  SiluFn silu[3] = {&isa_generic::silu_mul, &isa_avx2::silu_mul, &isa_avx512::silu_mul};
  int detected = 0;
  int active = 0;
  Tables() {
    SC_TABLE(isa_generic, t[0])
    SC_TABLE(isa_avx2, t[1])
    SC_TABLE(isa_avx512, t[2])
    SC_DEQ(isa_generic, deq[0])
    SC_DEQ(isa_avx2, deq[1])
    SC_DEQ(isa_avx512, deq[2])
    SC_X8(isa_generic, x8[0])
    SC_X8(isa_avx2, x8[1])
    SC_X8(isa_avx512, x8[2])
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    // every AVX2 CPU has F16C (the AVX2 loops convert the fp16 grids with it)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) detected = 1;
    if (detected == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      detected = 2;
#endif
    active = detected;
  }
};

Tables& tables() {
  static Tables t;
  return t;
}

int isa_index(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return i;
  TORCH_CHECK(false, "unknown instruction set '", name, "'; known: generic, avx2, avx512");
  return 0;
}

// Permute x [B, in] inside blocks of P columns to [even columns..., odd columns...].
void permute_into(const float* x, int64_t batch, int64_t in, int64_t P, float* out) {
  const int64_t half = P / 2;
  for (int64_t b = 0; b < batch; ++b) {
    const float* xr = x + b * in;
    float* o = out + b * in;
    for (int64_t blk = 0; blk < in; blk += P)
      for (int64_t j = 0; j < half; ++j) {
        o[blk + j] = xr[blk + 2 * j];
        o[blk + half + j] = xr[blk + 2 * j + 1];
      }
  }
}

// x [B, in] -> int8 codes per block of 32 (code = x * (127 / max|x|) rounded half away from
// zero, scale = max|x| / 127; an all-zero block has scale 0 and codes 0), permuted inside each block to
// [even columns..., odd columns...] like the int4 codes' nibbles.
void quantize_x8(const float* x, int64_t batch, int64_t in, int8_t* xq, float* xscale) {
  const int64_t nb = in / 32;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t k = 0; k < nb; ++k) {
      const float* xb = x + b * in + k * 32;
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      xscale[b * nb + k] = scale;
      int8_t* o = xq + b * in + k * 32;
      for (int j = 0; j < 16; ++j) {
        o[j] = static_cast<int8_t>(std::lround(xb[2 * j] * inv));
        o[16 + j] = static_cast<int8_t>(std::lround(xb[2 * j + 1] * inv));
      }
    }
}

int log2_exact(int64_t v) {
  for (int s = 0; s < 62; ++s)
    if ((int64_t{1} << s) == v) return s;
  return -1;
}

}  // namespace

std::string isa() { return kIsaNames[tables().active]; }

AttendFn attend_fn() { return tables().attend[tables().active]; }
SiluFn silu_fn() { return tables().silu[tables().active]; }

std::string detected_isa() { return kIsaNames[tables().detected]; }

// Use `name` (or the best the CPU has, if it has less); returns the set now used.
std::string set_isa(const std::string& name) {
  auto& t = tables();
  t.active = std::min(isa_index(name), t.detected);
  return kIsaNames[t.active];
}

void linear_into(const Linear& l, const float* x, int64_t batch, float* y, float* scratch) {
  TORCH_CHECK(batch >= 1 && batch <= kMaxBatch, "linear_into: batch ", batch, " outside 1..", kMaxBatch);
  QArgs a;
  a.in = l.in;
  a.out = l.out;
  a.g = l.g;
  a.y = y;
  a.bias = l.bias.defined() ? l.bias.data_ptr<float>() : nullptr;
  std::vector<float> xsum, xscale;
  std::vector<int8_t> xq;
  if (l.kind == kFloat) {
    a.weight = l.weight.data_ptr<float>();
    a.x = x;
  } else {
    a.codes = l.codes.data_ptr<uint8_t>();
    a.scale = reinterpret_cast<const uint16_t*>(l.scale.data_ptr<c10::Half>());
    a.offset = reinterpret_cast<const uint16_t*>(l.offset.data_ptr<c10::Half>());
    if (l.kind == kInt8) {
      a.x = x;
    } else if (l.int8_x) {
      xq.resize(batch * l.in);
      xscale.resize(batch * (l.in / 32));
      quantize_x8(x, batch, l.in, xq.data(), xscale.data());
      a.xq = xq.data();
      a.xscale = xscale.data();
    } else {
      permute_into(x, batch, l.in, l.kind == kGroup8 ? 8 : 16, scratch);
      a.x = scratch;
    }
    if (l.kind == kInt8 || l.kind == kInt4) {
      const int64_t ng = l.in / l.g;
      xsum.assign(batch * ng, 0.f);
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t q = 0; q < ng; ++q) {
          float s = 0.f;
          for (int64_t c = q * l.g; c < (q + 1) * l.g; ++c) s += x[b * l.in + c];
          xsum[b * ng + q] = s;
        }
      a.xsum = xsum.data();
    } else {
      a.group_index = l.group_index.data_ptr<int32_t>();
      a.kept = l.group_index.size(1);
      a.per_q_shift = log2_exact(l.g / l.sparse_group);
    }
  }
  const RowFn fn = l.int8_x ? tables().x8[tables().active][batch - 1] : tables().t[tables().active][l.kind][batch - 1];
  // enough rows per task that a task reads >= ~32 KB of weights
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(l.in, 1));
  at::parallel_for(0, l.out, grain, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

Linear make_linear(const std::string& what, int64_t kind, const at::Tensor& codes, const at::Tensor& scale,
                   const at::Tensor& offset, const c10::optional<at::Tensor>& group_index,
                   const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t g,
                   int64_t sparse_group) {
  Linear l;
  TORCH_CHECK(kind >= 0 && kind < kKinds, what, ": unknown kernel kind ", kind);
  l.kind = static_cast<int>(kind);
  if (l.kind == kFloat) {
    TORCH_CHECK(weight.defined(), what, ": a float32 layer needs its weight");
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == c10::kFloat && weight.is_contiguous(),
                what, ": weight must be a contiguous float32 [out, in]");
    l.weight = weight;
    l.out = weight.size(0);
    l.in = weight.size(1);
  } else {
    TORCH_CHECK(codes.defined() && scale.defined() && offset.defined(), what, ": codes, scale and offset are needed");
    TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == c10::kByte && codes.is_contiguous(),
                what, ": codes must be a contiguous uint8 [out, *]");
    TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == c10::kHalf && scale.is_contiguous() &&
                    offset.sizes() == scale.sizes() && offset.scalar_type() == c10::kHalf && offset.is_contiguous(),
                what, ": scale and offset must be contiguous float16 [out, in / group_size] of one shape");
    TORCH_CHECK(g > 0 && g % 32 == 0, what, ": group size ", g, " must be a positive multiple of 32");
    l.out = codes.size(0);
    l.in = scale.size(1) * g;
    l.g = g;
    TORCH_CHECK(scale.size(0) == l.out, what, ": scale has ", scale.size(0), " rows, codes ", l.out);
    if (l.kind == kInt8) {
      TORCH_CHECK(codes.size(1) == l.in, what, ": int8 codes must be [out, ", l.in, "], got width ", codes.size(1));
    } else if (l.kind == kInt4) {
      TORCH_CHECK(codes.size(1) * 2 == l.in, what, ": packed int4 must be [out, ", l.in / 2, "], got width ",
                  codes.size(1));
    } else {
      const int64_t G = l.kind == kGroup8 ? 8 : 16;
      TORCH_CHECK(sparse_group == G, what, ": sparse group ", sparse_group, " does not match kernel kind ", kind);
      TORCH_CHECK(group_index.has_value() && group_index->defined(), what, ": group-sparse needs group_index");
      const auto& gi = *group_index;
      TORCH_CHECK(gi.dim() == 2 && gi.scalar_type() == c10::kInt && gi.is_contiguous() && gi.size(0) == l.out,
                  what, ": group_index must be a contiguous int32 [out, kept]");
      TORCH_CHECK(codes.size(1) == gi.size(1) * G / 2, what, ": packed kept groups must be [out, ",
                  gi.size(1) * G / 2, "], got width ", codes.size(1));
      const int32_t* gp = gi.data_ptr<int32_t>();
      const int64_t n_groups = l.in / G;
      bool in_range = true;  // a plain loop: torch reductions would cost more than a small GEMV
      for (int64_t i = 0; i < gi.numel(); ++i) in_range &= gp[i] >= 0 && gp[i] < n_groups;
      TORCH_CHECK(in_range, what, ": group_index values must lie in [0, ", n_groups, ")");
      l.group_index = gi;
      l.sparse_group = G;
    }
    l.codes = codes;
    l.scale = scale;
    l.offset = offset;
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == c10::kFloat && bias->is_contiguous() && bias->numel() == l.out,
                what, ": bias must be a contiguous float32 [", l.out, "]");
    l.bias = *bias;
  }
  return l;
}

namespace {

// Dequantise into w, float32 [out, in] contiguous (the large-batch path: dequantise once,
// then one GEMM).
void dequantize_into(const Linear& l, at::Tensor& w) {
  QArgs a;
  a.codes = l.codes.data_ptr<uint8_t>();
  a.scale = reinterpret_cast<const uint16_t*>(l.scale.data_ptr<c10::Half>());
  a.offset = reinterpret_cast<const uint16_t*>(l.offset.data_ptr<c10::Half>());
  a.in = l.in;
  a.out = l.out;
  a.g = l.g;
  a.y = w.data_ptr<float>();
  if (l.kind == kGroup8 || l.kind == kGroup16) {
    a.group_index = l.group_index.data_ptr<int32_t>();
    a.kept = l.group_index.size(1);
  }
  const RowFn fn = tables().deq[tables().active][l.kind];
  at::parallel_for(0, l.out, std::max<int64_t>(1, 16384 / std::max<int64_t>(l.in, 1)),
                   [&](int64_t b, int64_t e) { fn(a, b, e); });
}

at::Tensor dequantize(const Linear& l) {
  auto w = at::empty({l.out, l.in}, c10::kFloat);
  dequantize_into(l, w);
  return w;
}

// dequantize() into a buffer of this thread reused from call to call, for layers up to 16 MiB of
// float32 (larger ones get a fresh tensor): a fresh allocation that size is fresh pages every
// call, whose first-touch faults cost about as much as the dequantisation itself. The result
// is valid until the thread's next call; run() uses it at once.
at::Tensor dequantize_reusing(const Linear& l) {
  constexpr int64_t kReuseFloats = int64_t{4} << 20;
  const int64_t n = l.out * l.in;
  if (n > kReuseFloats) return dequantize(l);
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < n) buffer = at::empty({n}, c10::kFloat);
  auto w = buffer.narrow(0, 0, n).view({l.out, l.in});
  dequantize_into(l, w);
  return w;
}

at::Tensor run(const Linear& l, const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == c10::kFloat, "x must be a 2-D float32 tensor");
  TORCH_CHECK(x_in.size(1) == l.in, "x has ", x_in.size(1), " columns, the weight ", l.in);
  const auto x = x_in.contiguous();
  const int64_t batch = x.size(0);
  if (batch > 4 * kMaxBatch && !l.int8_x) {  // prefill: the GEMM is cheap next to decoding the codes 4+ times
    auto w = l.kind == kFloat ? l.weight : dequantize_reusing(l);
    return l.bias.defined() ? at::addmm(l.bias, x, w.t()) : at::mm(x, w.t());
  }
  auto y = at::empty({batch, l.out}, x.options());
  std::vector<float> scratch(kMaxBatch * l.in);
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxBatch) {
    const int64_t n = std::min<int64_t>(kMaxBatch, batch - b0);
    linear_into(l, x.data_ptr<float>() + b0 * l.in, n, y.data_ptr<float>() + b0 * l.out, scratch.data());
  }
  return y;
}

int64_t kind_of(int64_t bits, int64_t sparse_group) {
  if (bits == 8) {
    TORCH_CHECK(sparse_group == 0, "group sparsity needs int4 codes");
    return kInt8;
  }
  TORCH_CHECK(bits == 4, "bits must be 4 or 8, got ", bits);
  if (sparse_group == 0) return kInt4;
  TORCH_CHECK(sparse_group == 8 || sparse_group == 16, "sparse group must be 8 or 16, got ", sparse_group);
  return sparse_group == 8 ? kGroup8 : kGroup16;
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                      const at::Tensor& offset, const c10::optional<at::Tensor>& group_index,
                      const c10::optional<at::Tensor>& bias, int64_t bits, int64_t g, int64_t sparse_group) {
  const Linear l = make_linear("qlinear", kind_of(bits, sparse_group), codes, scale, offset, group_index,
                               at::Tensor(), bias, g, sparse_group);
  return run(l, x);
}

// qlinear for dense int4 with the input rounded to int8 per block of 32 (see Linear::int8_x)
at::Tensor qlinear_x8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset,
                      const c10::optional<at::Tensor>& bias, int64_t g) {
  Linear l = make_linear("qlinear_x8", kInt4, codes, scale, offset, c10::nullopt, at::Tensor(), bias, g, 0);
  l.int8_x = true;
  return run(l, x);
}

at::Tensor qdequantize(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset,
                          const c10::optional<at::Tensor>& group_index, int64_t bits, int64_t g,
                          int64_t sparse_group) {
  return dequantize(make_linear("dequantize", kind_of(bits, sparse_group), codes, scale, offset, group_index,
                                at::Tensor(), c10::nullopt, g, sparse_group));
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return run(make_linear("linear_f32", kFloat, {}, {}, {}, c10::nullopt, weight, bias, 0, 0), x);
}

}  // namespace
}  // namespace sc

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &sc::qlinear, "y = x @ dequantize(W)^T + b for int8 / int4 / int4 group-sparse W");
  m.def("qlinear_x8", &sc::qlinear_x8, "qlinear for dense int4 W with x rounded to int8 per block of 32");
  m.def("dequantize", &sc::qdequantize, "float32 [out, in] from the quantised layout");
  m.def("linear_f32", &sc::linear_f32, "y = x @ W^T + b, float32 (the decode step's GEMV)");
  m.def("isa", &sc::isa, "instruction set the kernels use");
  m.def("detected_isa", &sc::detected_isa, "best instruction set cpuid reports");
  m.def("set_isa", &sc::set_isa, "use an instruction set (capped at the detected one); returns the one used");
  sc::register_decode(m);
}
