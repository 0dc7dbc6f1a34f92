"""The hand-written CUDA kernels (csrc/cuda/) against their pure-PyTorch oracles and the OBS identities.

float64 comparisons are tight; float32 results must stay within a small multiple of the error that
the float32 oracle itself makes against the float64 oracle. The oracles run on the CPU, the
kernels on the GPU. Every test here needs a GPU and a CUDA build of ziplm_ext._C.
"""

import pytest
import torch

from ziplm_ext import native
from ziplm_ext.native import ops
from ziplm_ext.native import reference as ref
from ziplm_ext.native import timing

OPS = ("hessian_accumulate", "damped_inverse", "greedy_obs", "greedy_obs_generic", "time_attention",
       "time_attention_decode", "time_ffn", "time_attention_with_output", "time_attention_decode_with_output",
       "time_ffn_with_output")


def _cuda():
    if not native.cuda_kernels_built():
        pytest.skip("needs a CUDA build of ziplm_ext._C (pip install --no-build-isolation . with a CUDA torch and nvcc)")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    return torch.device("cuda")


def _problem(r, c, tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(c, dtype=torch.float64) + 0.5 * torch.randn(c, c, generator=gen, dtype=torch.float64) / c**0.5
    X = torch.randn(tokens, c, generator=gen, dtype=torch.float64) @ mix
    W = torch.randn(r, c, generator=gen, dtype=torch.float64)
    return X, W, X.T @ X


def _spd_batch(B, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(B, 3 * g, g, generator=gen, dtype=torch.float64)
    return X.transpose(-1, -2) @ X


def test_every_op_has_a_cuda_kernel():
    if not native.cuda_kernels_built():
        pytest.skip("needs a CUDA build of ziplm_ext._C (pip install --no-build-isolation . with a CUDA torch and nvcc)")
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ziplm::{op}", "CUDA")]
    assert not missing, missing


# ---------------------------------------------------------------- damped_inverse (one block per matrix)
@pytest.mark.parametrize("B,g", [(1, 1), (5, 3), (7, 16), (6, 64), (3, 128), (2, 192), (1, 40)])
def test_damped_inverse_kernel_matches_oracle(B, g):
    dev = _cuda()
    H = _spd_batch(B, g, seed=g)
    Hinv, used, dead = ops.damped_inverse(H.to(dev), 0.01)
    Hinv_ref, used_ref, dead_ref = ref.damped_inverse(H, 0.01)
    torch.testing.assert_close(Hinv.cpu(), Hinv_ref, rtol=1e-10, atol=1e-12)
    assert used.device.type == "cpu" and torch.equal(used, used_ref) and torch.equal(dead.cpu(), dead_ref)
    assert torch.equal(Hinv, Hinv.transpose(-1, -2)), "L^-T L^-1 is computed exactly symmetric"
    damped = H + 0.01 * H.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(g, dtype=H.dtype)
    torch.testing.assert_close(Hinv.cpu() @ damped, torch.eye(g, dtype=H.dtype).expand_as(damped), rtol=0, atol=1e-9)
    # float32: within 10x the float32 oracle's own error against the float64 result
    Hinv32, *_ = ops.damped_inverse(H.float().to(dev), 0.01)
    ref32, *_ = ref.damped_inverse(H.float(), 0.01)
    scale = Hinv_ref.abs().max()
    err_native = ((Hinv32.cpu().double() - Hinv_ref).abs().max() / scale).item()
    err_oracle = ((ref32.double() - Hinv_ref).abs().max() / scale).item()
    assert err_native <= 10 * err_oracle + 1e-6, (err_native, err_oracle)


def test_damped_inverse_kernel_escalates_per_matrix_and_reports_dead():
    dev = _cuda()
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    batch = torch.stack([torch.eye(3, dtype=torch.float64) * 2, torch.outer(v, v),
                         torch.diag(torch.tensor([1.0, 0.0, 4.0], dtype=torch.float64))])
    Hinv, used, dead = ops.damped_inverse(batch.to(dev), 0.0)
    Hinv_ref, used_ref, dead_ref = ref.damped_inverse(batch, 0.0)
    assert torch.equal(used, used_ref) and used[0] == 0 and used[1] > 0 and used[2] == 0
    assert dead.cpu().tolist() == [[False] * 3, [False] * 3, [False, True, False]]
    torch.testing.assert_close(Hinv.cpu(), Hinv_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("H,match", [
    (torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=torch.float64).expand(4, 2, 2), "not positive definite"),
    (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=torch.float64), "NaN or Inf"),
    (torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64), "not symmetric"),
    (torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), "negative diagonal"),
])
def test_damped_inverse_kernel_rejects_bad_input(H, match):
    dev = _cuda()
    with pytest.raises(ValueError, match=match):
        ops.damped_inverse(H.to(dev), 0.01)


