// A fused decode step for Llama-family decoders (pre-norm blocks: RMSNorm, rotary position
// embedding in the rotate-half convention, grouped-query attention, SwiGLU MLP), batch 1:
// one call per token runs every layer, the final norm and the head, with a static KV cache.
// Linear layers are float32 or quantised (quant_kernels.cpp). The Python side
// (runtime/decode.py) checks that a model has this structure before building one.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "quant_kernels.h"

namespace sc {

namespace {

struct Block {
  at::Tensor norm1, norm2;  // RMSNorm weights [hidden]
  std::vector<Linear> qkv;     // q, k, v (or one fused)
  Linear o;
  std::vector<Linear> gate_up;  // gate, up (or one fused)
  Linear down;
};

// Phases timed when profiling is on (seconds, summed over steps).
enum Phase { kEmbed, kNorm, kQkv, kRotary, kAttention, kO, kGateUp, kAct, kDown, kHead, kPhases };
const char* const kPhaseNames[] = {"embedding", "rmsnorm", "qkv_proj", "rotary+cache", "attention", "o_proj",
                                   "gate_up_proj", "silu_mul", "down_proj", "lm_head"};

class DecodeModel {
 public:
  DecodeModel(int64_t n_heads, int64_t n_kv, int64_t head_dim, double eps, double scaling, at::Tensor embed,
              at::Tensor final_norm, Linear head, at::Tensor cos, at::Tensor sin, at::Tensor k_cache,
              at::Tensor v_cache)
      : n_heads_(n_heads), n_kv_(n_kv), hd_(head_dim), eps_(static_cast<float>(eps)),
        scaling_(static_cast<float>(scaling)), embed_(embed), final_norm_(final_norm), head_(head), cos_(cos),
        sin_(sin), k_cache_(k_cache), v_cache_(v_cache) {
    TORCH_CHECK(n_kv > 0 && n_heads % n_kv == 0, "attention heads ", n_heads, " not a multiple of kv heads ", n_kv);
    TORCH_CHECK(embed.dim() == 2 && embed.scalar_type() == c10::kFloat && embed.is_contiguous(),
                "embedding must be a contiguous float32 [vocab, hidden]");
    hidden_ = embed.size(1);
    check_vec(final_norm, hidden_, "final norm");
    TORCH_CHECK(head.in == hidden_, "lm_head takes ", head.in, " inputs, hidden size is ", hidden_);
    TORCH_CHECK(cos.dim() == 2 && cos.size(1) == head_dim && cos.sizes() == sin.sizes() && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.scalar_type() == c10::kFloat && sin.scalar_type() == c10::kFloat,
                "cos / sin must be contiguous float32 [max_len, head_dim]");
    max_len_ = cos.size(0);
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(1) == n_kv && k_cache.size(2) == max_len_ &&
                    k_cache.size(3) == head_dim && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                    v_cache.is_contiguous() && k_cache.scalar_type() == c10::kFloat &&
                    v_cache.scalar_type() == c10::kFloat,
                "k / v cache must be contiguous float32 [layers, kv heads, max_len, head_dim]");
  }

  void add_block(at::Tensor norm1, std::vector<Linear> qkv, Linear o, at::Tensor norm2,
                 std::vector<Linear> gate_up, Linear down) {
    const auto what = "block " + std::to_string(blocks_.size());
    TORCH_CHECK(static_cast<int64_t>(blocks_.size()) < k_cache_.size(0), what, ": more blocks than cache layers");
    check_vec(norm1, hidden_, what + " input norm");
    check_vec(norm2, hidden_, what + " post-attention norm");
    TORCH_CHECK(out_sum(qkv) == (n_heads_ + 2 * n_kv_) * hd_, what, ": q, k, v give ", out_sum(qkv), " outputs, want ",
                (n_heads_ + 2 * n_kv_) * hd_);
    for (const auto& l : qkv) TORCH_CHECK(l.in == hidden_, what, ": q/k/v input width ", l.in);
    TORCH_CHECK(o.in == n_heads_ * hd_ && o.out == hidden_, what, ": o_proj shape");
    TORCH_CHECK(out_sum(gate_up) % 2 == 0, what, ": gate and up must have the same width");
    for (const auto& l : gate_up) TORCH_CHECK(l.in == hidden_, what, ": gate/up input width ", l.in);
    TORCH_CHECK(down.in == out_sum(gate_up) / 2 && down.out == hidden_, what, ": down_proj shape");
    inter_ = std::max(inter_, out_sum(gate_up) / 2);
    blocks_.push_back(Block{norm1, norm2, std::move(qkv), o, std::move(gate_up), down});
  }

