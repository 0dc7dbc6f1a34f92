// CUDA kernels of ziplm::greedy_obs: the greedy structured OBS of ZipLM (Kurtic et al. 2023), in
// the notation of greedy_obs_impl.h.
//
// Single columns (group_size 1: FFN neurons, thousands of steps). State on the device: the applied
// H^-1 and W over the m active columns, the pending rank-1 factors g_p (rows of G) and u_p (rows of
// U) of the current block, diag(H^-1) =: d and the column norms ||W_:,k||^2 =: n, a removed flag
// per active column. One step is two launches and no host synchronisation:
//   step_u:  the pivot (H^-1)_jj rebuilt from the pending factors, u = W_:,j / sqrt(pivot) with
//            W_:,j rebuilt the same way, ||u||^2 (the step loss) and z = U_p u; blocks over rows,
//            the last block to finish sums the per-block partials (fixed order: deterministic).
//   step_v:  the row of H^-1 rebuilt from the pending factors, g = H^-1[:, j] / sqrt(pivot) with
//            the removed rows zeroed, t = W^T u (a GEMV over the applied W, minus G_p^T z), and
//            the incremental downdate d -= g^2, n += g (g ||u||^2 - 2 t); the last block to finish
//            then selects the next column: the device-wide argmin of n_k / d_k over the columns
//            still present (ties to the smaller index, like the CPU kernel).
// The selected column never leaves the device: kernels read it from memory. Every `block_size`
// steps the pending factors are applied with two cuBLAS GEMMs (addmm_) and the removed columns
// are dropped; the kept columns come from a stable sort of the removed flags (the number kept is
// known on the host), so the flush needs no `nonzero` and no synchronisation either. A pivot that
// is not positive is recorded on the device and raised after the loop, with the final loss check,
// in the op's one read-back.
//
// Groups (2 <= group_size: attention heads and KV groups, g = 64..192). The loop of
// greedy_obs_impl.h, which keeps every remaining structure's g x g diagonal block of H^-1 (D_K)
// and of W^T W (N_K) up to date, with its saliency replaced by one launch: a block per structure
// loads D_K into shared memory, factors and inverts it there and returns
// rho_K = tr(D_K^-1 N_K); removed structures get +inf. The rank-g updates per step are cuBLAS
// products (mm/bmm) and a g x g cuSOLVER Cholesky; the flush is the same sort-based one as above.
//
// Fallback (ATen, greedy_obs_generic in greedy_obs_impl.h): groups whose g x g block does not fit
// the shared memory one block can opt into (on sm_90: g > 239 in float64, g > 339 in float32).
// The op greedy_obs_generic always runs that ATen loop, so tests can compare the two.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <limits>
#include <sstream>

#include "../greedy_obs_impl.h"
#include "small_spd.cuh"

