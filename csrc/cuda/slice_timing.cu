// CUDA kernels of ziplm::time_attention(_decode) and ziplm::time_ffn: GPU latency of one attention / FFN
// block (csrc/slice_timing_block.h) per repetition, measured with one CUDA event pair per
// repetition on the current stream of x's device. The *_with_output ops run the same kernels and
// also return the output of the last timed repetition (on x's device), so that tests can check the
// maths of the timed code itself.
//
// c10/cuda/CUDAStream.h gives the current stream (what at::cuda::getCurrentCUDAStream returns)
// without ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE/cuSOLVER headers that a
// minimal CUDA toolkit does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../slice_timing_block.h"

namespace ziplm {
namespace {

// Owns 2*reps timing events; destroyed even when a block throws.
struct EventPairs {
  std::vector<cudaEvent_t> start, stop;
  explicit EventPairs(int64_t reps) {
    start.reserve(reps);
    stop.reserve(reps);
    for (int64_t i = 0; i < reps; ++i) {
      cudaEvent_t a = nullptr, b = nullptr;
      C10_CUDA_CHECK(cudaEventCreate(&a));
      start.push_back(a);
      C10_CUDA_CHECK(cudaEventCreate(&b));
      stop.push_back(b);
    }
  }
  ~EventPairs() {
    for (auto e : start) cudaEventDestroy(e);
    for (auto e : stop) cudaEventDestroy(e);
  }
  EventPairs(const EventPairs&) = delete;
  EventPairs& operator=(const EventPairs&) = delete;
};

using TimesAndOutput = std::tuple<at::Tensor, at::Tensor>;

// Runs `block` warmup times untimed, then reps times between event pairs. Returns (float64
// seconds per rep on the CPU, output of the last timed rep or zeros like x for a removed block).
template <class Block>
TimesAndOutput time_reps_cuda(const at::Tensor& x, int64_t warmup, int64_t reps, const Block& block) {
  c10::InferenceMode no_autograd;
  c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  for (int64_t i = 0; i < warmup; ++i) block();
  EventPairs ev(reps);
  at::Tensor last;
  for (int64_t i = 0; i < reps; ++i) {
    C10_CUDA_CHECK(cudaEventRecord(ev.start[i], stream));
    at::Tensor y = block();
    C10_CUDA_CHECK(cudaEventRecord(ev.stop[i], stream));
    // Kept once the stop event is recorded; the other reps' outputs go back to the caching
    // allocator at the end of their iteration.
    if (i == reps - 1) last = std::move(y);
  }
  C10_CUDA_CHECK(cudaEventSynchronize(ev.stop[reps - 1]));
  at::Tensor out = at::empty({reps}, at::TensorOptions().dtype(at::kDouble).device(at::kCPU));
  double* times = out.data_ptr<double>();
  for (int64_t i = 0; i < reps; ++i) {
    float ms = 0.f;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, ev.start[i], ev.stop[i]));
    times[i] = static_cast<double>(ms) * 1e-3;
  }
  return {out, slice_timing::output_or_zeros(last, x)};
}

void check_cuda(const at::Tensor& x) {
  ZIPLM_CHECK(x.device().is_cuda(), "the CUDA kernel got x on ", x.device(), "; move all tensors to one device");
}

TimesAndOutput time_attention_with_output_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                                               const at::Tensor& wv, const at::Tensor& wo, int64_t head_dim,
                                               bool causal, int64_t warmup, int64_t reps) {
  check_cuda(x);
  const auto s = slice_timing::check_attention(x, wq, wk, wv, wo, head_dim, warmup, reps);
  return time_reps_cuda(x, warmup, reps,
                        [&] { return slice_timing::attention_block(x, wq, wk, wv, wo, s, causal); });
}

TimesAndOutput time_attention_decode_with_output_cuda(const at::Tensor& x, const at::Tensor& wq,
                                                      const at::Tensor& wk, const at::Tensor& wv,
                                                      const at::Tensor& wo, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, int64_t head_dim, int64_t warmup,
                                                      int64_t reps) {
  check_cuda(x);
  const auto s = slice_timing::check_attention_decode(x, wq, wk, wv, wo, k_cache, v_cache, head_dim, warmup, reps);
  return time_reps_cuda(
      x, warmup, reps, [&] { return slice_timing::attention_decode_block(x, wq, wk, wv, wo, k_cache, v_cache, s); });
}

TimesAndOutput time_ffn_with_output_cuda(const at::Tensor& x, const at::Tensor& w_up,
                                         const std::optional<at::Tensor>& w_gate, const at::Tensor& w_down,
                                         int64_t warmup, int64_t reps) {
  check_cuda(x);
  slice_timing::check_ffn(x, w_up, w_gate, w_down, warmup, reps);
  return time_reps_cuda(x, warmup, reps, [&] { return slice_timing::ffn_block(x, w_up, w_gate, w_down); });
}

// The timing-only ops: the same kernels, output dropped.
at::Tensor time_attention_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                               const at::Tensor& wo, int64_t head_dim, bool causal, int64_t warmup, int64_t reps) {
  return std::get<0>(time_attention_with_output_cuda(x, wq, wk, wv, wo, head_dim, causal, warmup, reps));
}

at::Tensor time_attention_decode_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                                      const at::Tensor& wv, const at::Tensor& wo, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, int64_t head_dim, int64_t warmup, int64_t reps) {
  return std::get<0>(
      time_attention_decode_with_output_cuda(x, wq, wk, wv, wo, k_cache, v_cache, head_dim, warmup, reps));
}

at::Tensor time_ffn_cuda(const at::Tensor& x, const at::Tensor& w_up, const std::optional<at::Tensor>& w_gate,
                         const at::Tensor& w_down, int64_t warmup, int64_t reps) {
  return std::get<0>(time_ffn_with_output_cuda(x, w_up, w_gate, w_down, warmup, reps));
}

}  // namespace
}  // namespace ziplm

TORCH_LIBRARY_IMPL(ziplm, CUDA, m) {
  m.impl("time_attention", &ziplm::time_attention_cuda);
  m.impl("time_attention_decode", &ziplm::time_attention_decode_cuda);
  m.impl("time_ffn", &ziplm::time_ffn_cuda);
  m.impl("time_attention_with_output", &ziplm::time_attention_with_output_cuda);
  m.impl("time_attention_decode_with_output", &ziplm::time_attention_decode_with_output_cuda);
  m.impl("time_ffn_with_output", &ziplm::time_ffn_with_output_cuda);
}