  int64_t max_len() const { return max_len_; }

  // Logits [vocab] of the token after `token` at position `pos` (its K and V are cached there).
  at::Tensor step(int64_t token, int64_t pos) {
    TORCH_CHECK(!blocks_.empty() && static_cast<int64_t>(blocks_.size()) == k_cache_.size(0),
                "the decode model has ", blocks_.size(), " blocks, the cache ", k_cache_.size(0));
    TORCH_CHECK(token >= 0 && token < embed_.size(0), "token ", token, " outside the vocabulary of ", embed_.size(0));
    TORCH_CHECK(pos >= 0 && pos < max_len_, "position ", pos, " outside the static cache of ", max_len_,
                " positions");
    const int64_t H = hidden_, qd = n_heads_ * hd_, kvd = n_kv_ * hd_, T = pos + 1;
    std::vector<float> x(H), h(H), qkv(qd + 2 * kvd), att(qd), tmp(H), gu(2 * inter_), act(inter_);
    std::vector<float> scratch(std::max({H, inter_, qd}) * kMaxBatch);
    auto logits = at::empty({head_.out}, c10::kFloat);
    const float* cs = cos_.data_ptr<float>() + pos * hd_;
    const float* sn = sin_.data_ptr<float>() + pos * hd_;
    float* kc = k_cache_.data_ptr<float>();
    float* vc = v_cache_.data_ptr<float>();
    const int64_t layer_stride = n_kv_ * max_len_ * hd_;
    const AttendFn attend = attend_fn();
    const SiluFn silu_mul = silu_fn();

    auto t0 = clock();
    std::copy_n(embed_.data_ptr<float>() + token * H, H, x.data());
    mark(kEmbed, t0);
    for (size_t l = 0; l < blocks_.size(); ++l) {
      const Block& b = blocks_[l];
      rmsnorm(x.data(), b.norm1.data_ptr<float>(), h.data());
      mark(kNorm, t0);
      run_all(b.qkv, h.data(), qkv.data(), scratch.data());
      mark(kQkv, t0);
      float* q = qkv.data();
      float* k = q + qd;
      float* v = k + kvd;
      for (int64_t hh = 0; hh < n_heads_; ++hh) rotate(q + hh * hd_, cs, sn);
      for (int64_t hh = 0; hh < n_kv_; ++hh) {
        rotate(k + hh * hd_, cs, sn);
        std::copy_n(k + hh * hd_, hd_, kc + l * layer_stride + (hh * max_len_ + pos) * hd_);
        std::copy_n(v + hh * hd_, hd_, vc + l * layer_stride + (hh * max_len_ + pos) * hd_);
      }
      mark(kRotary, t0);
      const int64_t group = n_heads_ / n_kv_;
      at::parallel_for(0, n_heads_, 1, [&](int64_t b0, int64_t e0) {
        std::vector<float> scores(T);
        for (int64_t hh = b0; hh < e0; ++hh) {
          const int64_t kvh = hh / group;
          const float* K = kc + l * layer_stride + kvh * max_len_ * hd_;
          const float* V = vc + l * layer_stride + kvh * max_len_ * hd_;
          attend(q + hh * hd_, K, V, T, hd_, scaling_, scores.data(), att.data() + hh * hd_);
        }
      });
      mark(kAttention, t0);
      linear_into(b.o, att.data(), 1, tmp.data(), scratch.data());
      for (int64_t i = 0; i < H; ++i) x[i] += tmp[i];
      mark(kO, t0);
      rmsnorm(x.data(), b.norm2.data_ptr<float>(), h.data());
      mark(kNorm, t0);
      run_all(b.gate_up, h.data(), gu.data(), scratch.data());
      mark(kGateUp, t0);
      const int64_t I = b.down.in;
      silu_mul(gu.data(), gu.data() + I, I, act.data());
      mark(kAct, t0);
      linear_into(b.down, act.data(), 1, tmp.data(), scratch.data());
      for (int64_t i = 0; i < H; ++i) x[i] += tmp[i];
      mark(kDown, t0);
    }
    rmsnorm(x.data(), final_norm_.data_ptr<float>(), h.data());
    mark(kNorm, t0);
    linear_into(head_, h.data(), 1, logits.data_ptr<float>(), scratch.data());
    mark(kHead, t0);
    return logits;
  }

