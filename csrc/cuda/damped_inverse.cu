// CUDA registration of the batched damped inverse: batched cuSOLVER Cholesky + triangular solves.
#include <c10/cuda/CUDAGuard.h>
#include "../damped_inverse_impl.h"

static std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_inverse_cuda(const at::Tensor& H, double damp,
                                                                          int64_t max_tries) {
  const c10::cuda::CUDAGuard guard(H.device());
  return ziplm::damped_inverse_impl(H, damp, max_tries);
}
TORCH_LIBRARY_IMPL(ziplm, CUDA, m) { m.impl("damped_inverse", &damped_inverse_cuda); }
