"""Structured-slice timing ops: torch.ops.ziplm.time_attention(_decode) / time_ffn and ziplm_ext.timing.

The pure-PyTorch blocks of ziplm_ext.timing are checked against independent maths (a per-head loop,
HF's LlamaMLP, the erf GELU); the ops ``time_*_with_output`` return the output of the last timed
repetition of the very C++ kernels that ``time_*`` run, and that output is checked against those
blocks (float64 tightly, lower precisions within an error budget against the float64 oracle). The
timings are checked as real measurements: every rep lies inside the call's wall clock, no rep is
faster than the block's arithmetic allows, and wider blocks take longer.
"""
import math
import re
import sys
import time
from pathlib import Path

import pytest
import torch

import ziplm_ext._C as _C  # the extension is a required part of the install: no skip
from ziplm_ext.native import reference
from ziplm_ext.native import timing
from ziplm_ext.native.timing import Timing, attention_block_reference, ffn_block_reference, reference_time_attention, reference_time_ffn, time_attention, time_ffn

_CUDA_OK = torch.cuda.is_available() and _C.cuda_built()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not _CUDA_OK,
                reason=f"needs a GPU and a CUDA build (cuda available: {torch.cuda.is_available()}, "
                f"ziplm_ext._C.cuda_built(): {_C.cuda_built()})",
            ),
        ],
    ),
]


def _attn(d=64, nq=4, nkv=4, hd=16, B=2, T=8, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[-1] or 1)).to(device, dtype)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(device, dtype)
    return x, r(nq * hd, d), r(nkv * hd, d), r(nkv * hd, d), r(d, nq * hd)


def _ffn(d=64, m=128, gated=True, B=2, T=8, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[-1] or 1)).to(device, dtype)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(device, dtype)
    return x, r(m, d), (r(m, d) if gated else None), r(d, m)


def _check_times(t, reps, removed=False):
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.float64 and t.device.type == "cpu" and t.shape == (reps,)
    assert not t.requires_grad and t.grad_fn is None  # timings are not differentiable
    assert torch.isfinite(t).all()
    if removed:  # doing nothing can read as 0 on a coarse clock / empty event pair
        assert (t >= 0).all() and float(t.max()) < 1e-2
    else:
        assert (t > 0).all()


# ---------------------------------------------------------------------------------------------
# Maths of the timed blocks (pure-PyTorch references)


def _naive_attention(x, wq, wk, wv, wo, hd, causal):
    """Per-head loop with an explicit softmax: independent of SDPA and of repeat_interleave."""
    B, T, d = x.shape
    nq, nkv = wq.shape[0] // hd, wk.shape[0] // hd
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
    outs = []
    for h in range(nq):
        kvh = h // (nq // nkv)
        qh, kh, vh = q[..., h * hd:(h + 1) * hd], k[..., kvh * hd:(kvh + 1) * hd], v[..., kvh * hd:(kvh + 1) * hd]
        s = qh @ kh.transpose(1, 2) / math.sqrt(hd)
        if causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.softmax(s, dim=-1) @ vh)
    return torch.cat(outs, dim=-1) @ wo.T


