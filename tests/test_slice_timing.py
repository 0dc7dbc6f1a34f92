"""Structured-slice timing ops: torch.ops.ziplm.time_attention / time_ffn and ziplm_ext.timing.

The native ops only return timings, so the maths of the timed blocks is checked through the
pure-PyTorch references (same maths as csrc/slice_timing_block.h), and the native ops are
checked for count, positivity, scaling and argument validation.
"""
import math
import sys

import pytest
import torch

import ziplm_ext._C as _C  # the extension is a required part of the install: no skip
from ziplm_ext import timing
from ziplm_ext.timing import (
    Timing,
    attention_block_reference,
    ffn_block_reference,
    reference_time_attention,
    reference_time_ffn,
    time_attention,
    time_ffn,
)

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
                              lambda: reference_time_ffn(*args, warmup=1, reps=5))
    ratio = t_nat / t_ref
    assert 0.05 < ratio < 5.0, ratio  # same work: same order of magnitude (oracle adds Python overhead)
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
        with pytest.raises(ValueError, match="ziplm: .*" + match):
            torch.ops.ziplm.time_attention(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_ffn_bad_arguments(device):
    for match, args in _bad_ffn_cases(device):
        with pytest.raises(ValueError, match="ziplm: .*" + match):
            torch.ops.ziplm.time_ffn(*args)


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
        with pytest.raises(ValueError, match="ziplm: .*" + match):
            torch.ops.ziplm.time_attention_decode(*a)
    with pytest.raises(ValueError, match="x must be \\(B, 1, d\\)"):
        timing.reference_time_attention_decode(x_full, wq, wk, wv, wo, kc, vc, 16)
