// The transformer blocks timed by ziplm::time_attention / ziplm::time_ffn, written with
// device-generic ATen ops so the CPU (csrc/cpu/slice_timing.cpp) and CUDA
// (csrc/cuda/slice_timing.cu) kernels run exactly the same maths and differ only in the clock.
//
// Weights are in nn.Linear layout (out_features, in_features); no biases.
//   attention: x (B,T,d); wq (nq*hd, d); wk, wv (nkv*hd, d); wo (d, nq*hd)
//              q,k,v = x wq^T, x wk^T, x wv^T -> heads (B,h,T,hd); k,v repeated nq/nkv times per
//              kv head (grouped-query attention, head i reads kv head i / (nq/nkv), as in HF
//              repeat_kv); o = SDPA(q,k,v, causal); merge heads; out = o wo^T.
//              nq == 0 means the block is removed: nothing runs.
//   attention decode (one new token per sequence attending to a KV cache, as in generation):
//              x (B,1,d); k_cache, v_cache (B,nkv,L,hd) hold the keys/values of L earlier tokens.
//              q,k,v of the new token; k,v appended to the cache (a concatenation, which is what a
//              growing HF DynamicCache costs per step); k,v repeated per group; o = SDPA(q, k_all,
//              v_all) without a mask (the new token sees every cached token); out = o wo^T.
//   ffn:       x (B,T,d); w_up (m, d); w_gate (m, d) or none; w_down (d, m)
//              gated:   out = silu(x w_gate^T) * (x w_up^T) w_down^T   (LLaMA)
//              ungated: out = gelu(x w_up^T) w_down^T                  (BERT; exact erf GELU)
//              m == 0 means the block is removed: nothing runs.
// ziplm_ext/timing.py holds the same maths in plain PyTorch (attention_block_reference,
// attention_decode_block_reference, ffn_block_reference); keep the two in step. The timing kernels
// keep the output of their last timed repetition, and the *_with_output ops return it next to the
// timings, so tests check the maths of exactly the code that is timed (ZipLM picks per-layer
// sparsities from these measured block latencies: a timed block that computed something else, or
// nothing, would bias the whole latency table).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace ziplm {
namespace slice_timing {

inline void check_float_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  ZIPLM_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
              t.scalar_type());
  ZIPLM_CHECK(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type(), " (all tensors must share x's dtype)");
  ZIPLM_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device(),
              " (all tensors must be on x's device)");
}

inline void check_reps(int64_t warmup, int64_t reps) {
  ZIPLM_CHECK(reps >= 1, "reps must be >= 1, got ", reps);
  ZIPLM_CHECK(warmup >= 0, "warmup must be >= 0, got ", warmup);
}

inline void check_x(const at::Tensor& x) {
  ZIPLM_CHECK(x.defined(), "x is undefined");
  ZIPLM_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ", x.scalar_type());
  ZIPLM_CHECK_DIM(x, 3, "x (B, T, d)");
  ZIPLM_CHECK(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0, "x (B, T, d) must have B, T, d > 0, got shape ",
              x.sizes());
}

struct AttentionShape {
  int64_t nq;
  int64_t nkv;
  int64_t head_dim;
};