namespace ziplm {
namespace {

using cuda_small::block_cholesky;
using cuda_small::block_sum;
using cuda_small::block_tri_inverse;
using cuda_small::tri;

constexpr int kRowThreads = 256;  // step_u: rows of W per block
constexpr int kColTile = 32;      // step_v: columns per block (one warp wide) ...
constexpr int kSlices = 8;        // ... times row slices reduced in shared memory
constexpr int kSelectThreads = 1024;

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

template <typename T>
struct StepArgs {
  const T* Hinv;       // (m, m) applied H^-1 over the active columns
  const T* W;          // (r, m) applied weights
  T* G;                // (cap, c) pending g_p as rows (first m entries used)
  T* U;                // (cap, r) pending u_p as rows
  T* d;                // (c) diag(H^-1) of the current state
  T* n;                // (c) column norms of the current W
  int* removed;        // (c) removed since the last flush
  const int64_t* act;  // (c) original column of each active column
  int64_t* order;      // (c) outputs: removal order, step losses, U^T, R
  T* step_loss;
  T* UoutT;            // (c, r)
  T* Rout;             // (c, c)
  T* coef;             // (cap) G[p, j] of the selected column
  T* z;                // (cap) U_p u
  T* zpart;            // (row blocks, cap) partial sums of z
  T* uupart;           // (row blocks) partial sums of ||u||^2
  T* scal;             // [1 / sqrt(pivot), ||u||^2]
  int64_t* sel;        // [j]
  unsigned* counter;   // [step_u, step_v] finished-block counters
  int* err;            // first step with a broken pivot (INT_MAX: none)
  T* errpiv;           // that pivot
  int64_t r, c, m, cap;
};

// a better than b: smaller saliency, ties (and NaN) to the smaller index; -1 is "none".
template <typename T>
__device__ __forceinline__ bool better(T va, int64_t ka, T vb, int64_t kb) {
  return ka >= 0 && (kb < 0 || va < vb || (!(vb < va) && ka < kb));
}

// Device-wide argmin of n_k / d_k over the active columns not yet removed, by one block; marks the
// chosen column removed, records it and gathers coef_p = G[p, j] for the b pending factors.
template <typename T>
__device__ void select_column(const StepArgs<T>& a, int64_t b, int64_t s) {
  __shared__ T sv[32];
  __shared__ int64_t sk[32];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  const int lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
  T best = std::numeric_limits<T>::infinity();
  int64_t bk = -1;
  for (int64_t k = tid; k < a.m; k += nt) {
    if (__ldcg(a.removed + k)) continue;
    const T rho = __ldcg(a.n + k) / __ldcg(a.d + k);
    if (bk < 0 || rho < best) best = rho, bk = k;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const T ov = __shfl_down_sync(0xffffffffu, best, o);
    const long long ok = __shfl_down_sync(0xffffffffu, static_cast<long long>(bk), o);
    if (better<T>(ov, ok, best, bk)) best = ov, bk = ok;
  }
  if (lane == 0) sv[warp] = best, sk[warp] = bk;
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < nw; ++w)
      if (better<T>(sv[w], sk[w], sv[0], sk[0])) sv[0] = sv[w], sk[0] = sk[w];
    const int64_t j = sk[0] < 0 ? 0 : sk[0];  // none left cannot happen: the host stops at c steps
    a.removed[j] = 1;
    a.sel[0] = j;
    a.order[s] = a.act[j];
  }
  __syncthreads();
  const int64_t j = sk[0] < 0 ? 0 : sk[0];
  for (int64_t p = tid; p < b; p += nt) a.coef[p] = __ldcg(a.G + p * a.c + j);
}

template <typename T>
__global__ void select_kernel(StepArgs<T> a, int64_t b, int64_t s) {
  select_column(a, b, s);
}

// True in every thread of the block that finished last (counter reset for the next launch).
__device__ bool last_block(unsigned* counter, bool* s_last) {
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    __threadfence();
    const unsigned ticket = atomicAdd(counter, 1u);
    *s_last = ticket == gridDim.x - 1;
    if (*s_last) *counter = 0;
  }
  __syncthreads();
  if (*s_last) __threadfence();
  return *s_last;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) step_u_kernel(StepArgs<T> a, int64_t b, int64_t s) {
  __shared__ T su[kRowThreads];
  __shared__ T red[32];
  __shared__ bool s_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t j = a.sel[0], r = a.r;
  // pivot (H^-1)_jj = (H^-1_A)_jj - sum_p G[p, j]^2
  T q = 0;
  for (int64_t p = tid; p < b; p += kRowThreads) q += a.coef[p] * a.coef[p];
  q = block_sum(q, red);
  const T piv = a.Hinv[j * a.m + j] - q;
  const T scale = T(1) / sqrt(piv);  // NaN after a breakdown: recorded here, raised after the loop
  if (blockIdx.x == 0 && tid == 0) {
    a.scal[0] = scale;
    if (!(piv > T(0) && isfinite(piv)) && *a.err == INT_MAX) *a.err = static_cast<int>(s), *a.errpiv = piv;
  }
  // u = (W_A[:, j] - U_p^T coef) / sqrt(pivot)
  const int64_t i = blockIdx.x * kRowThreads + tid;
  T u = 0;
  if (i < r) {
    T acc = 0;
#pragma unroll 4
    for (int64_t p = 0; p < b; ++p) acc += a.U[p * r + i] * a.coef[p];
    u = (a.W[i * a.m + j] - acc) * scale;
    a.U[b * r + i] = u;
    a.UoutT[s * r + i] = u;
  }
  su[tid] = u;
  const T uu = block_sum(u * u, red);  // also makes su visible to the whole block
  if (tid == 0) a.uupart[blockIdx.x] = uu;
  // partial z_p = sum over this block's rows of U[p, i] u_i, one warp per p
  for (int64_t p = warp; p < b; p += kRowThreads / 32) {
    T acc = 0;
    for (int t = lane; t < kRowThreads; t += 32) {
      const int64_t ii = blockIdx.x * kRowThreads + t;
      if (ii < r) acc += a.U[p * r + ii] * su[t];
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) a.zpart[blockIdx.x * a.cap + p] = acc;
  }
  if (!last_block(a.counter, &s_last)) return;
  const int nblk = gridDim.x;
  if (tid == 0) {
    T tot = 0;
    for (int q2 = 0; q2 < nblk; ++q2) tot += __ldcg(a.uupart + q2);
    a.scal[1] = tot;
    a.step_loss[s] = tot;
  }
  for (int64_t p = tid; p < b; p += kRowThreads) {
    T tot = 0;
    for (int q2 = 0; q2 < nblk; ++q2) tot += __ldcg(a.zpart + q2 * a.cap + p);
    a.z[p] = tot;
  }
}

