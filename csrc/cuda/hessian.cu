// CUDA registration of H += X^T X. No hand-written kernel: the accumulation is one cuBLAS GEMM
// (addmm_) on the current stream, which is already at the arithmetic floor. The op returns the
// number of rows added, so a mask costs one host synchronisation (`nonzero` selects the rows),
// and the finiteness check of X one more.
#include <c10/cuda/CUDAGuard.h>
#include "../hessian_impl.h"

static int64_t hessian_accumulate_cuda(at::Tensor H, const at::Tensor& X, const c10::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(H.device());
  return ziplm::hessian_accumulate_impl(H, X, mask);
}
TORCH_LIBRARY_IMPL(ziplm, CUDA, m) { m.impl("hessian_accumulate", &hessian_accumulate_cuda); }