// Validates the arguments of time_attention; returns the head counts.
inline AttentionShape check_attention(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                                      const at::Tensor& wv, const at::Tensor& wo, int64_t head_dim,
                                      int64_t warmup, int64_t reps) {
  check_x(x);
  check_reps(warmup, reps);
  ZIPLM_CHECK(head_dim > 0, "head_dim must be > 0, got ", head_dim);
  const int64_t d = x.size(2);
  ZIPLM_CHECK_DIM(wq, 2, "wq (nq*head_dim, d)");
  ZIPLM_CHECK_DIM(wk, 2, "wk (nkv*head_dim, d)");
  ZIPLM_CHECK_DIM(wv, 2, "wv (nkv*head_dim, d)");
  ZIPLM_CHECK_DIM(wo, 2, "wo (d, nq*head_dim)");
  check_float_like(wq, x, "wq");
  check_float_like(wk, x, "wk");
  check_float_like(wv, x, "wv");
  check_float_like(wo, x, "wo");
  ZIPLM_CHECK(wq.size(1) == d, "wq must be (nq*head_dim, d) with d = x.size(2) = ", d, ", got shape ", wq.sizes());
  ZIPLM_CHECK(wk.size(1) == d, "wk must be (nkv*head_dim, d) with d = x.size(2) = ", d, ", got shape ", wk.sizes());
  ZIPLM_CHECK(wv.sizes() == wk.sizes(), "wv must have wk's shape ", wk.sizes(), ", got ", wv.sizes());
  ZIPLM_CHECK(wq.size(0) % head_dim == 0, "wq.size(0) = ", wq.size(0), " is not a multiple of head_dim = ", head_dim);
  ZIPLM_CHECK(wk.size(0) % head_dim == 0, "wk.size(0) = ", wk.size(0), " is not a multiple of head_dim = ", head_dim);
  const int64_t nq = wq.size(0) / head_dim;
  const int64_t nkv = wk.size(0) / head_dim;
  ZIPLM_CHECK(wo.size(0) == d && wo.size(1) == nq * head_dim, "wo must be (d, nq*head_dim) = (", d, ", ",
              nq * head_dim, "), got shape ", wo.sizes());
  if (nq > 0) {
    ZIPLM_CHECK(nkv > 0, "nq = ", nq, " query heads need at least one key/value head, got nkv = 0");
    ZIPLM_CHECK(nq % nkv == 0, "nq = ", nq, " query heads must be a multiple of nkv = ", nkv,
                " key/value heads (grouped-query attention)");
  }
  return {nq, nkv, head_dim};
}

// Validates the extra arguments of time_attention_decode (x must be (B,1,d); caches
// (B, nkv, L, head_dim) on x's device and dtype); returns the head counts.
inline AttentionShape check_attention_decode(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                                             const at::Tensor& wv, const at::Tensor& wo, const at::Tensor& k_cache,
                                             const at::Tensor& v_cache, int64_t head_dim, int64_t warmup,
                                             int64_t reps) {
  const AttentionShape s = check_attention(x, wq, wk, wv, wo, head_dim, warmup, reps);
  ZIPLM_CHECK(x.size(1) == 1, "decode timing takes one new token per sequence: x must be (B, 1, d), got shape ",
              x.sizes());
  ZIPLM_CHECK_DIM(k_cache, 4, "k_cache (B, nkv, L, head_dim)");
  ZIPLM_CHECK_DIM(v_cache, 4, "v_cache (B, nkv, L, head_dim)");
  check_float_like(k_cache, x, "k_cache");
  check_float_like(v_cache, x, "v_cache");
  ZIPLM_CHECK(k_cache.size(0) == x.size(0) && k_cache.size(1) == s.nkv && k_cache.size(3) == head_dim,
              "k_cache must be (B, nkv, L, head_dim) = (", x.size(0), ", ", s.nkv, ", L, ", head_dim, "), got shape ",
              k_cache.sizes());
  ZIPLM_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", k_cache.sizes(), ", got ",
              v_cache.sizes());
  return s;
}

// Validates the arguments of time_ffn; returns the intermediate width m.
inline int64_t check_ffn(const at::Tensor& x, const at::Tensor& w_up, const std::optional<at::Tensor>& w_gate,
                         const at::Tensor& w_down, int64_t warmup, int64_t reps) {
  check_x(x);
  check_reps(warmup, reps);
  const int64_t d = x.size(2);
  ZIPLM_CHECK_DIM(w_up, 2, "w_up (m, d)");
  ZIPLM_CHECK_DIM(w_down, 2, "w_down (d, m)");
  check_float_like(w_up, x, "w_up");
  check_float_like(w_down, x, "w_down");
  const int64_t m = w_up.size(0);
  ZIPLM_CHECK(w_up.size(1) == d, "w_up must be (m, d) with d = x.size(2) = ", d, ", got shape ", w_up.sizes());
  ZIPLM_CHECK(w_down.size(0) == d && w_down.size(1) == m, "w_down must be (d, m) = (", d, ", ", m,
              "), got shape ", w_down.sizes());
  if (w_gate.has_value() && w_gate->defined()) {
    ZIPLM_CHECK_DIM(*w_gate, 2, "w_gate (m, d)");
    check_float_like(*w_gate, x, "w_gate");
    ZIPLM_CHECK(w_gate->sizes() == w_up.sizes(), "w_gate must have w_up's shape ", w_up.sizes(), ", got ",
                w_gate->sizes());
  }
  return m;
}

