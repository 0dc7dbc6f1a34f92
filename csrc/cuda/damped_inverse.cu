// CUDA kernel of ziplm::damped_inverse for a batch of small SPD matrices (B, g, g): one thread block
// per matrix, the matrix held in shared memory (packed lower triangle, small_spd.cuh).
//
// Per matrix, without leaving the device: the input checks of damped_inverse_impl.h (finite,
// symmetric, non-negative diagonal) as per-matrix statistics; dead inputs (zero diagonal) set to
// H_ii = 1 and reported in `dead`; then Cholesky of H + d mean(diag H) I with the damping schedule
// of damped_inverse_impl.h (damp, then x10 per retry from at least 1e-6, at most kMaxDamp),
// escalated for this matrix alone; the inverse L^-T L^-1 from the in-place triangular inverse.
// The host reads back once, after the kernel: the check statistics, which matrices failed, and
// damp_used, which the op returns as float64 on the CPU (as the CPU kernel does, so callers and
// tests are device-agnostic). That single transfer is the op's only synchronisation.
//
// Fallback (ATen, damped_inverse_impl.h: cuSOLVER batched Cholesky + cholesky_inverse, with one
// host synchronisation per damping try and for the input checks): matrices whose packed triangle
// does not fit the shared memory a block can opt into (on sm_90, 227 KiB: g > 239 in float64,
// g > 339 in float32), i.e. the full (c, c) Hessian of a layer; and empty batches.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "../damped_inverse_impl.h"
#include "small_spd.cuh"

namespace ziplm {
namespace {

using cuda_small::block_cholesky;
using cuda_small::block_sum;
using cuda_small::block_tri_inverse;
using cuda_small::tri;

constexpr int kStats = 4;  // per matrix: any non-finite, any negative diagonal, max |H|, max |H - H^T|

template <typename T>
__device__ T block_max(T v, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_down_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nw ? red[lane] : T(0);
    for (int o = 16; o > 0; o >>= 1) w = max(w, __shfl_down_sync(0xffffffffu, w, o));
    if (lane == 0) red[0] = w;
  }
  __syncthreads();
  return red[0];
}

// The damping of try t (damp_for_try in damped_inverse_impl.h; powers of ten by multiplication,
// which is exact, so damp_used equals the CPU kernel's and the oracle's bit for bit).
__device__ double damp_of_try(double damp, int t) {
  if (t == 0) return damp;
  double p = 1.0;
  for (int i = 0; i < t; ++i) p *= 10.0;
  return fmin(kMaxDamp, fmax(damp, 1e-6) * p);
}

// Statistics of the input checks for matrix Hb; returns true when it is finite with a
// non-negative diagonal (worth factoring).
template <typename T>
__device__ bool check_matrix(const T* __restrict__ Hb, int n, double* __restrict__ st, double* red) {
  double nonfinite = 0, scale = 0, asym = 0, negdiag = 0;
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
    const int i = e / n, j = e - i * n;
    const double a = static_cast<double>(Hb[e]);
    if (!isfinite(a)) nonfinite = 1;
    scale = fmax(scale, fabs(a));
    asym = fmax(asym, fabs(a - static_cast<double>(Hb[j * n + i])));
    if (i == j && a < 0) negdiag = 1;
  }
  nonfinite = block_max(nonfinite, red);
  negdiag = block_max(negdiag, red);
  scale = block_max(scale, red);
  asym = block_max(asym, red);
  if (threadIdx.x == 0) {
    st[0] = nonfinite;
    st[1] = negdiag;
    st[2] = scale;
    st[3] = asym;
  }
  return nonfinite == 0 && negdiag == 0;
}

template <typename T>
__global__ void damped_inverse_kernel(const T* __restrict__ H, T* __restrict__ out, bool* __restrict__ dead,
                                      double* __restrict__ damp_used, double* __restrict__ stats,
                                      int* __restrict__ status, int n, double damp, int max_tries) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* A = reinterpret_cast<T*>(smem_raw);  // packed lower triangle, n (n + 1) / 2
  T* tmp = A + n * (n + 1) / 2;           // n
  __shared__ double red[32];
  __shared__ T tred[32];
  __shared__ int flag;
  const int64_t b = blockIdx.x;
  const T* Hb = H + b * n * n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;

  const bool valid = check_matrix(Hb, n, stats + b * kStats, red);
  T dsum = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const T hii = Hb[i * n + i];
    dead[b * n + i] = hii == T(0);
    dsum += hii == T(0) ? T(1) : hii;
  }
  const T mean = block_sum(dsum, tred) / T(n);

  bool ok = false;
  double d = damp, prev = -1.0;
  for (int t = 0; valid && t < max_tries; ++t) {
    const double dt = damp_of_try(damp, t);
    if (t > 0 && dt <= prev) break;  // the schedule reached kMaxDamp
    prev = d = dt;
    const T add = static_cast<T>(dt) * mean;
    for (int i = warp; i < n; i += nw) {
      for (int j = lane; j <= i; j += 32) {
        T v = Hb[i * n + j];
        if (i == j) v = (v == T(0) ? T(1) : v) + add;
        A[tri(i, j)] = v;
      }
    }
    __syncthreads();
    if (block_cholesky(A, n, &flag)) {
      ok = true;
      break;
    }
    __syncthreads();  // every thread has read the failed flag before the next try overwrites A
  }
  if (threadIdx.x == 0) {
    status[b] = ok ? 0 : 1;
    damp_used[b] = d;  // on failure: the last damping tried, for the error message
  }
  if (!ok) return;
  block_tri_inverse(A, n, tmp);
  // (H + d mean I)^-1 = L^-T L^-1: entry (a, c) sums over the rows k >= max(a, c) of L^-1; the
  // two products commute, so the result is exactly symmetric.
  T* ob = out + b * n * n;
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
    const int a = e / n, c = e - a * n;
    T s = 0;
    for (int k = a > c ? a : c; k < n; ++k) s += A[tri(k, a)] * A[tri(k, c)];
    ob[e] = s;
  }
}

