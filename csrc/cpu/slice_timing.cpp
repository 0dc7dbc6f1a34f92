// CPU kernels of ziplm::time_attention(_decode) and ziplm::time_ffn: wall-clock latency of one
// attention / FFN block (csrc/slice_timing_block.h) per repetition, steady_clock around each.
// The *_with_output ops run the same kernels and also return the output of the last timed
// repetition, so that tests can check the maths of the timed code itself.
#include <torch/library.h>

#include <chrono>
#include <optional>
#include <tuple>
#include <utility>

#include "../slice_timing_block.h"

namespace ziplm {
namespace {

using TimesAndOutput = std::tuple<at::Tensor, at::Tensor>;

// Runs `block` warmup times untimed, then reps times timed. Returns (float64 seconds per rep on
// the CPU, output of the last timed rep or zeros like x for a removed block).
template <class Block>
TimesAndOutput time_reps_cpu(const at::Tensor& x, int64_t warmup, int64_t reps, const Block& block) {
  // The times are a normal tensor; the output is made in inference mode (read it freely; clone it
  // before updating it in place outside inference mode).
  at::Tensor out = at::empty({reps}, at::TensorOptions().dtype(at::kDouble).device(at::kCPU));
  double* times = out.data_ptr<double>();
  c10::InferenceMode no_autograd;
  for (int64_t i = 0; i < warmup; ++i) block();
  at::Tensor last;
  for (int64_t i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    at::Tensor y = block();
    const auto t1 = std::chrono::steady_clock::now();
    times[i] = std::chrono::duration<double>(t1 - t0).count();
    // Kept once the clock has stopped; the other reps' outputs are freed, untimed, at the end of
    // their iteration.
    if (i == reps - 1) last = std::move(y);
  }
  return {out, slice_timing::output_or_zeros(last, x)};
}

void check_cpu(const at::Tensor& x) {
  ZIPLM_CHECK(x.device().is_cpu(), "the CPU kernel got x on ", x.device(), "; move all tensors to one device");
}

TimesAndOutput time_attention_with_output_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                                              const at::Tensor& wv, const at::Tensor& wo, int64_t head_dim,
                                              bool causal, int64_t warmup, int64_t reps) {
  check_cpu(x);
  const auto s = slice_timing::check_attention(x, wq, wk, wv, wo, head_dim, warmup, reps);
  return time_reps_cpu(x, warmup, reps,
                       [&] { return slice_timing::attention_block(x, wq, wk, wv, wo, s, causal); });
}

TimesAndOutput time_attention_decode_with_output_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                                                     const at::Tensor& wv, const at::Tensor& wo,
                                                     const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                     int64_t head_dim, int64_t warmup, int64_t reps) {
  check_cpu(x);
  const auto s = slice_timing::check_attention_decode(x, wq, wk, wv, wo, k_cache, v_cache, head_dim, warmup, reps);
  return time_reps_cpu(x, warmup, reps,
                       [&] { return slice_timing::attention_decode_block(x, wq, wk, wv, wo, k_cache, v_cache, s); });
}

TimesAndOutput time_ffn_with_output_cpu(const at::Tensor& x, const at::Tensor& w_up,
                                        const std::optional<at::Tensor>& w_gate, const at::Tensor& w_down,
                                        int64_t warmup, int64_t reps) {
  check_cpu(x);
  slice_timing::check_ffn(x, w_up, w_gate, w_down, warmup, reps);
  return time_reps_cpu(x, warmup, reps, [&] { return slice_timing::ffn_block(x, w_up, w_gate, w_down); });
}

// The timing-only ops: the same kernels, output dropped.
at::Tensor time_attention_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                              const at::Tensor& wo, int64_t head_dim, bool causal, int64_t warmup, int64_t reps) {
  return std::get<0>(time_attention_with_output_cpu(x, wq, wk, wv, wo, head_dim, causal, warmup, reps));
}

at::Tensor time_attention_decode_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                                     const at::Tensor& wv, const at::Tensor& wo, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, int64_t head_dim, int64_t warmup, int64_t reps) {
  return std::get<0>(
      time_attention_decode_with_output_cpu(x, wq, wk, wv, wo, k_cache, v_cache, head_dim, warmup, reps));
}

at::Tensor time_ffn_cpu(const at::Tensor& x, const at::Tensor& w_up, const std::optional<at::Tensor>& w_gate,
                        const at::Tensor& w_down, int64_t warmup, int64_t reps) {
  return std::get<0>(time_ffn_with_output_cpu(x, w_up, w_gate, w_down, warmup, reps));
}

}  // namespace
}  // namespace ziplm

TORCH_LIBRARY_IMPL(ziplm, CPU, m) {
  m.impl("time_attention", &ziplm::time_attention_cpu);
  m.impl("time_attention_decode", &ziplm::time_attention_decode_cpu);
  m.impl("time_ffn", &ziplm::time_ffn_cpu);
  m.impl("time_attention_with_output", &ziplm::time_attention_with_output_cpu);
  m.impl("time_attention_decode_with_output", &ziplm::time_attention_decode_with_output_cpu);
  m.impl("time_ffn_with_output", &ziplm::time_ffn_with_output_cpu);
}

// The timings are not differentiable: skip autograd (for every backend) so that inputs that
// require grad give plain results rather than ones with a not-implemented grad_fn.
// Registered once here because this file is built in every configuration.
TORCH_LIBRARY_IMPL(ziplm, Autograd, m) {
  m.impl("time_attention", torch::CppFunction::makeFallthrough());
  m.impl("time_attention_decode", torch::CppFunction::makeFallthrough());
  m.impl("time_ffn", torch::CppFunction::makeFallthrough());
  m.impl("time_attention_with_output", torch::CppFunction::makeFallthrough());
  m.impl("time_attention_decode_with_output", torch::CppFunction::makeFallthrough());
  m.impl("time_ffn_with_output", torch::CppFunction::makeFallthrough());
}