// The output a timing op reports for `y`, the result of its last timed repetition: y itself, or
// zeros shaped like x when the block was removed (undefined y; a removed block adds nothing to the
// residual stream), built after the clock has stopped.
inline at::Tensor output_or_zeros(const at::Tensor& y, const at::Tensor& x) {
  return y.defined() ? y : at::zeros_like(x);
}

// One forward pass of the attention block (see the top of this file). Returns the (B,T,d) output,
// or an undefined tensor when nq == 0 (block removed: no work at all).
inline at::Tensor attention_block(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                                  const at::Tensor& wv, const at::Tensor& wo, const AttentionShape& s,
                                  bool causal) {
  if (s.nq == 0) return at::Tensor();
  const int64_t B = x.size(0), T = x.size(1);
  // (B,T,h*hd) -> (B,h,T,hd)
  auto heads = [&](const at::Tensor& y, int64_t h) { return y.view({B, T, h, s.head_dim}).transpose(1, 2); };
  at::Tensor q = heads(at::linear(x, wq), s.nq);
  at::Tensor k = heads(at::linear(x, wk), s.nkv);
  at::Tensor v = heads(at::linear(x, wv), s.nkv);
  if (s.nkv != s.nq) {
    const int64_t rep = s.nq / s.nkv;
    k = k.repeat_interleave(rep, /*dim=*/1);
    v = v.repeat_interleave(rep, /*dim=*/1);
  }
  at::Tensor o = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/std::nullopt, /*dropout_p=*/0.0,
                                                  /*is_causal=*/causal);
  o = o.transpose(1, 2).reshape({B, T, s.nq * s.head_dim});
  return at::linear(o, wo);
}

// One decode step of the attention block (see the top of this file). Undefined when nq == 0.
inline at::Tensor attention_decode_block(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk,
                                         const at::Tensor& wv, const at::Tensor& wo, const at::Tensor& k_cache,
                                         const at::Tensor& v_cache, const AttentionShape& s) {
  if (s.nq == 0) return at::Tensor();
  const int64_t B = x.size(0);
  auto heads = [&](const at::Tensor& y, int64_t h) { return y.view({B, 1, h, s.head_dim}).transpose(1, 2); };
  at::Tensor q = heads(at::linear(x, wq), s.nq);
  at::Tensor k = at::cat({k_cache, heads(at::linear(x, wk), s.nkv)}, /*dim=*/2);
  at::Tensor v = at::cat({v_cache, heads(at::linear(x, wv), s.nkv)}, /*dim=*/2);
  if (s.nkv != s.nq) {
    const int64_t rep = s.nq / s.nkv;
    k = k.repeat_interleave(rep, /*dim=*/1);
    v = v.repeat_interleave(rep, /*dim=*/1);
  }
  at::Tensor o = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/std::nullopt, /*dropout_p=*/0.0,
                                                  /*is_causal=*/false);
  return at::linear(o.transpose(1, 2).reshape({B, 1, s.nq * s.head_dim}), wo);
}

// One forward pass of the FFN block. Returns the (B,T,d) output, or an undefined tensor when m == 0.
inline at::Tensor ffn_block(const at::Tensor& x, const at::Tensor& w_up, const std::optional<at::Tensor>& w_gate,
                            const at::Tensor& w_down) {
  if (w_up.size(0) == 0) return at::Tensor();
  if (w_gate.has_value() && w_gate->defined()) {
    return at::linear(at::silu(at::linear(x, *w_gate)) * at::linear(x, w_up), w_down);
  }
  return at::linear(at::gelu(at::linear(x, w_up)), w_down);
}

}  // namespace slice_timing
}  // namespace ziplm