// Bytes of dynamic shared memory the kernel needs for one n x n matrix of `elem`-byte entries.
int64_t smem_bytes(int64_t n, int64_t elem) { return cuda_small::packed_bytes(n, elem) + n * elem; }

bool kernel_fits(int64_t n, int64_t elem, int device) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return smem_bytes(n, elem) <= optin;
}

// The argument checks of damped_inverse_impl.h that need no data (those that read H run in the kernel).
void check_shape(const at::Tensor& H, double damp, int64_t max_tries) {
  ZIPLM_CHECK_FLOAT(H, "H");
  ZIPLM_CHECK(H.dim() == 2 || H.dim() == 3, "H must be (c,c) or (B,g,g), got shape ", H.sizes());
  ZIPLM_CHECK(H.size(-1) == H.size(-2), "H blocks must be square, got shape ", H.sizes());
  ZIPLM_CHECK(H.size(-1) > 0, "H is empty");
  ZIPLM_CHECK(damp >= 0 && damp <= kMaxDamp, "damp must be in [0, ", kMaxDamp, "], got ", damp);
  ZIPLM_CHECK(max_tries >= 1, "max_tries must be >= 1, got ", max_tries);
}

// Raises the error damped_inverse_impl.h would raise, from the one read-back summary
// [non-finite, negative diagonal, scale, asymmetry, failed count, first failed index].
void raise_on_summary(const double* s, int64_t B) {
  ZIPLM_CHECK(s[0] == 0, "H contains NaN or Inf");
  ZIPLM_CHECK(s[3] <= 1e-6 * std::max(s[2], 1e-30) + 1e-300, "H is not symmetric (max |H - H^T| = ", s[3], ")");
  ZIPLM_CHECK(s[1] == 0, "H has a negative diagonal entry: not a Hessian X^T X (not SPD)");
  if (s[4] > 0) {
    const auto first = static_cast<int64_t>(s[5]);
    std::ostringstream msg;
    msg << "ziplm: Hessian " << (B == 1 ? std::string("matrix") : "block " + std::to_string(first))
        << " is not positive definite even with relative damping " << s[6 + first] << " ("
        << static_cast<int64_t>(s[4]) << " of " << B << " failed); check the calibration inputs";
    TORCH_CHECK_VALUE(false, msg.str());
  }
}

template <typename T>
void launch(const at::Tensor& H, at::Tensor& out, at::Tensor& dead, at::Tensor& used, at::Tensor& stats,
            at::Tensor& status, double damp, int64_t max_tries) {
  const int64_t B = H.size(0), n = H.size(-1);
  const int64_t smem = smem_bytes(n, sizeof(T));
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(damped_inverse_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  const int threads = n <= 16 ? 64 : 256;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(H.device().index()).stream();
  damped_inverse_kernel<T><<<static_cast<unsigned>(B), threads, smem, stream>>>(
      H.data_ptr<T>(), out.data_ptr<T>(), dead.data_ptr<bool>(), used.data_ptr<double>(), stats.data_ptr<double>(),
      status.data_ptr<int>(), static_cast<int>(n), damp, static_cast<int>(std::min<int64_t>(max_tries, 64)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_inverse_cuda(const at::Tensor& H_in, double damp,
                                                                   int64_t max_tries) {
  const c10::cuda::CUDAGuard guard(H_in.device());
  check_shape(H_in, damp, max_tries);
  const int64_t n = H_in.size(-1);
  const int64_t B = H_in.numel() / (n * n);
  if (B == 0 || !kernel_fits(n, H_in.element_size(), H_in.device().index())) {
    return damped_inverse_impl(H_in, damp, max_tries);  // ATen fallback (see the top of this file)
  }
  at::Tensor H = H_in.reshape({B, n, n}).contiguous();
  at::Tensor out = at::empty_like(H);
  at::Tensor dead = at::empty({B, n}, H.options().dtype(at::kBool));
  at::Tensor used = at::empty({B}, H.options().dtype(at::kDouble));
  at::Tensor stats = at::empty({B, kStats}, H.options().dtype(at::kDouble));
  at::Tensor status = at::empty({B}, H.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "damped_inverse_cuda",
                             [&] { launch<scalar_t>(H, out, dead, used, stats, status, damp, max_tries); });
  at::Tensor failed = status != 0;
  at::Tensor summary = at::cat({stats.amax(0), failed.sum().to(at::kDouble).view({1}),
                                failed.to(at::kInt).argmax().to(at::kDouble).view({1}), used});
  at::Tensor host = summary.cpu();  // the one synchronisation of the op
  raise_on_summary(host.data_ptr<double>(), B);
  return {out.view(H_in.sizes()), host.narrow(0, 6, B).clone(), dead};
}

}  // namespace
}  // namespace ziplm

TORCH_LIBRARY_IMPL(ziplm, CUDA, m) { m.impl("damped_inverse", &ziplm::damped_inverse_cuda); }
