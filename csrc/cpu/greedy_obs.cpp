// CPU greedy structured OBS (fused kernels; the device-generic loop in greedy_obs_impl.h stays
// registered as greedy_obs_generic for the tests). The damped inverse is the shared Cholesky one
// of damped_inverse_impl.h (LAPACK potrf + potri through ATen).
//
// Single columns (FFN neurons, thousands of steps): per step one GEMV over the applied W (which
// stays in the last-level cache), O(m * pending) vector work, and no small ATen calls except the
// GEMVs; the pending rank-1 updates are applied every `block` steps with two GEMMs.
//
// Groups (attention heads, g = head_dim, a few dozen steps): every step is GEMM-shaped already, so
// the updates are applied at once, without pending factors. The active groups are kept as a
// prefix of W's columns and H^-1's rows/columns (the removed group's slot is refilled by the last
// active one), so the rank-g updates run on contiguous prefixes with no compaction copies, and the
// saliencies of all groups come from one batched solve: with L_K L_K^T = (H^-1)_KK,
//   Y_K = W_K L_K^-T,  rho_K = ||Y_K||_F^2 = tr(W_K (H^-1)_KK^-1 W_K^T),
// and the chosen group's Y_K is its U factor (ZIPLM.md section 2 notation).
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

#include "../greedy_obs_impl.h"

namespace ziplm {
namespace {

// A[keep][:, keep] in one pass (rows in parallel), instead of two index_select copies.
template <typename T>
at::Tensor gather_square(const at::Tensor& A, const std::vector<int64_t>& keep) {
  const int64_t m = A.size(0), k = static_cast<int64_t>(keep.size());
  at::Tensor out = at::empty({k, k}, A.options());
  const T* src = A.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, k, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = src + keep[i] * m;
      T* o = dst + i * k;
      for (int64_t j = 0; j < k; ++j) o[j] = row[keep[j]];
    }
  });
  return out;
}

