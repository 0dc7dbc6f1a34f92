// The one file that owns the op schemas of the `ziplm` torch library.
// Each backend registers its kernels in csrc/cpu/*.cpp or csrc/cuda/*.cu,
// so a call dispatches on the device of its tensor arguments.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(ziplm, m) {
  // H += X^T X over the rows of X whose mask is true; returns the number of rows added.
  m.def("hessian_accumulate(Tensor(a!) H, Tensor X, Tensor? mask) -> int");
  // Cholesky-based damped inverse of one (c,c) or a batch (B,g,g) of SPD matrices.
  // Returns (Hinv, damp_used[B], dead[B,g]).
  m.def("damped_inverse(Tensor H, float damp, int max_tries) -> (Tensor, Tensor, Tensor)");
  // Greedy structured OBS over groups of `group_size` consecutive columns.
  // Returns (order[S], losses[S], U[rows, S*g], R[S*g, cols], W0[rows, cols], damp_used[]).
  m.def("greedy_obs(Tensor W, Tensor H, int group_size, float damp, int block_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same op computed by the device-generic ATen loop: the CUDA fallback for groups too large for
  // shared memory, and the reference the CPU and CUDA kernels are tested against.
  m.def("greedy_obs_generic(Tensor W, Tensor H, int group_size, float damp, int block_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Latency of one attention block (x: (B,T,d); weights in nn.Linear layout) over `reps` runs (seconds, float64, CPU).
  m.def("time_attention(Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor wo, int head_dim, bool causal, int warmup, int reps) -> Tensor");
  // Latency of one decode step of an attention block: x (B,1,d) attends to a KV cache (B,nkv,L,head_dim).
  m.def("time_attention_decode(Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor wo, Tensor k_cache, Tensor v_cache, int head_dim, int warmup, int reps) -> Tensor");
  // Latency of one FFN block: gated (w_gate given) SiLU, else GELU; returns per-rep seconds.
  m.def("time_ffn(Tensor x, Tensor w_up, Tensor? w_gate, Tensor w_down, int warmup, int reps) -> Tensor");
  // The same three timing kernels, also returning the block output of the last timed repetition
  // ((B,T,d) on x's device; zeros for a removed block): (times, output). For checking the maths of
  // the timed code against the pure-PyTorch blocks of ziplm_ext/timing.py.
  m.def("time_attention_with_output(Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor wo, int head_dim, bool causal, int warmup, int reps) -> (Tensor, Tensor)");
  m.def("time_attention_decode_with_output(Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor wo, Tensor k_cache, Tensor v_cache, int head_dim, int warmup, int reps) -> (Tensor, Tensor)");
  m.def("time_ffn_with_output(Tensor x, Tensor w_up, Tensor? w_gate, Tensor w_down, int warmup, int reps) -> (Tensor, Tensor)");
}

static bool cuda_built() {
#ifdef ZIPLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ziplm_ext native ops (registered as torch.ops.ziplm.*)";
  m.def("cuda_built", &cuda_built, "True when the CUDA kernels were compiled into this build");
}
