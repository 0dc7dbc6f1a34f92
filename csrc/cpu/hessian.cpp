#include "../hessian_impl.h"
TORCH_LIBRARY_IMPL(ziplm, CPU, m) { m.impl("hessian_accumulate", &ziplm::hessian_accumulate_impl); }
