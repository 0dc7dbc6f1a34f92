"""Native ops against their pure-PyTorch oracles and the OBS identities.

float64 comparisons are tight; float32 results must stay within a small multiple of the error that
the float32 oracle itself makes against the float64 oracle (the flash-attention style budget).
"""

import pytest
import torch

from ziplm_ext import native
from ziplm_ext.native import ops
from ziplm_ext.native import reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _device(dev):
    if dev == "cuda" and not native.cuda_kernels_built():
        pytest.skip("CUDA kernels were not built into this install")
    return torch.device(dev)


def _problem(r, c, tokens, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    # Correlated inputs, as real activations are: the greedy order then matters.
    mix = torch.eye(c, dtype=torch.float64) + 0.5 * torch.randn(c, c, generator=gen, dtype=torch.float64) / c**0.5
    X = torch.randn(tokens, c, generator=gen, dtype=torch.float64) @ mix
    W = torch.randn(r, c, generator=gen, dtype=torch.float64)
    return X.to(device), W.to(dtype=dtype, device=device), (X.T @ X).to(device)


def test_native_extension_is_built():
    assert native.native_available(), "the CPU extension must always be built"


# ---------------------------------------------------------------- hessian_accumulate
@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("hdtype", [torch.float64, torch.float32])
def test_hessian_matches_oracle_with_mask(dev, hdtype):
    device = _device(dev)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(3, 17, 24, generator=gen).to(device)
    mask = torch.rand(3, 17, generator=gen).to(device) > 0.3
    H, Href = (torch.zeros(24, 24, dtype=hdtype, device=device) for _ in range(2))
    n = ops.hessian_accumulate(H, X, mask)
    n_ref = ref.hessian_accumulate(Href, X, mask)
    assert n == n_ref == int(mask.sum())
    tol = 1e-12 if hdtype == torch.float64 else 1e-5
    torch.testing.assert_close(H, Href, rtol=tol, atol=tol)
    # running sum: a second call adds to H, the masked-out rows never contribute
    n2 = ops.hessian_accumulate(H, X)
    Xk = X.reshape(-1, 24)[mask.reshape(-1)].to(hdtype)
    Xa = X.reshape(-1, 24).to(hdtype)
    torch.testing.assert_close(H, Xk.T @ Xk + Xa.T @ Xa, rtol=tol, atol=tol)
    assert n2 == 51


def test_hessian_bad_input():
    H = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="X has 5 features"):
        ops.hessian_accumulate(H, torch.randn(3, 5))
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.hessian_accumulate(H, torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.hessian_accumulate(H, torch.tensor([[1.0, float("nan"), 0, 0]]))
    with pytest.raises(ValueError, match="mask has"):
        ops.hessian_accumulate(H, torch.randn(3, 4), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="square"):
        ops.hessian_accumulate(torch.zeros(4, 3, dtype=torch.float64), torch.randn(3, 4))
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
        ops.hessian_accumulate(H, torch.randn(3, 4, device="meta"))
    assert torch.count_nonzero(H) == 0, "a rejected call must not modify H"


# ---------------------------------------------------------------- damped_inverse
@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("shape", [(40, 40), (6, 16, 16)])
def test_damped_inverse_matches_oracle_and_inverts(dev, shape):
    device = _device(dev)
    gen = torch.Generator().manual_seed(2)
    g = shape[-1]
    X = torch.randn(*shape[:-2], 3 * g, g, generator=gen, dtype=torch.float64)
    H = (X.transpose(-1, -2) @ X).to(device)
    Hinv, used, dead = ops.damped_inverse(H, 0.01)
    Hinv_ref, used_ref, dead_ref = ref.damped_inverse(H.cpu(), 0.01)
    torch.testing.assert_close(Hinv.cpu(), Hinv_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(used, used_ref) and torch.equal(dead.cpu(), dead_ref)
    # identity: Hinv (H + 0.01 mean(diag) I) = I
    Hb = H.reshape(-1, g, g)
    damped = Hb + 0.01 * Hb.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(g, dtype=H.dtype, device=device)
    eye = torch.eye(g, dtype=H.dtype, device=device).expand_as(damped)
    torch.testing.assert_close(Hinv.reshape(-1, g, g) @ damped, eye, rtol=0, atol=1e-10)
    # float32 within budget of the float64 result
    Hinv32, *_ = ops.damped_inverse(H.float(), 0.01)
    err32 = (Hinv32.double() - Hinv).abs().max() / Hinv.abs().max()
    assert err32 < 1e-4


def test_damped_inverse_escalates_and_reports_dead():
    # singular PSD block (rank 1) needs damping; a dead input (zero row/col) gets H_ii = 1
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    singular = torch.outer(v, v)
    good = torch.eye(3, dtype=torch.float64) * 2
    dead = torch.diag(torch.tensor([1.0, 0.0, 4.0], dtype=torch.float64))
    Hinv, used, deadmask = ops.damped_inverse(torch.stack([good, singular, dead]), 0.0)
    assert used[0] == 0 and used[1] > 0 and used[2] == 0
    assert deadmask.tolist() == [[False] * 3, [False] * 3, [False, True, False]]
    torch.testing.assert_close(Hinv[2].diagonal(), torch.tensor([1.0, 1.0, 0.25], dtype=torch.float64))
    assert torch.isfinite(Hinv).all()


def test_damped_inverse_rejects_unfixable():
    indefinite = torch.tensor([[1.0, 10.0], [10.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite even with relative damping 1"):
        ops.damped_inverse(indefinite, 0.01)
    with pytest.raises(ValueError, match="negative diagonal"):
        ops.damped_inverse(torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64)), 0.01)
    with pytest.raises(ValueError, match="not symmetric"):
        ops.damped_inverse(torch.tensor([[2.0, 1.0], [0.0, 2.0]], dtype=torch.float64), 0.01)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.damped_inverse(torch.tensor([[float("inf")]], dtype=torch.float64), 0.01)
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.damped_inverse(torch.eye(3, dtype=torch.int32), 0.01)


# ---------------------------------------------------------------- greedy_obs
def _ls_error(X, W0, keep_cols):
    """min over W_K of ||X W0^T - X_K W_K^T||^2 and the minimiser (the kept columns' optimum)."""
    H = X.T @ X
    K = keep_cols
    if len(K) == 0:
        return float(((X @ W0.T) ** 2).sum()), None
    WK = torch.linalg.solve(H[K][:, K], H[K] @ W0.T).T
    return float(((X @ W0.T - X[:, K] @ WK.T) ** 2).sum()), WK


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("g,r,c,block", [(1, 12, 40, 8), (1, 7, 33, 5), (4, 10, 32, 8), (8, 6, 48, 16)])
def test_greedy_obs_float64_matches_oracle(dev, generic, g, r, c, block):
    device = _device(dev)
    X, W, H = _problem(r, c, tokens=4 * c, seed=g * 100 + c, device=device)
    res = ops.greedy_obs(W, H, g, damp=0.0, block_size=block, generic=generic)
    want = ref.greedy_obs(W.cpu(), H.cpu(), g, damp=0.0)
    assert torch.equal(res.order.cpu(), want.order)
    torch.testing.assert_close(res.losses.cpu(), want.losses, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(res.U.cpu(), want.U, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(res.R.cpu(), want.R, rtol=1e-9, atol=1e-10)
    for k in range(0, c // g + 1, max(1, c // g // 5)):
        torch.testing.assert_close(res.weights(k).cpu(), want.weights(k), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("g", [1, 4])
def test_greedy_obs_identities(g):
    """Loss = direct reconstruction error; kept weights = least-squares optimum; H^-1 rows = inverse
    of H restricted to the columns still present; each step is the greedy minimum."""
    r, c = 9, 24
    X, W, H = _problem(r, c, tokens=200, seed=7 + g)
    res = ops.greedy_obs(W, H, g, damp=0.0, block_size=6)
    S = c // g
    removed = []
    for k in range(S + 1):
        Wk = res.weights(k)
        direct = float(((X @ (Wk - W).T) ** 2).sum())
        assert res.loss(k) == pytest.approx(direct, rel=1e-9, abs=1e-9)
        keep_cols = [j for j in range(c) if j // g not in removed]
        err, WK = _ls_error(X, W, keep_cols)
        assert res.loss(k) == pytest.approx(err, rel=1e-9, abs=1e-9)
        if WK is not None:
            torch.testing.assert_close(Wk[:, keep_cols], WK, rtol=1e-8, atol=1e-9)
            assert torch.count_nonzero(Wk[:, [j for j in range(c) if j not in keep_cols]]) == 0
        if k == S:
            break
        # the H^-1 used at step k: R rows = (H_AA)^-1[M, :] L^-T restricted to the active set A
        A = keep_cols
        HAinv = torch.linalg.inv(H[A][:, A])
        M = [A.index(j) for j in range(res.order[k] * g, res.order[k] * g + g)]
        L = torch.linalg.cholesky(HAinv[M][:, M])
        rows = torch.linalg.solve_triangular(L, HAinv[M], upper=False)
        rows[:, M] = 0
        torch.testing.assert_close(res.R[k * g:(k + 1) * g][:, A], rows, rtol=1e-8, atol=1e-10)
        # greedy: the removed structure gives the least LS error among the candidates
        cands = [s for s in range(S) if s not in removed]
        errs = {s: _ls_error(X, W, [j for j in keep_cols if j // g != s])[0] for s in cands}
        assert errs[int(res.order[k])] == pytest.approx(min(errs.values()), rel=1e-9)
        removed.append(int(res.order[k]))


@pytest.mark.parametrize("g", [1, 8])
def test_greedy_obs_float32_error_budget(g):
    r, c = 32, 128
    X, W64, H = _problem(r, c, tokens=4 * c, seed=3)
    exact = ref.greedy_obs(W64, H, g, damp=0.01)
    oracle32 = ref.greedy_obs(W64.float(), H, g, damp=0.01)
    native32 = ops.greedy_obs(W64.float(), H, g, damp=0.01, block_size=16)
    # compare the loss curves (orders may differ at near ties in float32)
    scale = exact.losses[-1]
    err_oracle = ((oracle32.losses.double() - exact.losses).abs().max() / scale).item()
    err_native = ((native32.losses.double() - exact.losses).abs().max() / scale).item()
    assert err_native <= 10 * err_oracle + 1e-5, (err_native, err_oracle)


def test_greedy_obs_dead_inputs_and_damping():
    X, W, H = _problem(6, 16, tokens=64, seed=5)
    H[3, :] = 0
    H[:, 3] = 0
    res = ops.greedy_obs(W, H, 1, damp=0.01)
    assert int(res.order[0]) == 3, "a dead input carries no signal and is removed first at zero cost"
    assert res.loss(1) == 0.0 and torch.count_nonzero(res.W0[:, 3]) == 0
    # loss equals tr(dW H_damped dW^T) with the damped H that was used
    Hd = H.clone()
    Hd[3, 3] = 1
    Hd += 0.01 * Hd.diagonal().mean() * torch.eye(16, dtype=H.dtype)
    for k in (4, 9, 16):
        dW = res.weights(k) - res.W0
        assert res.loss(k) == pytest.approx(float(torch.trace(dW @ Hd @ dW.T)), rel=1e-9)


def test_greedy_obs_compact_memory_is_small():
    # same aspect ratio as a BERT-base FFN down projection (768 x 3072), at 1/8 scale
    r, c = 96, 384
    _, W, H = _problem(r, c, tokens=2 * c, dtype=torch.float32, seed=9)
    res = ops.greedy_obs(W, H, 1)
    per_level_copies = 44 * W.numel() * W.element_size()
    assert res.nbytes() <= per_level_copies / 3


@pytest.mark.parametrize(
    "W,H,g,match",
    [
        (torch.randn(4, 6), torch.eye(6), 4, "does not divide"),
        (torch.randn(4, 6), torch.eye(5), 1, "must be \\(6, 6\\)"),
        (torch.ones(4, 6, dtype=torch.int64), torch.eye(6), 1, "float32 or float64"),
        (torch.full((4, 6), float("nan")), torch.eye(6), 1, "NaN or Inf"),
        (torch.randn(4, 6), torch.full((6, 6), float("inf")), 1, "NaN or Inf"),
        (torch.randn(4, 6), -torch.eye(6), 1, "negative diagonal"),
        (torch.randn(6), torch.eye(6), 1, "2-D"),
        (torch.randn(4, 2), torch.tensor([[1.0, 3.0], [3.0, 1.0]]), 1, "not positive definite"),
    ],
)
def test_greedy_obs_bad_input(W, H, g, match):
    with pytest.raises(ValueError, match=match):
        ops.greedy_obs(W, H, g)


@pytest.mark.parametrize("c", [300, 700])
def test_damped_inverse_large_matches_cholesky(c):
    """Layer-sized Hessians: float64 agrees with the Cholesky oracle, float32 stays within the
    oracle's own float32 error."""
    X, _, H = _problem(4, c, tokens=2 * c, seed=c)
    Hinv, used, dead = ops.damped_inverse(H, 0.01)
    Hinv_ref, used_ref, _ = ref.damped_inverse(H, 0.01)
    assert torch.equal(used, used_ref) and not dead.any()
    torch.testing.assert_close(Hinv, Hinv_ref, rtol=1e-9, atol=1e-9 * float(Hinv_ref.abs().max()))
    torch.testing.assert_close(Hinv, Hinv.T, rtol=1e-10, atol=1e-12 * float(Hinv_ref.abs().max()))
    err = lambda A: float((A.double() - Hinv_ref).abs().max() / Hinv_ref.abs().max())  # noqa: E731
    assert err(ops.damped_inverse(H.float(), 0.01)[0]) <= 10 * err(ref.damped_inverse(H.float(), 0.01)[0]) + 1e-6


def test_damped_inverse_large_escalates():
    """A rank-deficient layer-sized Hessian fails its first factorisation and is retried with more
    damping, exactly as the oracle is; the result inverts the damped matrix to Cholesky accuracy
    (a GEMM-only block-Schur inverse, tried for speed, misses this by 10^4: its error grows with
    the square of the condition number)."""
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(300, 100, generator=gen, dtype=torch.float64)
    H = A @ A.T  # rank 100 < 300
    Hinv, used, _ = ops.damped_inverse(H, 0.0)
    _, used_ref, _ = ref.damped_inverse(H, 0.0)
    assert float(used) > 0 and torch.equal(used, used_ref)
    Hd = H + float(used) * H.diagonal().mean() * torch.eye(300, dtype=H.dtype)
    torch.testing.assert_close(Hinv @ Hd, torch.eye(300, dtype=H.dtype), rtol=0, atol=1e-6)


@pytest.mark.parametrize("g,r,c", [(32, 40, 320), (64, 48, 384)])
def test_greedy_obs_heads_kernel_matches_oracle(g, r, c):
    """The fused CPU group kernel (prefix slots, batched saliency) at head sizes against the naive
    oracle in float64."""
    X, W, H = _problem(r, c, tokens=2 * c, seed=g + c)
    res = ops.greedy_obs(W, H, g, damp=0.01)
    want = ref.greedy_obs(W, H, g, damp=0.01)
    assert torch.equal(res.order, want.order)
    torch.testing.assert_close(res.losses, want.losses, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.U, want.U, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(res.R, want.R, rtol=1e-8, atol=1e-9)
    for k in (1, c // g // 2, c // g - 1):
        torch.testing.assert_close(res.weights(k), want.weights(k), rtol=1e-8, atol=1e-9)


def test_greedy_obs_heads_ties_go_to_the_lowest_group():
    """Dead groups (all-zero inputs) cost nothing; equal saliencies resolve to the lowest group
    index, as the oracle's argmin does, even after slots were refilled."""
    X, W, H = _problem(5, 24, tokens=96, seed=13)
    for grp in (1, 4):
        H[grp * 4:(grp + 1) * 4, :] = 0
        H[:, grp * 4:(grp + 1) * 4] = 0
    res = ops.greedy_obs(W, H, 4, damp=0.01)
    want = ref.greedy_obs(W, H, 4, damp=0.01)
    assert res.order[:2].tolist() == [1, 4] and torch.equal(res.order, want.order)
    torch.testing.assert_close(res.losses, want.losses, rtol=1e-9, atol=1e-12)
