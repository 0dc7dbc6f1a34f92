// Cholesky-based damped inverse of SPD matrices with escalating damping; device-generic (ATen).
#pragma once
#include <cmath>
#include <sstream>
#include <tuple>
#include "checks.h"

namespace ziplm {

// Damping schedule: the requested relative damp first, then x10 per retry (from at least 1e-6),
// never above kMaxDamp: a matrix that needs more than 100% of its mean diagonal added is not a
// usable Hessian, and "fixing" it would return silent garbage.
constexpr double kMaxDamp = 1.0;
inline double damp_for_try(double damp, int64_t t) {
  if (t == 0) return damp;
  return std::min(kMaxDamp, std::max(damp, 1e-6) * std::pow(10.0, static_cast<double>(t)));
}

inline void check_hessian(const at::Tensor& H, const char* name) {
  ZIPLM_CHECK_FLOAT(H, name);
  ZIPLM_CHECK(H.dim() == 2 || H.dim() == 3, name, " must be (c,c) or (B,g,g), got shape ", H.sizes());
  ZIPLM_CHECK(H.size(-1) == H.size(-2), name, " blocks must be square, got shape ", H.sizes());
  ZIPLM_CHECK(H.size(-1) > 0, name, " is empty");
  ZIPLM_CHECK_FINITE(H, name);
  // Symmetry on a strided subset of at most 256 rows per matrix: a full pass costs as much as
  // the Cholesky for large c, and a non-symmetric "Hessian" is never off in just a few entries.
  const int64_t n = H.size(-1), step = std::max<int64_t>(1, n / 256);
  at::Tensor rows = at::arange(0, n, step, H.options().dtype(at::kLong));
  at::Tensor R = H.index_select(-2, rows), C = H.index_select(-1, rows).transpose(-1, -2);
  auto scale = R.abs().amax().item<double>();
  auto asym = (R - C).abs().amax().item<double>();
  ZIPLM_CHECK(asym <= 1e-6 * std::max(scale, 1e-30) + 1e-300, name, " is not symmetric (max |H - H^T| = ", asym, ")");
  ZIPLM_CHECK((H.diagonal(0, -2, -1) >= 0).all().item<bool>(), name,
              " has a negative diagonal entry: not a Hessian X^T X (not SPD)");
}

// Returns (Hinv with H's shape, damp_used[B] float64 on CPU, dead[B,g] bool).
// Dead inputs (zero diagonal) are treated as in OBS practice: H_ii := 1 before inverting;
// callers must zero the matching weight columns.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_inverse_impl(const at::Tensor& H_in, double damp,
                                                                          int64_t max_tries) {
  check_hessian(H_in, "H");
  ZIPLM_CHECK(damp >= 0 && damp <= kMaxDamp, "damp must be in [0, ", kMaxDamp, "], got ", damp);
  ZIPLM_CHECK(max_tries >= 1, "max_tries must be >= 1, got ", max_tries);
  const int64_t g = H_in.size(-1);
  at::Tensor H = H_in.reshape({-1, g, g}).clone();
  const int64_t B = H.size(0);
  at::Tensor diag = H.diagonal(0, -2, -1);
  at::Tensor dead = diag == 0;
  diag.masked_fill_(dead, 1.0);
  at::Tensor mean_diag = diag.mean(-1);  // (B,)
  at::Tensor Hinv = at::empty_like(H);
  at::Tensor damp_used = at::full({B}, damp, H.options().dtype(at::kDouble).device(at::kCPU));
  at::Tensor todo = at::arange(B, H.options().dtype(at::kLong));
  int64_t tries = 0;
  for (int64_t t = 0; t < max_tries && todo.numel() > 0; ++t, ++tries) {
    const double d = damp_for_try(damp, t);
    if (t > 0 && d <= damp_for_try(damp, t - 1)) break;  // reached kMaxDamp
    at::Tensor Ht = H.index_select(0, todo);
    Ht.diagonal(0, -2, -1).add_((d * mean_diag.index_select(0, todo)).view({-1, 1}));
    auto [L, info] = at::linalg_cholesky_ex(Ht);
    at::Tensor ok = info == 0;
    at::Tensor ok_idx = ok.nonzero().squeeze(1);
    if (ok_idx.numel() == B) {  // common case: everything factored on the first try, no scatter
      Hinv = at::cholesky_inverse(L);
      damp_used.fill_(d);
      todo = todo.narrow(0, 0, 0);
      break;
    }
    if (ok_idx.numel() > 0) {
      at::Tensor done = todo.index_select(0, ok_idx);
      Hinv.index_copy_(0, done, at::cholesky_inverse(L.index_select(0, ok_idx)));
      damp_used.index_fill_(0, done.cpu(), d);
    }
    todo = todo.index_select(0, (~ok).nonzero().squeeze(1));
  }
  if (todo.numel() > 0) {
    std::ostringstream msg;
    msg << "ziplm: Hessian " << (B == 1 ? std::string("matrix") : "block " + std::to_string(todo[0].item<int64_t>()))
        << " is not positive definite even with relative damping " << damp_for_try(damp, std::max<int64_t>(tries - 1, 0))
        << " (" << todo.numel() << " of " << B << " failed); check the calibration inputs";
    TORCH_CHECK_VALUE(false, msg.str());
  }
  // Row-major like H (cholesky_inverse returns the symmetric result column-major); the fake
  // kernel in ziplm_ext/native/fake.py promises contiguous outputs.
  return {Hinv.contiguous().view(H_in.sizes()), damp_used, dead};
}

}  // namespace ziplm