template <typename T>
__global__ void __launch_bounds__(kColTile* kSlices)
    step_v_kernel(StepArgs<T> a, int64_t b, int64_t s, bool select_next) {
  __shared__ T sv[kSlices][kColTile], stw[kSlices][kColTile], stg[kSlices][kColTile];
  __shared__ bool s_last;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t k = blockIdx.x * kColTile + tx, m = a.m, r = a.r, c = a.c;
  const T* u = a.U + b * r;
  T accv = 0, acctw = 0, acctg = 0;
  if (k < m) {
    for (int64_t p = ty; p < b; p += kSlices) {
      const T gp = a.G[p * c + k];
      accv += a.coef[p] * gp;
      acctg += a.z[p] * gp;
    }
#pragma unroll 8
    for (int64_t i = ty; i < r; i += kSlices) acctw += a.W[i * m + k] * u[i];
  }
  sv[ty][tx] = accv;
  stw[ty][tx] = acctw;
  stg[ty][tx] = acctg;
  __syncthreads();
  if (ty == 0 && k < m) {
    T v = 0, tw = 0, tg = 0;
    for (int q = 0; q < kSlices; ++q) v += sv[q][tx], tw += stw[q][tx], tg += stg[q][tx];
    const int64_t j = a.sel[0];
    const T scale = a.scal[0], uu = a.scal[1];
    v = a.Hinv[j * m + k] - v;              // H^-1[j, k] of the current state (symmetric: row j)
    const T g = a.removed[k] ? T(0) : v * scale;
    const T t = tw - tg;                    // (W^T u)_k of the current W
    a.G[b * c + k] = g;
    a.Rout[s * c + a.act[k]] = g;
    a.d[k] -= g * g;
    a.n[k] += g * (g * uu - T(2) * t);
  }
  if (!last_block(a.counter + 1, &s_last)) return;
  if (select_next) select_column(a, b + 1, s + 1);
}

// out[i, l] = A[keep[i], keep[l]] (the flush's restriction of H^-1 to the kept columns).
template <typename T>
__global__ void gather_square_kernel(const T* __restrict__ A, const int64_t* __restrict__ keep, T* __restrict__ out,
                                     int64_t m, int64_t m2) {
  const int64_t i = blockIdx.y, l = blockIdx.x * blockDim.x + threadIdx.x;
  if (l < m2) out[i * m2 + l] = A[keep[i] * m + keep[l]];
}

// Indices of the first `kept` entries whose flag is 0, in order (a stable sort puts them first):
// the flush's active set without `nonzero`, whose output size would need a host round trip.
at::Tensor kept_indices(const at::Tensor& flags, int64_t kept) {
  return std::get<1>(at::sort(flags, /*stable=*/true, /*dim=*/0, /*descending=*/false)).narrow(0, 0, kept);
}

