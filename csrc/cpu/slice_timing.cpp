// CPU kernels of ziplm::time_attention and ziplm::time_ffn: wall-clock latency of one
// attention / FFN block (csrc/slice_timing_block.h) per repetition, steady_clock around each.
#include <torch/library.h>

#include <chrono>
#include <optional>

#include "../slice_timing_block.h"

namespace ziplm {
namespace {

// Runs `block` warmup times untimed, then reps times timed; returns float64 seconds per rep.
template <class Block>
at::Tensor time_reps_cpu(int64_t warmup, int64_t reps, const Block& block) {
  c10::InferenceMode no_autograd;
  for (int64_t i = 0; i < warmup; ++i) block();
  at::Tensor out = at::empty({reps}, at::TensorOptions().dtype(at::kDouble).device(at::kCPU));
  double* times = out.data_ptr<double>();
  for (int64_t i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    at::Tensor y = block();
    const auto t1 = std::chrono::steady_clock::now();
    times[i] = std::chrono::duration<double>(t1 - t0).count();
  }
  return out;
}

void check_cpu(const at::Tensor& x) {
  ZIPLM_CHECK(x.device().is_cpu(), "the CPU kernel got x on ", x.device(), "; move all tensors to one device");
}

at::Tensor time_attention_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                              const at::Tensor& wo, int64_t head_dim, bool causal, int64_t warmup, int64_t reps) {
  check_cpu(x);
  const auto s = slice_timing::check_attention(x, wq, wk, wv, wo, head_dim, warmup, reps);
  return time_reps_cpu(warmup, reps, [&] { return slice_timing::attention_block(x, wq, wk, wv, wo, s, causal); });
}

at::Tensor time_attention_decode_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                                     const at::Tensor& wv, const at::Tensor& wo, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, int64_t head_dim, int64_t warmup, int64_t reps) {
  check_cpu(x);
  const auto s = slice_timing::check_attention_decode(x, wq, wk, wv, wo, k_cache, v_cache, head_dim, warmup, reps);
  return time_reps_cpu(warmup, reps,
                       [&] { return slice_timing::attention_decode_block(x, wq, wk, wv, wo, k_cache, v_cache, s); });
}

at::Tensor time_ffn_cpu(const at::Tensor& x, const at::Tensor& w_up, const std::optional<at::Tensor>& w_gate,
                        const at::Tensor& w_down, int64_t warmup, int64_t reps) {
  check_cpu(x);
  slice_timing::check_ffn(x, w_up, w_gate, w_down, warmup, reps);
  return time_reps_cpu(warmup, reps, [&] { return slice_timing::ffn_block(x, w_up, w_gate, w_down); });
}

}  // namespace
}  // namespace ziplm

TORCH_LIBRARY_IMPL(ziplm, CPU, m) {
  m.impl("time_attention", &ziplm::time_attention_cpu);
  m.impl("time_attention_decode", &ziplm::time_attention_decode_cpu);
  m.impl("time_ffn", &ziplm::time_ffn_cpu);
}

// The timings are not differentiable: skip autograd (for every backend) so that inputs that
// require grad give a plain float64 result rather than one with a not-implemented grad_fn.
// Registered once here because this file is built in every configuration.
TORCH_LIBRARY_IMPL(ziplm, Autograd, m) {
  m.impl("time_attention", torch::CppFunction::makeFallthrough());
  m.impl("time_attention_decode", torch::CppFunction::makeFallthrough());
  m.impl("time_ffn", torch::CppFunction::makeFallthrough());
}