template <typename T>
ObsOutput greedy_obs_cpu_columns(const ObsSetup& setup, int64_t block) {
  const at::Tensor& W0 = setup.W0;
  const int64_t r = W0.size(0), c = W0.size(1);
  const auto opt = W0.options();
  const int64_t cap = std::max<int64_t>(block, 1);

  at::Tensor Hinv = setup.Hinv0;  // (m, m) applied, active columns only (never updated in place)
  at::Tensor W = W0.clone();              // (r, m) applied
  at::Tensor G = at::zeros({cap, c}, opt);  // pending g_p as rows (active coordinates)
  at::Tensor U = at::zeros({cap, r}, opt);  // pending u_p as rows
  std::vector<int64_t> act(c);              // original column of each active coordinate
  for (int64_t i = 0; i < c; ++i) act[i] = i;
  std::vector<T> d(c), n(c), v(c), t(c), w(r), coef(cap);
  std::vector<char> removed(c, 0);

  at::Tensor order = at::empty({c}, opt.dtype(at::kLong));
  at::Tensor step_loss = at::empty({c}, opt);
  at::Tensor Uout = at::empty({r, c}, opt);
  at::Tensor Rout = at::zeros({c, c}, opt);
  int64_t* order_p = order.data_ptr<int64_t>();
  T* loss_p = step_loss.data_ptr<T>();
  T* Uout_p = Uout.data_ptr<T>();
  T* Rout_p = Rout.data_ptr<T>();

  auto refresh = [&](int64_t m) {  // exact diag(H^-1) and column norms of W from the applied state
    const T* h = Hinv.data_ptr<T>();
    for (int64_t k = 0; k < m; ++k) d[k] = h[k * m + k];
    at::Tensor nn = W.square().sum(0);
    std::copy(nn.data_ptr<T>(), nn.data_ptr<T>() + m, n.begin());
  };
  int64_t m = c, b = 0;
  refresh(m);

  for (int64_t s = 0; s < c; ++s) {
    // 1. least saliency ||W_:,j||^2 / (H^-1)_jj among the active columns
    int64_t j = -1;
    T best = std::numeric_limits<T>::infinity();
    for (int64_t k = 0; k < m; ++k) {
      if (removed[k]) continue;
      const T rho = n[k] / d[k];
      if (j < 0 || rho < best) best = rho, j = k;
    }
    // 2. v = H^-1[:, j] = Hinv_A[j, :] - sum_p G[p, j] G[p, :]  (symmetric: read row j)
    at::Tensor Gp = G.narrow(0, 0, b).narrow(1, 0, m), Up = U.narrow(0, 0, b);
    const T* Gptr = G.data_ptr<T>();
    for (int64_t p = 0; p < b; ++p) coef[p] = Gptr[p * c + j];
    at::Tensor coef_t = at::from_blob(coef.data(), {b}, opt);
    at::Tensor vt = Hinv.select(0, j).clone();
    at::Tensor wt = W.select(1, j).clone();
    if (b > 0) {
      vt.sub_(at::mv(Gp.t(), coef_t));
      wt.sub_(at::mv(Up.t(), coef_t));
    }
    const T* vp = vt.data_ptr<T>();
    const T* wp = wt.data_ptr<T>();
    const T piv = vp[j];
    ZIPLM_CHECK(piv > 0 && std::isfinite(static_cast<double>(piv)), "numerical breakdown at step ", s,
                ": pivot (H^-1)_jj = ", static_cast<double>(piv), " (use float64 or a larger damp)");
    const T scale = T(1) / std::sqrt(piv);
    // 3. u = W_:,j / sqrt(p), g = v / sqrt(p), step loss ||u||^2
    T* urow = U.data_ptr<T>() + b * r;
    T uu = 0;
    for (int64_t i = 0; i < r; ++i) {
      urow[i] = wp[i] * scale;
      uu += urow[i] * urow[i];
      Uout_p[i * c + s] = urow[i];
    }
    removed[j] = 1;
    T* grow = G.data_ptr<T>() + b * c;
    for (int64_t k = 0; k < m; ++k) grow[k] = removed[k] ? T(0) : vp[k] * scale;
    // 4. t = W_s^T u = W_A^T u - G_p^T (U_p u)
    at::Tensor u_t = U.select(0, b);
    at::Tensor tt = at::mv(W.t(), u_t);
    if (b > 0) tt.sub_(at::mv(Gp.t(), at::mv(Up, u_t)));
    const T* tp = tt.data_ptr<T>();
    // 5. downdate diag(H^-1) and the column norms of W; record history in original columns
    T* Rrow = Rout_p + s * c;
    for (int64_t k = 0; k < m; ++k) {
      const T gk = grow[k];
      d[k] -= gk * gk;
      n[k] += gk * (gk * uu - T(2) * tp[k]);
      Rrow[act[k]] = gk;
    }
    order_p[s] = act[j];
    loss_p[s] = uu;
    ++b;

    // 6. apply the pending block with two GEMMs and drop removed columns
    if (b == cap && s < c - 1) {
      std::vector<int64_t> keep;
      keep.reserve(m);
      for (int64_t k = 0; k < m; ++k)
        if (!removed[k]) keep.push_back(k);
      at::Tensor keep_t = at::from_blob(keep.data(), {(int64_t)keep.size()}, opt.dtype(at::kLong)).clone();
      at::Tensor Gk = G.narrow(0, 0, b).index_select(1, keep_t);  // (b, m')
      Hinv = gather_square<T>(Hinv, keep);
      Hinv.addmm_(Gk.t(), Gk, 1.0, -1.0);
      W = W.index_select(1, keep_t);
      W.addmm_(U.narrow(0, 0, b).t(), Gk, 1.0, -1.0);
      for (size_t k = 0; k < keep.size(); ++k) act[k] = act[keep[k]];
      m = (int64_t)keep.size();
      std::fill(removed.begin(), removed.begin() + m, 0);
      G.zero_();
      b = 0;
      refresh(m);
    }
  }
  at::Tensor losses = step_loss.cumsum(0);
  check_losses(losses);
  return {order, losses, Uout, Rout, W0, setup.damp_used};
}

// Saliencies of the Sa active groups (slots) of the prefix: returns Y (Sa, r, g) = W_K L_K^-T and
// LinvT (Sa, g, g) = L_K^-T; fills rho (Sa) with ||Y_K||_F^2.
template <typename T>
std::pair<at::Tensor, at::Tensor> group_saliency(const at::Tensor& Hinv, const at::Tensor& W, int64_t Sa, int64_t g,
                                                 int64_t step, std::vector<T>& rho) {
  const int64_t c = Hinv.size(1), r = W.size(0), ldw = W.size(1);
  at::Tensor D = Hinv.as_strided({Sa, g, g}, {g * c + g, c, 1});  // diagonal blocks of the prefix
  auto [L, info] = at::linalg_cholesky_ex(D);
  ZIPLM_CHECK(info.max().item<int64_t>() == 0, "numerical breakdown at step ", step,
              ": a pivot block of H^-1 lost positive definiteness (use float64 or a larger damp)");
  at::Tensor eye = at::eye(g, D.options()).expand({Sa, g, g});
  at::Tensor LinvT = at::linalg_solve_triangular(L, eye, /*upper=*/false).transpose(1, 2);
  at::Tensor Y = at::bmm(W.as_strided({Sa, r, g}, {g, ldw, 1}), LinvT);  // (Sa, r, g)
  const T* y = Y.data_ptr<T>();
  at::parallel_for(0, Sa, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      T acc = 0;
      for (int64_t i = 0; i < r * g; ++i) acc += y[k * r * g + i] * y[k * r * g + i];
      rho[k] = acc;
    }
  });
  return {Y, LinvT};
}