// The op's one read-back: the first broken step (INT_MAX: none) with its pivot when the kernel
// records one, and whether all losses are finite; raises the CPU kernels' errors.
void raise_after_loop(const at::Tensor& err, const at::Tensor& losses, const char* what,
                      const at::Tensor& errpiv = at::Tensor()) {
  at::Tensor piv = errpiv.defined() ? errpiv.to(at::kDouble).view({1}) : at::zeros({1}, losses.options().dtype(at::kDouble));
  at::Tensor flags =
      at::cat({err.to(at::kDouble).view({1}), piv, at::isfinite(losses).all().to(at::kDouble).view({1})}).cpu();
  const double* f = flags.data_ptr<double>();
  if (f[0] < INT_MAX) {
    std::ostringstream msg;
    msg << "numerical breakdown at step " << static_cast<int64_t>(f[0]) << ": " << what;
    if (errpiv.defined()) msg << " = " << f[1];
    ZIPLM_CHECK(false, msg.str(), " (use float64 or a larger damp)");
  }
  ZIPLM_CHECK(f[2] != 0, "greedy OBS produced non-finite losses (numerical breakdown; use float64 or a larger damp)");
}

template <typename T>
struct ColumnsRun {
  at::Tensor Hinv, W, G, U, d, n, removed, act, order, step_loss, UoutT, Rout;
  at::Tensor coef, z, zpart, uupart, scal, sel, counter, err, errpiv;
  StepArgs<T> args() const {
    return {Hinv.data_ptr<T>(), W.data_ptr<T>(), G.data_ptr<T>(), U.data_ptr<T>(), d.data_ptr<T>(),
            n.data_ptr<T>(), removed.data_ptr<int>(), act.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
            step_loss.data_ptr<T>(), UoutT.data_ptr<T>(), Rout.data_ptr<T>(), coef.data_ptr<T>(),
            z.data_ptr<T>(), zpart.data_ptr<T>(), uupart.data_ptr<T>(), scal.data_ptr<T>(),
            sel.data_ptr<int64_t>(), reinterpret_cast<unsigned*>(counter.data_ptr<int>()), err.data_ptr<int>(),
            errpiv.data_ptr<T>(), W.size(0), G.size(1), W.size(1), G.size(0)};
  }
  // Apply the b pending factors with two GEMMs and keep the columns not removed.
  void flush(int64_t b) {
    const int64_t m = W.size(1), m2 = m - b;
    at::Tensor keep = kept_indices(removed.narrow(0, 0, m), m2);
    at::Tensor Gk = G.narrow(0, 0, b).narrow(1, 0, m).index_select(1, keep);  // (b, m2)
    at::Tensor H2;
    if (m2 <= 65535) {  // one grid row per output row
      H2 = at::empty({m2, m2}, Hinv.options());
      const dim3 grid(static_cast<unsigned>((m2 + 255) / 256), static_cast<unsigned>(m2));
      gather_square_kernel<T><<<grid, 256, 0, current_stream(W)>>>(Hinv.data_ptr<T>(), keep.data_ptr<int64_t>(),
                                                                   H2.data_ptr<T>(), m, m2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {  // beyond the grid's y limit: two ATen gathers
      H2 = Hinv.index_select(0, keep).index_select(1, keep);
    }
    H2.addmm_(Gk.t(), Gk, 1.0, -1.0);
    at::Tensor W2 = W.index_select(1, keep);
    W2.addmm_(U.narrow(0, 0, b).t(), Gk, 1.0, -1.0);
    act.narrow(0, 0, m2).copy_(act.narrow(0, 0, m).index_select(0, keep));
    Hinv = H2;
    W = W2;
    removed.zero_();
    d.narrow(0, 0, m2).copy_(Hinv.diagonal());
    n.narrow(0, 0, m2).copy_(W.square().sum(0));
  }
};

template <typename T>
ObsOutput greedy_obs_cuda_columns(const ObsSetup& setup, int64_t block) {
  const at::Tensor& W0 = setup.W0;
  const int64_t r = W0.size(0), c = W0.size(1), cap = std::max<int64_t>(block, 1);
  const int64_t row_blocks = (r + kRowThreads - 1) / kRowThreads;
  const auto opt = W0.options();
  const auto iopt = opt.dtype(at::kInt), lopt = opt.dtype(at::kLong);
  ColumnsRun<T> st;
  st.Hinv = setup.Hinv0.clone();
  st.W = W0.clone();
  st.G = at::empty({cap, c}, opt);
  st.U = at::empty({cap, r}, opt);
  st.d = st.Hinv.diagonal().contiguous();
  st.n = st.W.square().sum(0);
  st.removed = at::zeros({c}, iopt);
  st.act = at::arange(c, lopt);
  st.order = at::empty({c}, lopt);
  st.step_loss = at::empty({c}, opt);
  st.UoutT = at::empty({c, r}, opt);
  st.Rout = at::zeros({c, c}, opt);
  st.coef = at::empty({cap}, opt);
  st.z = at::empty({cap}, opt);
  st.zpart = at::empty({row_blocks * cap}, opt);
  st.uupart = at::empty({row_blocks}, opt);
  st.scal = at::empty({2}, opt);
  st.sel = at::zeros({1}, lopt);
  st.counter = at::zeros({2}, iopt);
  st.err = at::full({1}, INT_MAX, iopt);
  st.errpiv = at::zeros({1}, opt);
  const cudaStream_t stream = current_stream(W0);

  select_kernel<T><<<1, kSelectThreads, 0, stream>>>(st.args(), 0, 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int64_t b = 0;
  for (int64_t s = 0; s < c; ++s) {
    const StepArgs<T> a = st.args();
    const bool flush_after = b + 1 == cap && s < c - 1;
    step_u_kernel<T><<<static_cast<unsigned>(row_blocks), kRowThreads, 0, stream>>>(a, b, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto col_blocks = static_cast<unsigned>((a.m + kColTile - 1) / kColTile);
    step_v_kernel<T><<<col_blocks, dim3(kColTile, kSlices), 0, stream>>>(a, b, s, !flush_after && s < c - 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ++b;
    if (flush_after) {
      st.flush(b);
      b = 0;
      select_kernel<T><<<1, kSelectThreads, 0, stream>>>(st.args(), 0, s + 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  at::Tensor losses = st.step_loss.cumsum(0);
  raise_after_loop(st.err, losses, "pivot (H^-1)_jj", st.errpiv);
  return {st.order, losses, st.UoutT.t().contiguous(), st.Rout, W0, setup.damp_used};
}

// ------------------------------------------------------------------------------------ groups

// rho_K = tr(D_K^-1 N_K) for every structure K (one block each); removed structures and blocks
// that are not positive definite (numerical breakdown, recorded in err) get +inf.
template <typename T>
__global__ void group_saliency_kernel(const T* __restrict__ D, const T* __restrict__ N,
                                      const bool* __restrict__ removed, T* __restrict__ rho,
                                      int64_t* __restrict__ err, int64_t step, int g) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* A = reinterpret_cast<T*>(smem_raw);  // packed lower triangle of D_K, then of its Cholesky factor's inverse
  T* tmp = A + g * (g + 1) / 2;
  __shared__ T red[32];
  __shared__ int flag;
  const int64_t K = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  if (removed[K]) {
    if (tid == 0) rho[K] = std::numeric_limits<T>::infinity();
    return;
  }
  const T* DK = D + K * g * g;
  const T* NK = N + K * g * g;
  for (int i = warp; i < g; i += nw)
    for (int j = lane; j <= i; j += 32) A[tri(i, j)] = DK[i * g + j];
  __syncthreads();
  if (!block_cholesky(A, g, &flag)) {
    if (tid == 0) {
      rho[K] = std::numeric_limits<T>::infinity();
      atomicMin(reinterpret_cast<unsigned long long*>(err), static_cast<unsigned long long>(step));
    }
    return;
  }
  block_tri_inverse(A, g, tmp);
  // tr(D^-1 N) = sum_k sum_{a <= k} Linv[k, a] sum_{b <= k} Linv[k, b] N[b, a]  (D^-1 = Linv^T Linv)
  T acc = 0;
  for (int k = warp; k < g; k += nw) {
    for (int a = lane; a <= k; a += 32) {
      T p = 0;
      for (int b = 0; b <= k; ++b) p += A[tri(k, b)] * NK[b * g + a];
      acc += A[tri(k, a)] * p;
    }
  }
  acc = block_sum(acc, red);
  if (tid == 0) rho[K] = acc;
}

int64_t group_smem_bytes(int64_t g, int64_t elem) { return cuda_small::packed_bytes(g, elem) + g * elem; }

bool group_kernel_fits(int64_t g, int64_t elem, int device) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return group_smem_bytes(g, elem) <= optin;
}

at::Tensor group_saliency(const ObsState& st, int64_t g, at::Tensor& err, int64_t step) {
  const int64_t Sa = st.D.size(0);
  at::Tensor rho = at::empty({Sa}, st.D.options());
  at::Tensor D = st.D.contiguous(), N = st.N.contiguous();
  AT_DISPATCH_FLOATING_TYPES(D.scalar_type(), "group_saliency", [&] {
    const int64_t smem = group_smem_bytes(g, sizeof(scalar_t));
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(group_saliency_kernel<scalar_t>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    group_saliency_kernel<scalar_t><<<static_cast<unsigned>(Sa), 256, smem, current_stream(D)>>>(
        D.data_ptr<scalar_t>(), N.data_ptr<scalar_t>(), st.removed.data_ptr<bool>(), rho.data_ptr<scalar_t>(),
        err.data_ptr<int64_t>(), step, static_cast<int>(g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return rho;
}

// greedy_obs_impl.h's flush with the kept groups from kept_indices instead of `nonzero`.
void flush_groups(ObsState& st, int64_t g, int64_t n_removed) {
  at::Tensor keep_groups = kept_indices(st.removed.to(at::kInt), st.removed.size(0) - n_removed);
  at::Tensor keep_cols = (keep_groups.view({-1, 1}) * g + at::arange(g, keep_groups.options()).view({1, -1})).view({-1});
  at::Tensor Gk = st.G.index_select(0, keep_cols).narrow(1, 0, st.b);
  at::Tensor Uk = st.U.narrow(1, 0, st.b);
  st.Hinv = st.Hinv.index_select(0, keep_cols).index_select(1, keep_cols);
  st.Hinv.addmm_(Gk, Gk.t(), 1.0, -1.0);
  st.W = st.W.index_select(1, keep_cols);
  st.W.addmm_(Uk, Gk.t(), 1.0, -1.0);
  st.groups = st.groups.index_select(0, keep_groups);
  st.removed = at::zeros({keep_groups.size(0)}, st.removed.options());
  st.G = at::zeros({keep_cols.size(0), st.G.size(1)}, st.G.options());
  st.b = 0;
  refresh_blocks(st, g);
}

struct GroupHistory {
  at::Tensor order, step_loss, Uout, Rout;
};

// One greedy step of the groups loop (the maths of greedy_obs_generic, selection by the kernel).
void group_step(ObsState& st, GroupHistory& h, at::Tensor& col_removed, const at::Tensor& act_cols,
                at::Tensor& err, int64_t g, int64_t s) {
  const at::Tensor ar = at::arange(g, st.groups.options());
  at::Tensor k = group_saliency(st, g, err, s).argmin().view({1});  // stays on the device
  at::Tensor cols = k * g + ar;
  at::Tensor Gp = st.G.narrow(1, 0, st.b), Up = st.U.narrow(1, 0, st.b);
  at::Tensor Gsel = Gp.index_select(0, cols);
  at::Tensor V = st.Hinv.index_select(0, cols).t() - at::mm(Gp, Gsel.t());  // (m, g) = H^-1[:, M]
  at::Tensor Wc = st.W.index_select(1, cols) - at::mm(Up, Gsel.t());     // (r, g) = W[:, M]
  at::Tensor Bm = V.index_select(0, cols);
  Bm = 0.5 * (Bm + Bm.t());
  auto [L, info] = at::linalg_cholesky_ex(Bm);
  // a failed pivot block: remember the first such step on the device (raised after the loop)
  err = at::minimum(err, (info.view({1}) != 0).to(at::kLong) * (s - INT_MAX) + INT_MAX);
  at::Tensor Linv_t = at::linalg_solve_triangular(L, at::eye(g, L.options()), /*upper=*/false).t();
  at::Tensor Gn = at::mm(V, Linv_t), Un = at::mm(Wc, Linv_t);
  col_removed.index_fill_(0, cols, true);
  Gn.masked_fill_(col_removed.view({-1, 1}), 0.0);
  at::Tensor T = at::mm(st.W.t(), Un) - at::mm(Gp, at::mm(Up.t(), Un));
  at::Tensor UU = at::mm(Un.t(), Un);
  const int64_t Sa = st.D.size(0);
  at::Tensor Gk = Gn.view({Sa, g, g}), Tk = T.view({Sa, g, g});
  st.D.sub_(at::bmm(Gk, Gk.transpose(1, 2)));
  at::Tensor GT = at::bmm(Gk, Tk.transpose(1, 2));
  st.N.sub_(GT + GT.transpose(1, 2) - at::bmm(at::matmul(Gk, UU), Gk.transpose(1, 2)));
  st.removed.index_fill_(0, k, true);
  st.G.narrow(1, st.b, g).copy_(Gn);
  st.U.narrow(1, st.b, g).copy_(Un);
  st.b += g;
  h.order.narrow(0, s, 1).copy_(st.groups.index_select(0, k));
  h.step_loss.narrow(0, s, 1).copy_(Un.square().sum().view({1}));
  h.Uout.narrow(1, s * g, g).copy_(Un);
  h.Rout.narrow(0, s * g, g).index_copy_(1, act_cols, Gn.t());
}

ObsOutput greedy_obs_cuda_groups(const ObsSetup& setup, int64_t g, int64_t block) {
  const at::Tensor& W0 = setup.W0;
  const int64_t r = W0.size(0), c = W0.size(1), S = c / g, cap = std::max(block, g);
  ObsState st;
  st.Hinv = setup.Hinv0;
  st.W = W0.clone();
  st.G = at::zeros({c, cap}, W0.options());
  st.U = at::zeros({r, cap}, W0.options());
  st.removed = at::zeros({S}, W0.options().dtype(at::kBool));
  st.groups = at::arange(S, W0.options().dtype(at::kLong));
  refresh_blocks(st, g);
  GroupHistory h{at::empty({S}, st.groups.options()), at::empty({S}, W0.options()),
                 at::empty({r, S * g}, W0.options()), at::zeros({S * g, c}, W0.options())};
  const at::Tensor ar = at::arange(g, st.groups.options());
  at::Tensor col_removed = at::zeros({c}, st.removed.options());
  at::Tensor act_cols = at::arange(c, st.groups.options());
  at::Tensor err = at::full({1}, static_cast<int64_t>(INT_MAX), st.groups.options());
  int64_t pending = 0;  // structures removed since the last flush (known on the host)
  for (int64_t s = 0; s < S; ++s) {
    group_step(st, h, col_removed, act_cols, err, g, s);
    ++pending;
    if (st.b + g > cap && s < S - 1) {
      flush_groups(st, g, pending);
      pending = 0;
      col_removed = at::zeros({st.Hinv.size(0)}, col_removed.options());
      act_cols = (st.groups.view({-1, 1}) * g + ar.view({1, -1})).view({-1});
    }
  }
  at::Tensor losses = h.step_loss.cumsum(0);
  raise_after_loop(err, losses, "a pivot block of H^-1 lost positive definiteness");
  return {h.order, losses, h.Uout, h.Rout, W0, setup.damp_used};
}

ObsOutput greedy_obs_cuda(const at::Tensor& W, const at::Tensor& H, int64_t g, double damp, int64_t block) {
  ZIPLM_CHECK_SAME_DEVICE(W, H, "W", "H");
  const c10::cuda::CUDAGuard guard(W.device());
  if (g > 1 && !group_kernel_fits(g, W.element_size(), W.device().index())) {
    return greedy_obs_generic(W, H, g, damp, block);  // ATen fallback (see the top of this file)
  }
  ObsSetup setup = greedy_obs_prepare(W, H, g, damp, block);
  if (g > 1) return greedy_obs_cuda_groups(setup, g, block);
  return AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "greedy_obs_cuda",
                                    [&] { return greedy_obs_cuda_columns<scalar_t>(setup, block); });
}

ObsOutput greedy_obs_generic_cuda(const at::Tensor& W, const at::Tensor& H, int64_t g, double damp, int64_t block) {
  ZIPLM_CHECK_SAME_DEVICE(W, H, "W", "H");
  const c10::cuda::CUDAGuard guard(W.device());
  return greedy_obs_generic(W, H, g, damp, block);
}

}  // namespace
}  // namespace ziplm

TORCH_LIBRARY_IMPL(ziplm, CUDA, m) {
  m.impl("greedy_obs", &ziplm::greedy_obs_cuda);
  m.impl("greedy_obs_generic", &ziplm::greedy_obs_generic_cuda);
}
