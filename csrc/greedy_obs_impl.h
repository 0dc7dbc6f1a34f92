// Greedy structured OBS with lazy, row-block batched downdates (device-generic ATen code).
//
// Notation (see shared ZIPLM.md §2): W is (r, c), H = X^T X is (c, c), structures are groups M of
// g consecutive columns, B_M = (H^-1)_MM. Each step removes the group with the least saliency
//   rho_M = tr(W_M B_M^-1 W_M^T),
// updates W <- W - W_M B_M^-1 (H^-1)_M,:  and downdates H^-1 <- H^-1 - (H^-1)_:,M B_M^-1 (H^-1)_M,: .
//
// With L L^T = B_M, G = (H^-1)_:,M L^-T (c x g) and U = W_M L^-T (r x g) both updates are rank-g:
//   W <- W - U G^T,  H^-1 <- H^-1 - G G^T,  rho_M = ||U||_F^2.
// Instead of one memory pass over H^-1 (c^2) per step we keep the applied Hinv_A and W_A plus the
// pending (G, U) of the current block, and only maintain what selection needs:
//   D_K = (H^-1)_KK   (diagonal g x g blocks of the current inverse),
//   N_K = W_K^T W_K   (diagonal g x g blocks of the current weight Gram matrix),
// so that rho_K = tr(D_K^-1 N_K). Every `block` pending columns we apply the pending updates with
// two matrix-matrix products, drop the removed columns (the active set shrinks) and recompute D, N
// exactly, which also bounds float32 drift.
//
// Compact history: with U_s, G_s of step s scattered to the original columns,
//   W_after_k = W0 - U[:, :k g] R[:k g, :]   (R = G^T), removed columns exactly zero.
#pragma once
#include <tuple>
#include "damped_inverse_impl.h"

