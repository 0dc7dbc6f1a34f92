"""Fake (meta) kernels of every ``torch.ops.ziplm`` op, for FakeTensor tracing and ``torch.compile``.

A fake kernel gives the shapes, dtypes and devices of an op's outputs from those of its inputs,
without computing anything, so the op can be traced (``torch.compile``, ``torch.export``,
``torch.library.opcheck``). The schemas are in ``csrc/ops.cpp``; the real kernels in
``csrc/cpu`` and ``csrc/cuda``. Loaded by :func:`ziplm_ext.native._native` right after the
compiled extension, so every op is registered with its fake kernel before first use.

Conventions shared with the real kernels: per-repetition times and the used damping are float64
tensors on the CPU whatever the inputs' device (they are host-side quantities); everything else
lives on the inputs' device.
"""
from __future__ import annotations

from typing import Optional

import torch

_CPU_F64 = dict(dtype=torch.float64, device="cpu")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError("ziplm: " + msg)


def _same_device(**tensors: Optional[torch.Tensor]) -> None:
    """All given tensors on one device, as the real kernels require (a meta tensor next to a CPU one
    would otherwise reach this fake kernel and pass silently)."""
    named = [(n, t.device) for n, t in tensors.items() if t is not None]
    for n, dev in named[1:]:
        _check(dev == named[0][1], f"{n} is on {dev} but {named[0][0]} is on {named[0][1]}")


@torch.library.register_fake("ziplm::hessian_accumulate")
def _hessian_accumulate(H: torch.Tensor, X: torch.Tensor, mask: Optional[torch.Tensor]):
    _same_device(H=H, X=X, mask=mask)
    _check(H.dim() == 2 and H.shape[0] == H.shape[1], f"H must be square, got shape {tuple(H.shape)}")
    _check(X.dim() >= 2 and X.shape[-1] == H.shape[0], f"X has {X.shape[-1]} features but H is {H.shape[0]}x{H.shape[1]}")
    if mask is None:
        return X.numel() // X.shape[-1]
    # The number of rows the mask keeps depends on its values, and the schema returns a plain int,
    # which cannot carry a symbolic size: tell the tracer so (torch.compile then runs this call
    # eagerly, a graph break) instead of returning a wrong count.
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    raise DynamicOutputShapeException(torch.ops.ziplm.hessian_accumulate.default)


@torch.library.register_fake("ziplm::damped_inverse")
def _damped_inverse(H: torch.Tensor, damp: float, max_tries: int):
    _check(H.dim() in (2, 3) and H.shape[-1] == H.shape[-2], f"H must be (c,c) or (B,g,g), got shape {tuple(H.shape)}")
    B = 1 if H.dim() == 2 else H.shape[0]
    g = H.shape[-1]
    return (torch.empty_like(H, memory_format=torch.contiguous_format), torch.empty(B, **_CPU_F64),
            torch.empty(B, g, dtype=torch.bool, device=H.device))


def _greedy_obs(W: torch.Tensor, H: torch.Tensor, group_size: int, damp: float, block_size: int):
    _same_device(W=W, H=H)
    _check(W.dim() == 2, f"W must be 2-D, got shape {tuple(W.shape)}")
    r, c = W.shape
    _check(tuple(H.shape) == (c, c), f"H must be ({c}, {c}) to match W's {c} columns, got {tuple(H.shape)}")
    _check(group_size >= 1 and c % group_size == 0, f"group_size {group_size} does not divide the {c} columns of W")
    S = c // group_size
    return (W.new_empty(S, dtype=torch.long), W.new_empty(S), W.new_empty(r, c), W.new_empty(c, c),
            W.new_empty(r, c), torch.empty((), **_CPU_F64))


torch.library.register_fake("ziplm::greedy_obs")(_greedy_obs)
torch.library.register_fake("ziplm::greedy_obs_generic")(_greedy_obs)


def _times(reps: int) -> torch.Tensor:
    _check(reps >= 1, f"reps must be >= 1, got {reps}")
    return torch.empty(reps, **_CPU_F64)


def _block_output(x: torch.Tensor) -> torch.Tensor:
    _check(x.dim() == 3, f"x must be (B, T, d), got shape {tuple(x.shape)}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("ziplm::time_attention")
def _time_attention(x, wq, wk, wv, wo, head_dim, causal, warmup, reps):
    _same_device(x=x, wq=wq, wk=wk, wv=wv, wo=wo)
    return _times(reps)


@torch.library.register_fake("ziplm::time_attention_with_output")
def _time_attention_with_output(x, wq, wk, wv, wo, head_dim, causal, warmup, reps):
    _same_device(x=x, wq=wq, wk=wk, wv=wv, wo=wo)
    return _times(reps), _block_output(x)


@torch.library.register_fake("ziplm::time_attention_decode")
def _time_attention_decode(x, wq, wk, wv, wo, k_cache, v_cache, head_dim, warmup, reps):
    _same_device(x=x, wq=wq, wk=wk, wv=wv, wo=wo, k_cache=k_cache, v_cache=v_cache)
    return _times(reps)


@torch.library.register_fake("ziplm::time_attention_decode_with_output")
def _time_attention_decode_with_output(x, wq, wk, wv, wo, k_cache, v_cache, head_dim, warmup, reps):
    _same_device(x=x, wq=wq, wk=wk, wv=wv, wo=wo, k_cache=k_cache, v_cache=v_cache)
    return _times(reps), _block_output(x)


@torch.library.register_fake("ziplm::time_ffn")
def _time_ffn(x, w_up, w_gate, w_down, warmup, reps):
    _same_device(x=x, w_up=w_up, w_gate=w_gate, w_down=w_down)
    return _times(reps)


@torch.library.register_fake("ziplm::time_ffn_with_output")
def _time_ffn_with_output(x, w_up, w_gate, w_down, warmup, reps):
    _same_device(x=x, w_up=w_up, w_gate=w_gate, w_down=w_down)
    return _times(reps), _block_output(x)
