// Shared declarations of the quantised kernels (quant_kernels.cpp) and the decode step
// (decode_step.cpp). The weight layout is notes/quant_layout.md of the repository.
#pragma once

// Light headers on purpose (not torch/extension.h): the library builds in a fraction of the time.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <string>

namespace sc {

// fp16 bits -> float (IEEE half; subnormals, infinities and NaN kept).
inline float h2f(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    const float f = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24
    return sign ? -f : f;
  }
  if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// Everything a row-range loop reads and writes. Pointers that a kind does not use are null.
struct QArgs {
  const uint8_t* codes = nullptr;        // int8 codes / packed int4 / packed kept groups
  const uint16_t* scale = nullptr;       // fp16 [out, in / g]
  const uint16_t* offset = nullptr;      // fp16 [out, in / g]
  const int32_t* group_index = nullptr;  // [out, kept]
  const float* weight = nullptr;         // float32 [out, in] (kind kFloat)
  const float* x = nullptr;              // [B, in], permuted for int4 (see quant_body.h)
  const int8_t* xq = nullptr;            // int8 activations: [B, in] codes, permuted in blocks of 32
  const float* xscale = nullptr;         // int8 activations: [B, in / 32] scales
  const float* xsum = nullptr;           // [B, in / g] (dense int4 / int8)
  const float* bias = nullptr;           // [out] or null
  float* y = nullptr;                    // [B, out]
  int64_t in = 0, out = 0, g = 0, kept = 0;
  int per_q_shift = -1;
};

constexpr int kKinds = 5;
constexpr int kMaxBatch = 8;
enum Kind { kInt8 = 0, kInt4 = 1, kGroup8 = 2, kGroup16 = 3, kFloat = 4 };

using RowFn = void (*)(const QArgs&, int64_t, int64_t);
// the decode step's per-ISA loops (quant_body.h): one head's attention, SiLU(gate) * up
using AttendFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, float, float*, float*);
using SiluFn = void (*)(const float*, const float*, int64_t, float*);
AttendFn attend_fn();
SiluFn silu_fn();

// One quantised or float Linear, as the decode step holds it. `int8_x` (dense int4 only):
// the input is rounded to int8 per block of 32 values (scale max|x| / 127, llama.cpp's Q8_0
// rule) and the codes multiply it in integers; the offsets still see the float input.
struct Linear {
  int kind = kFloat;
  at::Tensor codes, scale, offset, group_index, weight, bias;
  int64_t in = 0, out = 0, g = 0, sparse_group = 0;
  bool int8_x = false;
};

// y[B, out] = x[B, in] @ W^T + b for B <= kMaxBatch, x contiguous float32; threads from
// at::parallel_for. `scratch` must hold at least B * in floats.
void linear_into(const Linear& l, const float* x, int64_t batch, float* y, float* scratch);

// Build a Linear from tensors (checks shapes and dtypes; errors name `what`).
Linear make_linear(const std::string& what, int64_t kind, const at::Tensor& codes, const at::Tensor& scale,
                   const at::Tensor& offset, const c10::optional<at::Tensor>& group_index,
                   const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t g,
                   int64_t sparse_group);

void register_decode(pybind11::module& m);

}  // namespace sc