namespace ziplm {

using at::indexing::Slice;

struct ObsState {
  at::Tensor Hinv;     // (m, m) applied inverse over the active columns
  at::Tensor W;        // (r, m) applied weights over the active columns
  at::Tensor G, U;     // (m, cap), (r, cap) pending factors; first `b` columns valid
  at::Tensor D, N;     // (Sa, g, g) current diagonal blocks of H^-1 and W^T W
  at::Tensor removed;  // (Sa,) bool, removed since the last flush
  at::Tensor groups;   // (Sa,) long, original group index of each active group
  int64_t b = 0;
};

// Diagonal g x g blocks of a (m, m) matrix, m = S*g  ->  (S, g, g).
inline at::Tensor diag_blocks(const at::Tensor& A, int64_t g) {
  const int64_t S = A.size(0) / g;
  return A.view({S, g, S, g}).diagonal(0, 0, 2).permute({2, 0, 1}).contiguous();
}

// W_K^T W_K for every group K of W (r, S*g)  ->  (S, g, g).
inline at::Tensor gram_blocks(const at::Tensor& W, int64_t g) {
  const int64_t S = W.size(1) / g;
  at::Tensor Wg = W.view({W.size(0), S, g}).permute({1, 2, 0});  // (S, g, r)
  return at::bmm(Wg, Wg.transpose(1, 2));
}

inline void refresh_blocks(ObsState& st, int64_t g) {
  if (g == 1) {
    st.D = st.Hinv.diagonal().clone().view({-1, 1, 1});
    st.N = st.W.square().sum(0).view({-1, 1, 1});
  } else {
    st.D = diag_blocks(st.Hinv, g);
    st.N = gram_blocks(st.W, g);
  }
}

// Apply the pending rank-b update and drop the removed groups from the active set.
inline void flush(ObsState& st, int64_t g) {
  at::Tensor keep_groups = (~st.removed).nonzero().squeeze(1);
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

// Saliency of every active group; removed groups get +inf.
inline at::Tensor saliency(const ObsState& st, int64_t g) {
  at::Tensor rho;
  if (g == 1) {
    rho = (st.N / st.D).view({-1});
  } else {
    // Removed groups' D is (numerically) singular: give them the identity before factoring.
    at::Tensor eye = at::eye(g, st.D.options());
    at::Tensor D = at::where(st.removed.view({-1, 1, 1}), eye, st.D);
    at::Tensor L = at::linalg_cholesky(D);
    rho = at::cholesky_solve(st.N, L).diagonal(0, -2, -1).sum(-1);
  }
  return rho.masked_fill(st.removed, std::numeric_limits<double>::infinity());
}

using ObsOutput = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct ObsSetup {
  at::Tensor Hinv0;      // (c, c) inverse of the damped Hessian, W's dtype
  at::Tensor W0;         // (r, c) weights with dead input columns zeroed
  at::Tensor damp_used;  // scalar, relative damping actually used
};

// Argument checks, damped inverse and dead-input handling shared by every backend.
inline ObsSetup greedy_obs_prepare(const at::Tensor& W_in, const at::Tensor& H_in, int64_t g, double damp,
                                   int64_t block) {
  ZIPLM_CHECK_FLOAT(W_in, "W");
  ZIPLM_CHECK_DIM(W_in, 2, "W");
  ZIPLM_CHECK_DIM(H_in, 2, "H");
  ZIPLM_CHECK_SAME_DEVICE(W_in, H_in, "W", "H");
  const int64_t c = W_in.size(1);
  ZIPLM_CHECK(W_in.size(0) > 0 && c > 0, "W is empty, shape ", W_in.sizes());
  ZIPLM_CHECK(H_in.size(0) == c && H_in.size(1) == c, "H must be (", c, ", ", c, ") to match W's ", c,
              " columns, got ", H_in.sizes());
  ZIPLM_CHECK(g >= 1 && c % g == 0, "group_size ", g, " does not divide the ", c, " columns of W");
  ZIPLM_CHECK(block >= 1, "block_size must be >= 1, got ", block);
  ZIPLM_CHECK_FINITE(W_in, "W");
  auto [Hinv0, damp_used, dead] = damped_inverse_impl(H_in.to(W_in.scalar_type()), damp, 8);
  at::Tensor W0 = W_in.contiguous().clone();
  W0.masked_fill_(dead.view({1, c}).to(W0.device()), 0.0);  // dead inputs carry no signal
  return {Hinv0.contiguous(), W0, damp_used.max()};
}

inline void check_losses(const at::Tensor& losses) {
  ZIPLM_CHECK(at::isfinite(losses).all().item<bool>(),
              "greedy OBS produced non-finite losses (numerical breakdown; use float64 or a larger damp)");
}

// Device-generic greedy loop (ATen ops only). On CUDA the flush's `nonzero` synchronises once per block,
// and a failed pivot block shows up only in the final loss check.
inline ObsOutput greedy_obs_generic(const at::Tensor& W_in, const at::Tensor& H_in, int64_t g, double damp,
                                    int64_t block) {
  ObsSetup setup = greedy_obs_prepare(W_in, H_in, g, damp, block);
  at::Tensor W0 = setup.W0;
  const int64_t r = W0.size(0), c = W0.size(1);
  const int64_t S = c / g;

  ObsState st;
  st.Hinv = setup.Hinv0;
  st.W = W0.clone();
  const int64_t cap = std::max(block, g);  // pending columns held before a flush
  st.G = at::zeros({c, cap}, W0.options());
  st.U = at::zeros({r, cap}, W0.options());
  st.removed = at::zeros({S}, W0.options().dtype(at::kBool));
  st.groups = at::arange(S, W0.options().dtype(at::kLong));
  refresh_blocks(st, g);

  at::Tensor order = at::empty({S}, st.groups.options());
  at::Tensor step_loss = at::empty({S}, W0.options());
  at::Tensor Uout = at::empty({r, S * g}, W0.options());
  at::Tensor Rout = at::zeros({S * g, c}, W0.options());
  at::Tensor ar = at::arange(g, st.groups.options());
  at::Tensor col_removed = at::zeros({c}, st.removed.options());  // active-space mask since last flush
  at::Tensor act_cols = at::arange(c, st.groups.options());          // original index of each active column

  for (int64_t s = 0; s < S; ++s) {
    at::Tensor k = saliency(st, g).argmin().view({1});  // stays on the device
    at::Tensor cols = k * g + ar;                         // (g,) active-space columns

    at::Tensor Gp = st.G.narrow(1, 0, st.b), Up = st.U.narrow(1, 0, st.b);
    at::Tensor Gsel = Gp.index_select(0, cols);                         // (g, b)
    at::Tensor V = st.Hinv.index_select(0, cols).t() - at::mm(Gp, Gsel.t());  // (m, g) = H^-1[:, M] (symmetric)
    at::Tensor Wc = st.W.index_select(1, cols) - at::mm(Up, Gsel.t());     // (r, g) = W[:, M]
    at::Tensor Bm = V.index_select(0, cols);                            // (g, g)
    Bm = 0.5 * (Bm + Bm.t());
    auto [L, info] = at::linalg_cholesky_ex(Bm);
    if (L.device().is_cpu()) {
      ZIPLM_CHECK(info.item<int64_t>() == 0, "numerical breakdown at step ", s,
                  ": a pivot block of H^-1 lost positive definiteness (use float64 or a larger damp)");
    }
    // Gn = V L^-T, Un = Wc L^-T. L is only g x g: invert it once and use matrix products.
    at::Tensor Linv_t = g == 1 ? L.reciprocal()
                               : at::linalg_solve_triangular(L, at::eye(g, L.options()), /*upper=*/false).t();
    at::Tensor Gn = at::mm(V, Linv_t);   // (m, g)
    at::Tensor Un = at::mm(Wc, Linv_t);  // (r, g)
    col_removed.index_fill_(0, cols, true);
    Gn.masked_fill_(col_removed.view({-1, 1}), 0.0);  // removed rows are exactly 0

    // T = W_s^T Un, then the D and N block downdates.
    at::Tensor T = at::mm(st.W.t(), Un) - at::mm(Gp, at::mm(Up.t(), Un));  // (m, g)
    at::Tensor UU = at::mm(Un.t(), Un);                                      // (g, g)
    const int64_t Sa = st.D.size(0);
    at::Tensor Gk = Gn.view({Sa, g, g}), Tk = T.view({Sa, g, g});
    if (g == 1) {
      st.D.sub_(Gk.square());
      st.N.add_(Gk * (Gk * UU.view({1, 1, 1}) - 2.0 * Tk));
    } else {
      st.D.sub_(at::bmm(Gk, Gk.transpose(1, 2)));
      at::Tensor GT = at::bmm(Gk, Tk.transpose(1, 2));
      st.N.sub_(GT + GT.transpose(1, 2) - at::bmm(at::matmul(Gk, UU), Gk.transpose(1, 2)));
    }
    st.removed.index_fill_(0, k, true);

    st.G.narrow(1, st.b, g).copy_(Gn);
    st.U.narrow(1, st.b, g).copy_(Un);
    st.b += g;

    // History in original coordinates.
    at::Tensor orig_group = st.groups.index_select(0, k);
    order.narrow(0, s, 1).copy_(orig_group);
    step_loss.narrow(0, s, 1).copy_(Un.square().sum().view({1}));
    Uout.narrow(1, s * g, g).copy_(Un);
    Rout.narrow(0, s * g, g).index_copy_(1, act_cols, Gn.t());

    if (st.b + g > cap && s < S - 1) {
      flush(st, g);
      col_removed = at::zeros({st.Hinv.size(0)}, col_removed.options());
      act_cols = (st.groups.view({-1, 1}) * g + ar.view({1, -1})).view({-1});
    }
  }
  at::Tensor losses = step_loss.cumsum(0);
  check_losses(losses);
  return {order, losses, Uout, Rout, W0, setup.damp_used};
}

}  // namespace ziplm