def test_damped_inverse_large_matrix_uses_aten_fallback():
    dev = _cuda()
    H = _spd_batch(1, 400, seed=4)[0]  # packed triangle exceeds shared memory in float64
    Hinv, used, _ = ops.damped_inverse(H.to(dev), 0.01)
    Hinv_ref, used_ref, _ = ref.damped_inverse(H, 0.01)
    torch.testing.assert_close(Hinv.cpu(), Hinv_ref, rtol=1e-9, atol=1e-12)
    assert torch.equal(used, used_ref)


def test_damped_inverse_kernel_many_blocks_matches_cholesky():
    dev = _cuda()
    H = _spd_batch(1000, 64, seed=5).to(dev)
    Hinv, _, _ = ops.damped_inverse(H, 0.0)
    want = torch.cholesky_inverse(torch.linalg.cholesky(H))
    torch.testing.assert_close(Hinv, want, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- greedy_obs
def _check_against_oracle(res, want, c, g):
    assert torch.equal(res.order.cpu(), want.order)
    torch.testing.assert_close(res.losses.cpu(), want.losses, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(res.U.cpu(), want.U, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(res.R.cpu(), want.R, rtol=1e-9, atol=1e-10)
    for k in range(0, c // g + 1, max(1, c // g // 5)):
        torch.testing.assert_close(res.weights(k).cpu(), want.weights(k), rtol=1e-9, atol=1e-10)


# g = 1: the fused column kernels (several flushes, several row blocks, more columns than one
# selection block has threads); g > 1: the group saliency kernel, heads of 64..192.
@pytest.mark.parametrize("g,r,c,block", [(1, 12, 40, 8), (1, 7, 33, 5), (1, 300, 97, 16), (1, 16, 1100, 128),
                                         (4, 10, 32, 8), (64, 24, 256, 128), (128, 16, 384, 128),
                                         (192, 8, 576, 192)])
def test_greedy_obs_cuda_float64_matches_oracle(g, r, c, block):
    dev = _cuda()
    X, W, H = _problem(r, c, tokens=4 * c, seed=g * 100 + c)
    want = ref.greedy_obs(W, H, g, damp=0.0)
    for generic in (False, True):
        res = ops.greedy_obs(W.to(dev), H.to(dev), g, damp=0.0, block_size=block, generic=generic)
        assert res.U.device.type == "cuda"
        _check_against_oracle(res, want, c, g)


@pytest.mark.parametrize("g", [1, 4])
def test_greedy_obs_cuda_identities(g):
    """Loss = direct reconstruction error = least-squares error of the kept columns; removed
    columns exactly zero; each step the greedy minimum."""
    dev = _cuda()
    r, c = 9, 24
    X, W, H = _problem(r, c, tokens=200, seed=7 + g)
    res = ops.greedy_obs(W.to(dev), H.to(dev), g, damp=0.0, block_size=6)
    S = c // g
    removed = []
    for k in range(S + 1):
        Wk = res.weights(k).cpu()
        assert res.loss(k) == pytest.approx(float(((X @ (Wk - W).T) ** 2).sum()), rel=1e-9, abs=1e-9)
        keep = [j for j in range(c) if j // g not in removed]
        if keep:
            WK = torch.linalg.solve(H[keep][:, keep], H[keep] @ W.T).T
            torch.testing.assert_close(Wk[:, keep], WK, rtol=1e-8, atol=1e-9)
        assert torch.count_nonzero(Wk[:, [j for j in range(c) if j not in keep]]) == 0
        if k == S:
            break
        errs = {}
        for s in (s for s in range(S) if s not in removed):
            K = [j for j in keep if j // g != s]
            fit = torch.linalg.solve(H[K][:, K], H[K] @ W.T).T if K else None
            errs[s] = float(((X @ W.T - (X[:, K] @ fit.T if K else 0)) ** 2).sum())
        assert errs[int(res.order[k])] == pytest.approx(min(errs.values()), rel=1e-9)
        removed.append(int(res.order[k]))


@pytest.mark.parametrize("g,r,c", [(1, 32, 256), (64, 32, 256)])
def test_greedy_obs_cuda_float32_error_budget(g, r, c):
    dev = _cuda()
    X, W64, H = _problem(r, c, tokens=4 * c, seed=3)
    exact = ref.greedy_obs(W64, H, g, damp=0.01)
    oracle32 = ref.greedy_obs(W64.float(), H, g, damp=0.01)
    native32 = ops.greedy_obs(W64.float().to(dev), H.to(dev), g, damp=0.01, block_size=32)
    scale = exact.losses[-1]
    err_oracle = ((oracle32.losses.double() - exact.losses).abs().max() / scale).item()
    err_native = ((native32.losses.cpu().double() - exact.losses).abs().max() / scale).item()
    assert err_native <= 10 * err_oracle + 1e-5, (err_native, err_oracle)


def test_greedy_obs_cuda_dead_inputs_and_damping():
    dev = _cuda()
    X, W, H = _problem(6, 16, tokens=64, seed=5)
    H[3, :] = 0
    H[:, 3] = 0
    res = ops.greedy_obs(W.to(dev), H.to(dev), 1, damp=0.01)
    assert int(res.order[0]) == 3 and res.loss(1) == 0.0
    Hd = H.clone()
    Hd[3, 3] = 1
    Hd += 0.01 * Hd.diagonal().mean() * torch.eye(16, dtype=H.dtype)
    for k in (4, 9, 16):
        dW = (res.weights(k) - res.W0).cpu()
        assert res.loss(k) == pytest.approx(float(torch.trace(dW @ Hd @ dW.T)), rel=1e-9)


def test_greedy_obs_cuda_rejects_mixed_devices():
    dev = _cuda()
    with pytest.raises(ValueError, match="is on"):
        torch.ops.ziplm.greedy_obs(torch.randn(4, 6, device=dev), torch.eye(6), 1, 0.01, 4)


# ---------------------------------------------------------------- slice timing (CUDA graphs)
def test_graph_timed_blocks_return_the_block_output():
    dev = _cuda()
    gen = torch.Generator().manual_seed(0)
    d, hd, nq, nkv, m = 64, 16, 4, 2, 96

    def w(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5).to(dev)

    x = w(2, 5, d)
    attn = (x, w(nq * hd, d), w(nkv * hd, d), w(nkv * hd, d), w(d, nq * hd))
    times, out = torch.ops.ziplm.time_attention_with_output(*attn, hd, True, 2, 4)
    assert times.shape == (4,) and bool((times > 0).all())
    torch.testing.assert_close(out, timing.attention_block_reference(*attn, hd, True))
    ffn = (x, w(m, d), w(m, d), w(d, m))
    times, out = torch.ops.ziplm.time_ffn_with_output(*ffn, 0, 3)
    assert bool((times > 0).all())
    torch.testing.assert_close(out, timing.ffn_block_reference(*ffn))


def test_opcheck_schema_on_cuda():
    dev = _cuda()
    X, W, H = _problem(5, 8, tokens=32, seed=11)
    torch.library.opcheck(torch.ops.ziplm.greedy_obs.default, (W.to(dev), H.to(dev), 1, 0.01, 4),
                          test_utils=("test_schema",))
    torch.library.opcheck(torch.ops.ziplm.greedy_obs.default, (W.to(dev), H.to(dev), 2, 0.01, 4),
                          test_utils=("test_schema",))
    torch.library.opcheck(torch.ops.ziplm.damped_inverse.default, (_spd_batch(3, 8).to(dev), 0.01, 8),
                          test_utils=("test_schema",))
    torch.library.opcheck(torch.ops.ziplm.hessian_accumulate.default,
                          (torch.zeros(8, 8, dtype=torch.float64, device=dev), X.to(dev), None),
                          test_utils=("test_schema",))