// Moves the slot `last` into slot k of the (m)-prefix of W's columns, G's rows and H^-1.
void refill_slot(at::Tensor& W, at::Tensor& Hinv, at::Tensor& G, int64_t k, int64_t last, int64_t g, int64_t m) {
  if (k == last) return;
  W.narrow(1, k * g, g).copy_(W.narrow(1, last * g, g));
  G.narrow(0, k * g, g).copy_(G.narrow(0, last * g, g));
  Hinv.narrow(0, k * g, g).narrow(1, 0, m).copy_(Hinv.narrow(0, last * g, g).narrow(1, 0, m));
  Hinv.narrow(0, 0, m).narrow(1, k * g, g).copy_(Hinv.narrow(0, 0, m).narrow(1, last * g, g));
}

template <typename T>
ObsOutput greedy_obs_cpu_groups(const ObsSetup& setup, int64_t g) {
  const at::Tensor& W0 = setup.W0;
  const int64_t r = W0.size(0), c = W0.size(1), S = c / g;
  const auto opt = W0.options();
  at::Tensor Hinv = setup.Hinv0;  // (c, c); the active (m, m) prefix is updated in place
  at::Tensor W = W0.clone();      // (r, c); the active (r, m) prefix
  std::vector<int64_t> slot_group(S);
  for (int64_t k = 0; k < S; ++k) slot_group[k] = k;
  std::vector<T> rho(S);

  at::Tensor order = at::empty({S}, opt.dtype(at::kLong));
  at::Tensor step_loss = at::empty({S}, opt);
  at::Tensor Uout = at::empty({r, S * g}, opt);
  at::Tensor Rout = at::zeros({S * g, c}, opt);
  T* Rout_p = Rout.data_ptr<T>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t Sa = S - s, m = Sa * g;
    auto [Y, LinvT] = group_saliency<T>(Hinv, W, Sa, g, s, rho);
    int64_t k = 0;  // least saliency; ties to the lowest original group, as argmin in the oracle
    for (int64_t q = 1; q < Sa; ++q)
      if (rho[q] < rho[k] || (rho[q] == rho[k] && slot_group[q] < slot_group[k])) k = q;
    // G = H^-1[:, M] L^-T (m, g): the rank-g factor of the downdates
    at::Tensor G = at::mm(Hinv.narrow(0, 0, m).narrow(1, k * g, g), LinvT.select(0, k));
    at::Tensor U = Y.select(0, k);  // (r, g) = W_M L^-T
    order.data_ptr<int64_t>()[s] = slot_group[k];
    step_loss.data_ptr<T>()[s] = rho[k];
    Uout.narrow(1, s * g, g).copy_(U);
    const T* Gp = G.data_ptr<T>();
    for (int64_t q = 0; q < Sa; ++q) {  // history rows in original columns; the removed group's stay 0
      if (q == k) continue;
      const int64_t col0 = slot_group[q] * g;
      for (int64_t i = 0; i < g; ++i)
        for (int64_t j = 0; j < g; ++j) Rout_p[(s * g + i) * c + col0 + j] = Gp[(q * g + j) * g + i];
    }
    refill_slot(W, Hinv, G, k, Sa - 1, g, m);
    slot_group[k] = slot_group[Sa - 1];
    const int64_t mk = m - g;  // the remaining groups now fill the (mk)-prefix
    if (mk > 0) {
      at::Tensor Gk = G.narrow(0, 0, mk);
      W.narrow(1, 0, mk).addmm_(U, Gk.t(), 1.0, -1.0);
      Hinv.narrow(0, 0, mk).narrow(1, 0, mk).addmm_(Gk, Gk.t(), 1.0, -1.0);
    }
  }
  at::Tensor losses = step_loss.cumsum(0);
  check_losses(losses);
  return {order, losses, Uout, Rout, W0, setup.damp_used};
}

ObsOutput greedy_obs_cpu(const at::Tensor& W, const at::Tensor& H, int64_t g, double damp, int64_t block) {
  ObsSetup setup = greedy_obs_prepare(W, H, g, damp, block);
  return AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "greedy_obs_cpu", [&] {
    return g == 1 ? greedy_obs_cpu_columns<scalar_t>(setup, block) : greedy_obs_cpu_groups<scalar_t>(setup, g);
  });
}

}  // namespace
}  // namespace ziplm

TORCH_LIBRARY_IMPL(ziplm, CPU, m) {
  m.impl("greedy_obs", &ziplm::greedy_obs_cpu);
  m.impl("greedy_obs_generic", &ziplm::greedy_obs_generic);
}