@pytest.mark.parametrize("nq,nkv", [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_reference_matches_naive(nq, nkv, causal):
    x, wq, wk, wv, wo = _attn(d=48, nq=nq, nkv=nkv, hd=8, dtype=torch.float64)
    got = attention_block_reference(x, wq, wk, wv, wo, 8, causal)
    torch.testing.assert_close(got, _naive_attention(x, wq, wk, wv, wo, 8, causal))


def test_attention_reference_removed_block_is_zero():
    x, wq, wk, wv, wo = _attn(nq=0, nkv=0)
    assert wo.shape == (64, 0)
    assert torch.equal(attention_block_reference(x, wq, wk, wv, wo, 16), torch.zeros_like(x))


def test_ffn_reference_matches_hf_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu", mlp_bias=False)
    mlp = LlamaMLP(cfg).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    got = ffn_block_reference(x, mlp.up_proj.weight, mlp.gate_proj.weight, mlp.down_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(got, mlp(x))


def test_ffn_reference_gelu_and_removed():
    x, w_up, _, w_down = _ffn(gated=False, dtype=torch.float64)
    up = x @ w_up.T
    want = (0.5 * up * (1 + torch.erf(up / math.sqrt(2)))) @ w_down.T
    torch.testing.assert_close(ffn_block_reference(x, w_up, None, w_down), want)
    x, w_up, w_gate, w_down = _ffn(m=0)
    assert torch.equal(ffn_block_reference(x, w_up, w_gate, w_down), torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------
# Native ops: counts, values, Timing summary


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nq,nkv", [(4, 4), (4, 2), (0, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_native_attention_returns_reps(device, nq, nkv, causal):
    x, wq, wk, wv, wo = _attn(nq=nq, nkv=nkv, device=device)
    t = torch.ops.ziplm.time_attention(x, wq, wk, wv, wo, 16, causal, 1, 5)
    _check_times(t, 5, removed=nq == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("m", [128, 0])
def test_native_ffn_returns_reps(device, gated, m):
    x, w_up, w_gate, w_down = _ffn(m=m, gated=gated, device=device)
    t = torch.ops.ziplm.time_ffn(x, w_up, w_gate, w_down, 0, 7)
    _check_times(t, 7, removed=m == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_native_ops_other_dtypes_and_grad_inputs(device):
    dtypes = [torch.float64] + ([torch.float16, torch.bfloat16] if device == "cuda" else [torch.bfloat16])
    for dtype in dtypes:
        x, wq, wk, wv, wo = _attn(nq=4, nkv=2, device=device, dtype=dtype)
        x.requires_grad_(True)
        _check_times(torch.ops.ziplm.time_attention(x, wq, wk, wv, wo, 16, True, 1, 3), 3)
        x, w_up, w_gate, w_down = _ffn(device=device, dtype=dtype)
        w_up.requires_grad_(True)
        _check_times(torch.ops.ziplm.time_ffn(x, w_up, w_gate, w_down, 1, 3), 3)


@pytest.mark.parametrize("device", DEVICES)
def test_wrappers_return_timing(device):
    x, wq, wk, wv, wo = _attn(device=device)
    t = time_attention(x, wq, wk, wv, wo, head_dim=16, causal=True, warmup=1, reps=9)
    assert isinstance(t, Timing) and t.times.shape == (9,) and t.median > 0 and t.spread >= 0
    x, w_up, w_gate, w_down = _ffn(device=device)
    t = time_ffn(x, w_up, w_gate, w_down, warmup=0, reps=4)
    assert isinstance(t, Timing) and t.times.shape == (4,) and t.median > 0


def test_timing_summary_definition():
    times = torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0], dtype=torch.float64)
    t = Timing.from_times(times)
    assert t.median == pytest.approx(5.5)
    # linear-interpolated p10 = 1.9, p90 = 9.1
    assert t.spread == pytest.approx((9.1 - 1.9) / 5.5)
    assert torch.equal(t.times, times)
    assert math.isnan(Timing.from_times(torch.zeros(3, dtype=torch.float64)).spread)
    with pytest.raises(ValueError):
        Timing.from_times(torch.empty(0))


@pytest.fixture
def one_thread():
    """Single intra-op thread: multi-threaded CPU GEMMs slow down erratically on a loaded machine
    (a descheduled worker stalls the rest), which would swamp the scaling signal."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _min_times(fa, fb, rounds=3):
    """min over reps of two timed ops, measured alternately so a burst of load hits both."""
    a, b = math.inf, math.inf
    for _ in range(rounds):
        a = min(a, float(fa().min()))
        b = min(b, float(fb().min()))
    return a, b


@pytest.mark.parametrize("device", DEVICES)
def test_native_ffn_scales_with_width(device, one_thread):
    d, T = (512, 128) if device == "cpu" else (2048, 512)
    wide = _ffn(d=d, m=4 * d, gated=True, B=1, T=T, device=device)
    narrow = _ffn(d=d, m=d, gated=True, B=1, T=T, device=device)  # 1/4 of the wide one
    t_wide, t_narrow = _min_times(lambda: torch.ops.ziplm.time_ffn(*wide, 1, 5),
                                  lambda: torch.ops.ziplm.time_ffn(*narrow, 1, 5))
    assert t_wide > 1.5 * t_narrow, (t_wide, t_narrow)


@pytest.mark.parametrize("device", DEVICES)
def test_native_attention_scales_with_heads(device, one_thread):
    d, T = (512, 128) if device == "cpu" else (2048, 1024)
    hd = 64
    full = _attn(d=d, nq=d // hd, nkv=d // hd, hd=hd, B=1, T=T, device=device)
    quarter = _attn(d=d, nq=d // hd // 4, nkv=d // hd // 4, hd=hd, B=1, T=T, device=device)
    t_full, t_quarter = _min_times(lambda: torch.ops.ziplm.time_attention(*full, hd, True, 1, 5),
                                   lambda: torch.ops.ziplm.time_attention(*quarter, hd, True, 1, 5))
    assert t_full > 1.5 * t_quarter, (t_full, t_quarter)


@pytest.mark.parametrize("device", DEVICES)
def test_oracle_returns_reps_and_agrees_roughly(device, one_thread):
    args = _ffn(d=256, m=1024, B=1, T=64, device=device)
    ref = reference_time_ffn(*args, warmup=2, reps=6)
    _check_times(ref, 6)
    t_nat, t_ref = _min_times(lambda: torch.ops.ziplm.time_ffn(*args, 1, 5),
                              lambda: reference_time_ffn(*args, warmup=1, reps=5), rounds=5)
    ratio = t_nat / t_ref
    # The same ~1.5 ms of work timed by two clocks: the fastest reps agree closely (0.7..1.3 seen with
    # load 7 on 2 cores); a factor 3 either way leaves room for noise but not for a wrong unit, a
    # skipped block or a different amount of work.
    assert 1 / 3 < ratio < 3.0, (t_nat, t_ref)
    x, wq, wk, wv, wo = _attn(device=device)
    _check_times(reference_time_attention(x, wq, wk, wv, wo, 16, True, 1, 4), 4)
    _check_times(reference_time_attention(*_attn(nq=0, nkv=0, device=device), 16, True, 0, 2), 2, removed=True)


# ---------------------------------------------------------------------------------------------
# Argument validation at the op boundary


def _bad_attention_cases(device):
    x, wq, wk, wv, wo = _attn(nq=4, nkv=2, device=device)
    yield "head_dim must be > 0", (x, wq, wk, wv, wo, 0, True, 1, 2)
    yield "reps must be >= 1", (x, wq, wk, wv, wo, 16, True, 1, 0)
    yield "warmup must be >= 0", (x, wq, wk, wv, wo, 16, True, -1, 2)
    yield "x \\(B, T, d\\) must be 3-D", (x[0], wq, wk, wv, wo, 16, True, 1, 2)
    yield "wq must be \\(nq\\*head_dim, d\\)", (x, wq[:, :32], wk, wv, wo, 16, True, 1, 2)
    yield "not a multiple of head_dim", (x, wq[:40], wk, wv, wo, 16, True, 1, 2)
    yield "wv must have wk's shape", (x, wq, wk, wv[:16], wo, 16, True, 1, 2)
    yield "wo must be \\(d, nq\\*head_dim\\)", (x, wq, wk, wv, wo[:, :32], 16, True, 1, 2)
    x3, wq3, wk3, wv3, wo3 = _attn(nq=3, nkv=2, device=device)
    yield "must be a multiple of nkv", (x3, wq3, wk3, wv3, wo3, 16, True, 1, 2)
    yield "need at least one key/value head", (x, wq, wk[:0], wv[:0], wo, 16, True, 1, 2)
    yield "wk has dtype", (x, wq, wk.double(), wv, wo, 16, True, 1, 2)
    yield "x must be a floating-point", (x.to(torch.int32), wq, wk, wv, wo, 16, True, 1, 2)


def _bad_ffn_cases(device):
    x, w_up, w_gate, w_down = _ffn(device=device)
    yield "reps must be >= 1", (x, w_up, w_gate, w_down, 0, 0)
    yield "warmup must be >= 0", (x, w_up, w_gate, w_down, -2, 3)
    yield "w_up must be \\(m, d\\)", (x, w_up[:, :10], w_gate, w_down, 0, 1)
    yield "w_down must be \\(d, m\\)", (x, w_up, w_gate, w_down[:, :10], 0, 1)
    yield "w_gate must have w_up's shape", (x, w_up, w_gate[:10], w_down, 0, 1)
    yield "w_gate has dtype", (x, w_up, w_gate.double(), w_down, 0, 1)
    yield "w_down must be a floating-point", (x, w_up, w_gate, w_down.to(torch.int64), 0, 1)
    yield "w_up \\(m, d\\) must be 2-D", (x, w_up[0], w_gate, w_down, 0, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_bad_arguments(device):
    for match, args in _bad_attention_cases(device):
        for op in (torch.ops.ziplm.time_attention, torch.ops.ziplm.time_attention_with_output):
            with pytest.raises(ValueError, match="ziplm: .*" + match):
                op(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_ffn_bad_arguments(device):
    for match, args in _bad_ffn_cases(device):
        for op in (torch.ops.ziplm.time_ffn, torch.ops.ziplm.time_ffn_with_output):
            with pytest.raises(ValueError, match="ziplm: .*" + match):
                op(*args)


@pytest.mark.cuda
@pytest.mark.skipif(not _CUDA_OK, reason="needs a GPU and a CUDA build")
def test_cuda_mixed_devices_rejected():
    x, wq, wk, wv, wo = _attn(device="cuda")
    with pytest.raises(ValueError, match="all tensors must be on x's device"):
        torch.ops.ziplm.time_attention(x, wq, wk.cpu(), wv, wo, 16, True, 0, 1)
    with pytest.raises(ValueError, match="the CUDA kernel got x on cpu"):
        torch.ops.ziplm.time_attention(x.cpu(), wq, wk, wv, wo, 16, True, 0, 1)
    x, w_up, w_gate, w_down = _ffn(device="cuda")
    with pytest.raises(ValueError, match="all tensors must be on x's device"):
        torch.ops.ziplm.time_ffn(x, w_up, w_gate.cpu(), w_down, 0, 1)


def test_reference_bad_arguments():
    x, wq, wk, wv, wo = _attn(nq=3, nkv=2)
    with pytest.raises(ValueError, match="multiple of nkv"):
        reference_time_attention(x, wq, wk, wv, wo, 16)
    x, w_up, w_gate, w_down = _ffn()
    with pytest.raises(ValueError, match="reps must be >= 1"):
        reference_time_ffn(x, w_up, w_gate, w_down, reps=0)


def test_wrapper_clear_error_without_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "ziplm_ext._C", None)  # makes `import ziplm_ext._C` fail
    x, w_up, w_gate, w_down = _ffn()
    with pytest.raises(RuntimeError, match="native extension ziplm_ext._C is not built"):
        timing.time_ffn(x, w_up, w_gate, w_down)


# ---------------------------------------------------------------------------------------------
# Decode step: one new token attending to a KV cache


def _decode_args(d=64, nq=4, nkv=2, hd=16, B=2, L=12, device="cpu", dtype=torch.float32, seed=0):
    """Decode inputs whose cache holds the projections of a random prefix; also returns the prefix."""
    x_full, wq, wk, wv, wo = _attn(d=d, nq=nq, nkv=nkv, hd=hd, B=B, T=L + 1, device=device, dtype=dtype, seed=seed)
    prefix, x = x_full[:, :L], x_full[:, L:]
    heads = lambda y: y.view(B, L, nkv, hd).transpose(1, 2).contiguous()
    k_cache, v_cache = heads(prefix @ wk.T), heads(prefix @ wv.T)
    return x_full, (x, wq, wk, wv, wo, k_cache, v_cache)


@pytest.mark.parametrize("nq,nkv", [(4, 4), (6, 2), (3, 1)])
def test_decode_reference_equals_last_row_of_causal_attention(nq, nkv):
    # the decode step with a cache of the prefix's keys/values is the causal block's last position
    x_full, args = _decode_args(d=48, nq=nq, nkv=nkv, hd=8, dtype=torch.float64)
    got = timing.attention_decode_block_reference(*args, 8)
    want = _naive_attention(x_full, *args[1:5], 8, True)[:, -1:]
    torch.testing.assert_close(got, want)
    removed = timing.attention_decode_block_reference(args[0], args[1][:0], args[2][:0], args[3][:0], args[4][:, :0],
                                                      args[5][:, :0], args[6][:, :0], 8)
    assert torch.equal(removed, torch.zeros_like(args[0]))


@pytest.mark.parametrize("device", DEVICES)
def test_native_decode_returns_reps_and_scales_with_cache(device, one_thread):
    _, args = _decode_args(device=device)
    _check_times(torch.ops.ziplm.time_attention_decode(*args, 16, 1, 3), 3)
    assert timing.time_attention_decode(*args, 16, warmup=0, reps=2).times.shape == (2,)
    _check_times(timing.reference_time_attention_decode(*args, 16, warmup=0, reps=2), 2)
    d, hd = 512, 64
    _, short = _decode_args(d=d, nq=8, nkv=8, hd=hd, B=4, L=16, device=device)
    _, long = _decode_args(d=d, nq=8, nkv=8, hd=hd, B=4, L=4096, device=device)
    t_long, t_short = _min_times(lambda: torch.ops.ziplm.time_attention_decode(*long, hd, 1, 5),
                                 lambda: torch.ops.ziplm.time_attention_decode(*short, hd, 1, 5))
    assert t_long > 1.5 * t_short, (t_long, t_short)  # attending to (and appending to) a long cache costs


@pytest.mark.parametrize("device", DEVICES)
def test_decode_bad_arguments(device):
    x_full, (x, wq, wk, wv, wo, kc, vc) = _decode_args(device=device)
    cases = [
        ("x must be \\(B, 1, d\\)", (x_full, wq, wk, wv, wo, kc, vc, 16, 0, 1)),
        ("k_cache must be \\(B, nkv, L, head_dim\\)", (x, wq, wk, wv, wo, kc[:, :1], vc, 16, 0, 1)),
        ("v_cache must have k_cache's shape", (x, wq, wk, wv, wo, kc, vc[:, :, :3], 16, 0, 1)),
        ("k_cache \\(B, nkv, L, head_dim\\) must be 4-D", (x, wq, wk, wv, wo, kc[0], vc, 16, 0, 1)),
        ("k_cache has dtype", (x, wq, wk, wv, wo, kc.double(), vc, 16, 0, 1)),
        ("reps must be >= 1", (x, wq, wk, wv, wo, kc, vc, 16, 0, 0)),
    ]
    for match, a in cases:
        for op in (torch.ops.ziplm.time_attention_decode, torch.ops.ziplm.time_attention_decode_with_output):
            with pytest.raises(ValueError, match="ziplm: .*" + match):
                op(*a)
    with pytest.raises(ValueError, match="x must be \\(B, 1, d\\)"):
        timing.reference_time_attention_decode(x_full, wq, wk, wv, wo, kc, vc, 16)


# ---------------------------------------------------------------------------------------------
# Native block outputs: the timed C++ kernels compute the blocks of ziplm_ext.timing


def _rel_err(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm())


def _budget(dtype, K):
    """Relative (Frobenius) error allowed against the float64 oracle: a few roundings per term of
    the longest reduction (length K). For float32 it is ~1e-6, far below TF32 / half-precision
    arithmetic (~1e-3), so a kernel that silently ran in lower precision fails."""
    return 4 * math.sqrt(K) * torch.finfo(dtype).eps


def _check_output(out, x, want64, K, same_dtype=None):
    """`out`: native output for input `x`; `want64`: the Python block on the same (upcast) inputs in
    float64; `same_dtype`: the Python block run in x's dtype."""
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.grad_fn is None and not out.requires_grad
    if not bool(want64.any()):  # removed block: adds nothing to the residual stream
        assert torch.equal(out, torch.zeros_like(x))
        return
    if x.dtype == torch.float64:
        torch.testing.assert_close(out, want64, rtol=1e-12, atol=1e-12 * float(want64.abs().max()))
    else:
        budget = _budget(x.dtype, K)
        assert _rel_err(out, want64) <= budget, (_rel_err(out, want64), budget)
        if same_dtype is not None:
            assert _rel_err(out, same_dtype) <= budget, (_rel_err(out, same_dtype), budget)


def _f64(ts):
    return [None if t is None else t.double() for t in ts]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nq,nkv", [(4, 4), (6, 2), (3, 1), (8, 1), (0, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_native_attention_output_matches_block(device, dtype, nq, nkv, causal):
    d, hd, T = 48, 8, 7
    args = _attn(d=d, nq=nq, nkv=nkv, hd=hd, B=2, T=T, device=device, dtype=dtype, seed=nq + 10 * nkv)
    times, out = torch.ops.ziplm.time_attention_with_output(*args, hd, causal, 1, 3)
    _check_times(times, 3, removed=nq == 0)
    want64 = attention_block_reference(*_f64(args), hd, causal)
    _check_output(out, args[0], want64, K=max(d, nq * hd, T), same_dtype=attention_block_reference(*args, hd, causal))
    if dtype == torch.float64 and nq:  # also against the per-head loop, independent of SDPA
        torch.testing.assert_close(out.cpu(), _naive_attention(*(t.cpu() for t in args), hd, causal))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nq,nkv", [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("L", [0, 1, 13])
def test_native_decode_output_matches_block(device, dtype, nq, nkv, L):
    d, hd = 48, 8
    x_full, args = _decode_args(d=d, nq=nq, nkv=nkv, hd=hd, B=3, L=L, device=device, dtype=dtype, seed=L)
    times, out = torch.ops.ziplm.time_attention_decode_with_output(*args, hd, 1, 2)
    _check_times(times, 2)
    K = max(d, nq * hd, L + 1)
    want64 = timing.attention_decode_block_reference(*_f64(args), hd)
    _check_output(out, args[0], want64, K, same_dtype=timing.attention_decode_block_reference(*args, hd))
    # A decode step over the cached prefix is the last position of the causal prefill kernel.
    _, prefill = torch.ops.ziplm.time_attention_with_output(x_full, *args[1:5], hd, True, 0, 1)
    _check_output(out, args[0], prefill[:, -1:].double(), K)


@pytest.mark.parametrize("device", DEVICES)
def test_native_decode_removed_block_outputs_zeros(device):
    _, (x, wq, wk, wv, wo, kc, vc) = _decode_args(device=device)
    times, out = torch.ops.ziplm.time_attention_decode_with_output(
        x, wq[:0], wk[:0], wv[:0], wo[:, :0], kc[:, :0], vc[:, :0], 16, 0, 3)
    _check_times(times, 3, removed=True)
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("m", [128, 80, 0])
def test_native_ffn_output_matches_block(device, dtype, gated, m):
    d = 64
    args = _ffn(d=d, m=m, gated=gated, B=2, T=5, device=device, dtype=dtype, seed=m)
    times, out = torch.ops.ziplm.time_ffn_with_output(*args, 1, 3)
    _check_times(times, 3, removed=m == 0)
    _check_output(out, args[0], ffn_block_reference(*_f64(args)), K=max(d, m), same_dtype=ffn_block_reference(*args))
    if dtype == torch.float64 and m:  # also against the formulas, independent of F.silu / F.gelu
        x, w_up, w_gate, w_down = (None if t is None else t.cpu() for t in args)
        up = x @ w_up.T
        if gated:
            z = x @ w_gate.T
            hidden = z * torch.sigmoid(z) * up
        else:
            hidden = 0.5 * up * (1 + torch.erf(up / math.sqrt(2)))
        torch.testing.assert_close(out.cpu(), hidden @ w_down.T)


@pytest.mark.parametrize("device", DEVICES)
def test_native_outputs_low_precision_within_budget(device):
    for dtype in [torch.bfloat16] + ([torch.float16] if device == "cuda" else []):
        args = _attn(d=64, nq=4, nkv=2, hd=16, device=device, dtype=dtype)
        _, out = torch.ops.ziplm.time_attention_with_output(*args, 16, True, 0, 1)
        _check_output(out, args[0], attention_block_reference(*_f64(args), 16, True), K=64)
        x_full, dargs = _decode_args(device=device, dtype=dtype)
        _, out = torch.ops.ziplm.time_attention_decode_with_output(*dargs, 16, 0, 1)
        _check_output(out, dargs[0], timing.attention_decode_block_reference(*_f64(dargs), 16), K=64)
        for gated in (True, False):
            args = _ffn(gated=gated, device=device, dtype=dtype)
            _, out = torch.ops.ziplm.time_ffn_with_output(*args, 0, 1)
            _check_output(out, args[0], ffn_block_reference(*_f64(args)), K=128)


@pytest.mark.parametrize("device", DEVICES)
def test_wrappers_return_output_of_the_timed_block(device):
    args = _attn(nq=4, nkv=2, device=device, dtype=torch.float64)
    args[0].requires_grad_(True)  # the timed kernels skip autograd: a plain output, no grad_fn
    t, out = time_attention(*args, 16, True, warmup=0, reps=2, return_output=True)
    assert isinstance(t, Timing) and t.times.shape == (2,)
    _check_output(out, args[0], attention_block_reference(*args, 16, True), K=64)
    _, dargs = _decode_args(device=device, dtype=torch.float64)
    t, out = timing.time_attention_decode_with_output(*dargs, 16, warmup=0, reps=3)
    assert isinstance(t, Timing) and t.times.shape == (3,)
    _check_output(out, dargs[0], timing.attention_decode_block_reference(*dargs, 16), K=64)
    fargs = _ffn(device=device, dtype=torch.float64)
    t, out = time_ffn(*fargs, warmup=1, reps=4, return_output=True)
    assert isinstance(t, Timing) and t.times.shape == (4,)
    # the oracle of the *_with_output op in ziplm_ext.reference: same signature, same output
    ref_times, ref_out = reference.time_ffn_with_output(*fargs, 1, 4)
    _check_times(ref_times, 4)
    _check_output(out, fargs[0], ref_out, K=128)


# ---------------------------------------------------------------------------------------------
# The timings are real measurements of the reported repetitions


# Per-second FLOP rates no hardware reaches in these dtypes: 5e11 per CPU core (a core's float32
# peak is below 3e11 even with two AVX-512 FMA units at 4 GHz), 2e15 on a GPU (above any GPU's
# float32 / TF32 dense peak). A rep faster than its block's FLOPs at this rate did not run the block.
def _peak_flops(device):
    import os

    return 5e11 * (os.cpu_count() or 1) if device == "cpu" else 2e15


@pytest.mark.parametrize("device", DEVICES)
def test_native_times_are_real_durations(device):
    """The timed reps are disjoint parts of one call, so their sum is at most the call's wall clock;
    and each is at least its block's FLOPs at an impossible rate. Together they say that every
    reported repetition ran the whole block and was reported in seconds (a rep that skipped the work,
    or times in the wrong unit, or one rep's time copied `reps` times, fails one of the two)."""
    cpu = device == "cpu"
    d, T, L = (512, 64, 1024) if cpu else (2048, 512, 8192)
    hd, m, Bd, reps = 64, 4 * d, 4, 6
    nq, nkv = d // hd, d // hd // 2
    ffn_g = _ffn(d=d, m=m, gated=True, B=1, T=T, device=device)
    ffn_p = _ffn(d=d, m=m, gated=False, B=1, T=T, device=device)
    attn = _attn(d=d, nq=nq, nkv=nkv, hd=hd, B=1, T=T, device=device)
    _, dec = _decode_args(d=d, nq=nq, nkv=nkv, hd=hd, B=Bd, L=L, device=device)
    proj = 2 * d * hd * (2 * nq + 2 * nkv)  # q, k, v, o projections per token
    cases = [
        ("ffn gated", lambda: torch.ops.ziplm.time_ffn(*ffn_g, 1, reps), 2 * T * d * m * 3),
        ("ffn gelu", lambda: torch.ops.ziplm.time_ffn(*ffn_p, 1, reps), 2 * T * d * m * 2),
        ("attention", lambda: torch.ops.ziplm.time_attention(*attn, hd, True, 1, reps), T * proj),
        ("decode", lambda: torch.ops.ziplm.time_attention_decode(*dec, hd, 1, reps),
         Bd * proj + 4 * Bd * nq * (L + 1) * hd),
    ]
    for name, run, flops in cases:
        t0 = time.perf_counter()
        times = run()
        wall = time.perf_counter() - t0
        _check_times(times, reps)
        # (+2 us per rep: CUDA event resolution)
        assert float(times.sum()) <= wall + reps * 2e-6, (name, times.tolist(), wall)
        floor = flops / _peak_flops(device)
        assert float(times.min()) >= floor, (name, float(times.min()), floor)


# ---------------------------------------------------------------------------------------------
# Op registry: every schema of csrc/ops.cpp has kernels, and the CUDA compile check covers it

_ROOT = Path(__file__).resolve().parents[1]


def _schema_names():
    names = set(re.findall(r'm\.def\("(\w+)\(', (_ROOT / "csrc" / "ops.cpp").read_text()))
    assert {"time_attention", "time_ffn", "time_attention_with_output", "greedy_obs"} <= names, names
    return names


def test_every_ziplm_op_has_a_cpu_kernel():
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("ziplm::")}
    assert registered == _schema_names()
    keys = ["CPU"] + (["CUDA"] if _C.cuda_built() else [])
    missing = [(op, key) for op in sorted(registered) for key in keys
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ziplm::{op}", key)]
    assert not missing, f"ops without a kernel: {missing}"


def test_cuda_compile_check_covers_every_op():
    """The CUDA compile check takes its op list from csrc/ops.cpp itself (so a new op cannot be
    forgotten there) and fails when one lacks a CUDA or a fake kernel."""
    script = (_ROOT / ".ci" / "cuda_compile_check.sh").read_text()
    assert 'ZIPLM_OPS_CPP="$ROOT/csrc/ops.cpp"' in script
    assert r"""re.findall(r'm\.def\("(\w+)\(', open(os.environ["ZIPLM_OPS_CPP"]).read())""" in script
    assert '_dispatch_has_kernel_for_dispatch_key' in script and '"CUDA"' in script
    assert "no_fake" in script
    assert _schema_names()
