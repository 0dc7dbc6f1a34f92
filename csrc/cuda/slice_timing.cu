// CUDA kernels of ziplm::time_attention(_decode) and ziplm::time_ffn: GPU latency of one attention / FFN
// block (csrc/slice_timing_block.h) per repetition. The *_with_output ops run the same code and
// also return the output of the last timed repetition (on x's device), so that tests can check the
// maths of the timed code itself.
//
// This is host code: the blocks are cuBLAS GEMMs, SDPA and elementwise ATen kernels. After the
// warm-up runs the block is captured once into a CUDA graph on a side stream, and each timed
// repetition is one graph replay between a CUDA event pair, so the figures are the block's GPU
// time without per-kernel launch gaps (as a deployed, graph-captured model runs it). Blocks that
// cannot be captured (an op that needs the host mid-block, or a capture error from the driver)
// are timed eagerly, one event pair around each run; a removed block runs nothing. ZipLM (Kurtic
// et al. 2023) builds its latency table from exactly these block timings.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <exception>
#include <memory>
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

// Captures one run of `block` into `graph` on the current (side) stream; its output tensor lives
// in the graph's memory pool and holds the result of the latest replay. Returns false (capture
// abandoned, nothing left capturing) when the block cannot be captured.
template <class Block>
bool capture_block(at::cuda::CUDAGraph& graph, const Block& block, at::Tensor& y) {
  try {
    graph.capture_begin();
  } catch (const std::exception&) {
    (void)cudaGetLastError();
    return false;
  }
  try {
    y = block();
    graph.capture_end();
  } catch (const std::exception&) {
    y = at::Tensor();
    try {
      graph.capture_end();  // ends the (invalidated) capture and its allocation pool
    } catch (const std::exception&) {
    }
    (void)cudaGetLastError();
    return false;
  }
  return y.defined();
}

// Runs `block` warmup times untimed, captures it into a CUDA graph when it allows, then times reps
// runs (graph replays, else eager runs) between event pairs. Everything runs on a side stream
// ordered after the caller's stream (graph capture cannot use the legacy default stream), and the
// caller's stream waits for it at the end. Returns (float64 seconds per rep on the CPU, output of
// the last timed rep or zeros like x for a removed block).
template <class Block>
TimesAndOutput time_reps_cuda(const at::Tensor& x, int64_t warmup, int64_t reps, bool removed, const Block& block) {
  c10::InferenceMode no_autograd;
  c10::cuda::CUDAGuard device_guard(x.device());
  const auto dev = x.device().index();
  c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(dev);
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, dev);
  EventPairs ev(reps);
  C10_CUDA_CHECK(cudaEventRecord(ev.start[0], caller.stream()));  // the side stream starts after the caller's work
  C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), ev.start[0], 0));
  at::Tensor last;
  {
    c10::cuda::CUDAStreamGuard stream_guard(side);
    for (int64_t i = 0; i < warmup; ++i) block();
    // Lazy initialisation (cuBLAS handle and workspace for this stream) must not happen inside a
    // capture: without warm-up runs, one untimed run first.
    if (warmup == 0 && !removed) block();
    at::cuda::CUDAGraph graph;
    at::Tensor y;
    const bool captured = !removed && capture_block(graph, block, y);
    for (int64_t i = 0; i < reps; ++i) {
      C10_CUDA_CHECK(cudaEventRecord(ev.start[i], side.stream()));
      if (captured) {
        graph.replay();
      } else {
        y = block();
      }
      C10_CUDA_CHECK(cudaEventRecord(ev.stop[i], side.stream()));
    }
    // Out of the graph pool (or the side stream's allocations), ordered on the side stream.
    if (y.defined()) last = y.clone();
  }
  // The caller's stream continues after all of the side stream's work, the clone included.
  cudaEvent_t done = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  const std::unique_ptr<CUevent_st, decltype(&cudaEventDestroy)> done_guard(done, &cudaEventDestroy);
  C10_CUDA_CHECK(cudaEventRecord(done, side.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(caller.stream(), done, 0));
  if (last.defined()) c10::cuda::CUDACachingAllocator::recordStream(last.storage().data_ptr(), caller);
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
  return time_reps_cuda(x, warmup, reps, s.nq == 0,
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
      x, warmup, reps, s.nq == 0, [&] { return slice_timing::attention_decode_block(x, wq, wk, wv, wo, k_cache, v_cache, s); });
}

TimesAndOutput time_ffn_with_output_cuda(const at::Tensor& x, const at::Tensor& w_up,
                                         const std::optional<at::Tensor>& w_gate, const at::Tensor& w_down,
                                         int64_t warmup, int64_t reps) {
  check_cuda(x);
  const int64_t m = slice_timing::check_ffn(x, w_up, w_gate, w_down, warmup, reps);
  return time_reps_cuda(x, warmup, reps, m == 0, [&] { return slice_timing::ffn_block(x, w_up, w_gate, w_down); });
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
