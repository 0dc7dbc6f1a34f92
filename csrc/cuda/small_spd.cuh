// Block-level dense linear algebra on one small SPD matrix held in shared memory (device code
// shared by damped_inverse.cu and greedy_obs.cu).
//
// The matrix is stored as its packed lower triangle, A(i, j) = A[i (i + 1) / 2 + j] for j <= i,
// so an n x n matrix needs n (n + 1) / 2 entries; with an n-entry scratch vector, n up to 239 in
// float64 and 339 in float32 fit the 227 KiB of shared memory one block may opt into on sm_90. Every routine is called by all
// threads of the block (1-D thread index, blockDim.x a multiple of 32) and ends with the block
// synchronised.
#pragma once
#include <cuda_runtime.h>

namespace ziplm {
namespace cuda_small {

__device__ __forceinline__ int tri(int i, int j) { return i * (i + 1) / 2 + j; }

inline int64_t packed_bytes(int64_t n, int64_t elem) { return n * (n + 1) / 2 * elem; }

// In-place Cholesky A = L L^T (right-looking, one column per round). Returns false as soon as a
// pivot is not positive and finite: the test LAPACK's potrf applies, so a matrix fails here
// exactly when cuSOLVER would report info > 0 for it (up to rounding).
template <typename T>
__device__ bool block_cholesky(T* A, int n, int* s_flag) {
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
  for (int k = 0; k < n; ++k) {
    if (tid == 0) {
      const T a = A[tri(k, k)];
      const bool ok = a > T(0) && isfinite(a);
      *s_flag = ok ? 1 : 0;
      A[tri(k, k)] = ok ? sqrt(a) : a;
    }
    __syncthreads();
    if (*s_flag == 0) return false;  // uniform across the block
    const T piv = A[tri(k, k)];
    for (int i = k + 1 + tid; i < n; i += nt) A[tri(i, k)] /= piv;
    __syncthreads();
    for (int i = k + 1 + warp; i < n; i += nw) {
      const T lik = A[tri(i, k)];
      for (int j = k + 1 + lane; j <= i; j += 32) A[tri(i, j)] -= lik * A[tri(j, k)];
    }
    __syncthreads();
  }
  return true;
}

// In-place inverse of the lower-triangular L (LAPACK trti2 order: last column first, each column
// from the already inverted trailing block). tmp holds n entries of scratch.
template <typename T>
__device__ void block_tri_inverse(T* A, int n, T* tmp) {
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int j = n - 1; j >= 0; --j) {
    const T ajj_inv = T(1) / A[tri(j, j)];
    for (int i = j + 1 + tid; i < n; i += nt) tmp[i] = A[tri(i, j)];
    __syncthreads();
    for (int i = j + 1 + tid; i < n; i += nt) {
      T s = 0;
      for (int k = j + 1; k <= i; ++k) s += A[tri(i, k)] * tmp[k];
      A[tri(i, j)] = -s * ajj_inv;
    }
    if (tid == 0) A[tri(j, j)] = ajj_inv;
    __syncthreads();
  }
}

// Sum of a value over the block (result valid in every thread). red holds 32 entries.
template <typename T>
__device__ T block_sum(T v, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nw ? red[lane] : T(0);
    for (int o = 16; o > 0; o >>= 1) w += __shfl_down_sync(0xffffffffu, w, o);
    if (lane == 0) red[0] = w;
  }
  __syncthreads();
  return red[0];
}

}  // namespace cuda_small
}  // namespace ziplm
