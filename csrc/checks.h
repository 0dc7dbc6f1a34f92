// Named argument checks at the op boundary: every failure is one clear line.
#pragma once
// ATen and the op registry only: no Python/pybind11 headers (ops.cpp alone includes those).
#include <ATen/ATen.h>
#include <torch/library.h>

#define ZIPLM_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "ziplm: ", __VA_ARGS__)
#define ZIPLM_CHECK_FLOAT(t, name)                                              \
  ZIPLM_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble, \
              name, " must be float32 or float64, got ", (t).scalar_type())
#define ZIPLM_CHECK_DIM(t, d, name) \
  ZIPLM_CHECK((t).dim() == (d), name, " must be ", d, "-D, got shape ", (t).sizes())
#define ZIPLM_CHECK_SAME_DEVICE(a, b, na, nb) \
  ZIPLM_CHECK((a).device() == (b).device(), na, " is on ", (a).device(), " but ", nb, " is on ", (b).device())
#define ZIPLM_CHECK_FINITE(t, name) \
  ZIPLM_CHECK(at::isfinite(t).all().item<bool>(), name, " contains NaN or Inf")
