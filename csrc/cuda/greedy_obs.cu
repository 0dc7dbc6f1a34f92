// CUDA greedy structured OBS: the device-generic lazy-block loop of greedy_obs_impl.h on CUDA tensors.
// Selection (argmin) stays on the device, so the loop issues cuBLAS/cuSOLVER work without a host
// round trip per step; the only synchronisations are the input checks and the final loss check.
#include <c10/cuda/CUDAGuard.h>
#include "../greedy_obs_impl.h"

static ziplm::ObsOutput greedy_obs_cuda(const at::Tensor& W, const at::Tensor& H, int64_t g, double damp,
                                        int64_t block) {
  const c10::cuda::CUDAGuard guard(W.device());
  return ziplm::greedy_obs_generic(W, H, g, damp, block);
}
TORCH_LIBRARY_IMPL(ziplm, CUDA, m) {
  m.impl("greedy_obs", &greedy_obs_cuda);
  m.impl("greedy_obs_generic", &greedy_obs_cuda);
}
