// H += X^T X over calibration rows; device-generic (ATen), registered per backend.
#pragma once
#include "checks.h"

namespace ziplm {

inline int64_t hessian_accumulate_impl(at::Tensor H, const at::Tensor& X_in,
                                       const c10::optional<at::Tensor>& mask) {
  ZIPLM_CHECK_FLOAT(H, "H");
  ZIPLM_CHECK_FLOAT(X_in, "X");
  ZIPLM_CHECK_DIM(H, 2, "H");
  ZIPLM_CHECK(H.size(0) == H.size(1), "H must be square, got shape ", H.sizes());
  ZIPLM_CHECK(H.is_contiguous(), "H must be contiguous (it is updated in place)");
  ZIPLM_CHECK(X_in.dim() >= 2, "X must be (tokens, features) or (batch, seq, features), got shape ", X_in.sizes());
  const int64_t c = H.size(0);
  ZIPLM_CHECK(X_in.size(-1) == c, "X has ", X_in.size(-1), " features but H is ", c, "x", c);
  ZIPLM_CHECK_SAME_DEVICE(H, X_in, "H", "X");
  at::Tensor X = X_in.reshape({-1, c});
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    ZIPLM_CHECK_SAME_DEVICE(m, X_in, "mask", "X");
    ZIPLM_CHECK(m.numel() == X.size(0), "mask has ", m.numel(), " entries but X has ", X.size(0),
                " token rows (mask must have X's shape without the feature dim)");
    ZIPLM_CHECK(m.scalar_type() == at::kBool || !at::isFloatingType(m.scalar_type()),
                "mask must be bool or integer, got ", m.scalar_type());
    X = X.index_select(0, m.reshape({-1}).to(at::kBool).nonzero().squeeze(1));
  }
  const int64_t n = X.size(0);
  if (n == 0) return 0;
  ZIPLM_CHECK_FINITE(X, "X");
  // Accumulate in H's precision (callers use float64 to keep X^T X exact enough for OBS).
  X = X.to(H.scalar_type());
  H.addmm_(X.t(), X);
  return n;
}

}  // namespace ziplm