  void set_profiling(bool on) {
    profiling_ = on;
    std::fill(std::begin(seconds_), std::end(seconds_), 0.0);
  }

  std::map<std::string, double> profile() const {
    std::map<std::string, double> out;
    for (int p = 0; p < kPhases; ++p) out[kPhaseNames[p]] = seconds_[p];
    return out;
  }

 private:
  using Clock = std::chrono::steady_clock;

  Clock::time_point clock() const { return profiling_ ? Clock::now() : Clock::time_point(); }

  void mark(Phase p, Clock::time_point& t) {
    if (!profiling_) return;
    const auto now = Clock::now();
    seconds_[p] += std::chrono::duration<double>(now - t).count();
    t = now;
  }

  static void check_vec(const at::Tensor& t, int64_t n, const std::string& what) {
    TORCH_CHECK(t.dim() == 1 && t.numel() == n && t.scalar_type() == c10::kFloat && t.is_contiguous(), what,
                " must be a contiguous float32 [", n, "]");
  }

  static int64_t out_sum(const std::vector<Linear>& ls) {
    int64_t s = 0;
    for (const auto& l : ls) s += l.out;
    return s;
  }

  static void run_all(const std::vector<Linear>& ls, const float* x, float* y, float* scratch) {
    for (const auto& l : ls) {
      linear_into(l, x, 1, y, scratch);
      y += l.out;
    }
  }

  // y = w * x / sqrt(mean(x^2) + eps), as LlamaRMSNorm in float32
  void rmsnorm(const float* x, const float* w, float* y) const {
    float ss = 0.f;
    for (int64_t i = 0; i < hidden_; ++i) ss += x[i] * x[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(hidden_) + eps_);
    for (int64_t i = 0; i < hidden_; ++i) y[i] = w[i] * (x[i] * r);
  }

  // rotate-half rotary embedding of one head in place: v * cos + rotate_half(v) * sin
  void rotate(float* v, const float* cs, const float* sn) const {
    const int64_t half = hd_ / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cs[i] - b * sn[i];
      v[i + half] = b * cs[i + half] + a * sn[i + half];
    }
  }

  int64_t n_heads_, n_kv_, hd_;
  float eps_, scaling_;
  at::Tensor embed_, final_norm_;
  Linear head_;
  at::Tensor cos_, sin_, k_cache_, v_cache_;
  int64_t hidden_ = 0, inter_ = 0, max_len_ = 0;
  std::vector<Block> blocks_;
  bool profiling_ = false;
  double seconds_[kPhases] = {};
};

}  // namespace

void register_decode(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Linear>(m, "Linear")
      .def_readonly("kind", &Linear::kind)
      .def_readonly("in_features", &Linear::in)
      .def_readonly("out_features", &Linear::out);
  using OptT = c10::optional<at::Tensor>;
  m.def(
      "make_linear",
      [](const std::string& what, int64_t kind, const OptT& codes, const OptT& scale, const OptT& offset,
         const OptT& group_index, const OptT& weight, const OptT& bias, int64_t g, int64_t sparse_group,
         bool int8_activations) {
        const at::Tensor none;
        Linear l = make_linear(what, kind, codes.value_or(none), scale.value_or(none), offset.value_or(none),
                               group_index, weight.value_or(none), bias, g, sparse_group);
        TORCH_CHECK(!int8_activations || l.kind == kInt4, what, ": int8 activations need dense int4 codes");
        l.int8_x = int8_activations;
        return l;
      },
      "a Linear for the decode step (kind: 0 int8, 1 int4, 2 group:8, 3 group:16, 4 float32; unused tensors None)",
        py::arg("what"), py::arg("kind"), py::arg("codes"), py::arg("scale"), py::arg("offset"),
        py::arg("group_index"), py::arg("weight"), py::arg("bias"), py::arg("group_size"), py::arg("sparse_group"),
        py::arg("int8_activations") = false);
  py::class_<DecodeModel>(m, "DecodeModel")
      .def(py::init<int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor, Linear, at::Tensor,
                    at::Tensor, at::Tensor, at::Tensor>())
      .def("add_block", &DecodeModel::add_block)
      .def("step", &DecodeModel::step, py::call_guard<py::gil_scoped_release>())
      .def("max_len", &DecodeModel::max_len)
      .def("set_profiling", &DecodeModel::set_profiling)
      .def("profile", &DecodeModel::profile);
}

}  // namespace sc
