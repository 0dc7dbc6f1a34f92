"""Latency of structured slices of a transformer layer: one attention block, one FFN block.

ZipLM prunes whole attention heads and FFN columns, and picks per-layer sparsities from a
table of measured latencies. The timings come from the native ops ``torch.ops.ziplm.time_attention``
and ``torch.ops.ziplm.time_ffn`` (csrc/cpu/slice_timing.cpp, csrc/cuda/slice_timing.cu), whose
timed loop runs entirely in C++: ``std::chrono::steady_clock`` per repetition on CPU, one CUDA
event pair per repetition on the current stream on CUDA. The ops ``time_*_with_output`` run the
same C++ kernels and also return the block output of the last timed repetition (the wrappers'
``return_output=True``), so the maths of the timed code can be checked against the blocks below.

Weights are in ``nn.Linear`` layout ``(out_features, in_features)``; no biases.

Attention block, ``x`` of shape ``(B, T, d)``:
    ``wq (nq*head_dim, d)``, ``wk, wv (nkv*head_dim, d)``, ``wo (d, nq*head_dim)``.
    q, k, v projections -> heads ``(B, h, T, head_dim)`` -> k, v repeated ``nq // nkv`` times
    (grouped-query attention: query head ``i`` reads kv head ``i // (nq // nkv)``, as HF ``repeat_kv``)
    -> scaled-dot-product attention (scale ``1/sqrt(head_dim)``, optional causal mask)
    -> merge heads -> output projection. ``nq == 0`` means the block is removed (nothing runs).

Attention decode step (``time_attention_decode``), ``x`` of shape ``(B, 1, d)``:
    one new token per sequence with a KV cache ``k_cache, v_cache`` of shape ``(B, nkv, L, head_dim)``.
    q, k, v of the new token; k, v appended to the cache (a concatenation, the per-step cost of a
    growing HF ``DynamicCache``); grouped-query repeat; attention of the new token over all
    ``L + 1`` keys (no mask); output projection.

FFN block:
    ``w_up (m, d)``, optional ``w_gate (m, d)``, ``w_down (d, m)``.
    gated (LLaMA): ``down(silu(gate(x)) * up(x))``; ungated (BERT/GPT-2): ``down(gelu(up(x)))``
    with the exact (erf) GELU. ``m == 0`` means the block is removed (nothing runs).

Besides the wrappers this module holds pure-PyTorch oracles (``reference_time_*``, timing the
same maths with a ``time.perf_counter`` loop) and ``*_block_reference`` functions that compute the
block outputs, so the maths of the timed blocks can be tested.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ziplm_ext.native import _native

__all__ = [
    "Timing",
    "time_attention",
    "time_ffn",
    "time_attention_decode",
    "time_attention_decode_with_output",
    "reference_time_attention",
    "reference_time_attention_decode",
    "attention_decode_block_reference",
    "reference_time_ffn",
    "attention_block_reference",
    "ffn_block_reference",
]


@dataclass(frozen=True)
class Timing:
    """Summary of per-repetition latencies of one block.

    Attributes:
        median: median seconds per repetition.
        spread: relative spread ``(p90 - p10) / median`` of the per-repetition times, a
            dimensionless noise measure (0 = perfectly stable; 0.1 = the middle 80% of
            repetitions lie within 10% of the median's size). ``nan`` when the median is 0
            (e.g. a removed block timed by a coarse clock).
        times: the raw per-repetition seconds, float64 on CPU, length ``reps``.
    """

    median: float
    spread: float
    times: torch.Tensor

    @classmethod
    def from_times(cls, times: torch.Tensor) -> "Timing":
        """Summarise a 1-D tensor of per-repetition seconds."""
        t = times.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if t.numel() == 0:
            raise ValueError("ziplm: no timings to summarise")
        p10, median, p90 = (float(v) for v in t.quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)))
        spread = (p90 - p10) / median if median > 0 else math.nan
        return cls(median=median, spread=spread, times=t)


def time_attention(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    wo: torch.Tensor,
    head_dim: int,
    causal: bool = True,
    warmup: int = 3,
    reps: int = 20,
    *,
    return_output: bool = False,
) -> Union[Timing, Tuple[Timing, torch.Tensor]]:
    """Time one attention block with the native op (see the module docstring for the maths).

    Args:
        x: ``(B, T, d)`` input on the target device and dtype; all weights must match it.
        wq: ``(nq*head_dim, d)``; ``nq == 0`` times a removed block (doing nothing).
        wk, wv: ``(nkv*head_dim, d)``; ``nq`` must be a multiple of ``nkv``.
        wo: ``(d, nq*head_dim)``.
        head_dim: size of one head (> 0).
        causal: apply a causal mask in the attention.
        warmup: untimed repetitions first (>= 0).
        reps: timed repetitions (>= 1).
        return_output: also return the block output of the last timed repetition.

    Returns:
        Timing of the ``reps`` repetitions; with ``return_output``, ``(timing, output)`` where
        ``output`` is ``(B, T, d)`` on x's device (zeros for a removed block), made in inference mode.

    Raises:
        ValueError: inconsistent shapes, dtypes or devices, or bad counts.
        RuntimeError: the native extension is not built.
    """
    args = (x, wq, wk, wv, wo, int(head_dim), bool(causal), int(warmup), int(reps))
    if return_output:
        times, out = _native().time_attention_with_output(*args)
        return Timing.from_times(times), out
    return Timing.from_times(_native().time_attention(*args))


def time_attention_decode(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    wo: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    head_dim: int,
    warmup: int = 3,
    reps: int = 20,
) -> Timing:
    """Time one decode step of an attention block with the native op.

    Args:
        x: ``(B, 1, d)``, the new token of each sequence.
        wq, wk, wv, wo: as for :func:`time_attention`.
        k_cache, v_cache: ``(B, nkv, L, head_dim)`` keys / values of the ``L`` cached tokens.
        head_dim, warmup, reps: as for :func:`time_attention`.
    :func:`time_attention_decode_with_output` also returns the block output.
    """
    args = (x, wq, wk, wv, wo, k_cache, v_cache, head_dim, warmup, reps)
    return Timing.from_times(_native().time_attention_decode(*_decode_args(*args)))


def time_attention_decode_with_output(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    wo: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    head_dim: int,
    warmup: int = 3,
    reps: int = 20,
) -> Tuple[Timing, torch.Tensor]:
    """:func:`time_attention_decode` that also returns the ``(B, 1, d)`` block output of the last timed
    repetition (zeros for a removed block), made in inference mode."""
    times, out = _native().time_attention_decode_with_output(
        *_decode_args(x, wq, wk, wv, wo, k_cache, v_cache, head_dim, warmup, reps))
    return Timing.from_times(times), out


def _decode_args(x, wq, wk, wv, wo, k_cache, v_cache, head_dim, warmup, reps) -> tuple:
    return (x, wq, wk, wv, wo, k_cache, v_cache, int(head_dim), int(warmup), int(reps))


def time_ffn(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_gate: Optional[torch.Tensor],
    w_down: torch.Tensor,
    warmup: int = 3,
    reps: int = 20,
    *,
    return_output: bool = False,
) -> Union[Timing, Tuple[Timing, torch.Tensor]]:
    """Time one FFN block with the native op (see the module docstring for the maths).

    Args:
        x: ``(B, T, d)`` input on the target device and dtype; all weights must match it.
        w_up: ``(m, d)``; ``m == 0`` times a removed block (doing nothing).
        w_gate: ``(m, d)`` for a gated SiLU FFN (LLaMA), or ``None`` for a GELU FFN (BERT/GPT-2).
        w_down: ``(d, m)``.
        warmup: untimed repetitions first (>= 0).
        reps: timed repetitions (>= 1).
        return_output: as for :func:`time_attention`.

    Returns:
        Timing of the ``reps`` repetitions; with ``return_output``, ``(timing, output)``.

    Raises:
        ValueError: inconsistent shapes, dtypes or devices, or bad counts.
        RuntimeError: the native extension is not built.
    """
    args = (x, w_up, w_gate, w_down, int(warmup), int(reps))
    if return_output:
        times, out = _native().time_ffn_with_output(*args)
        return Timing.from_times(times), out
    return Timing.from_times(_native().time_ffn(*args))


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch reference: the same maths as csrc/slice_timing_block.h.


def _check_counts(warmup: int, reps: int) -> None:
    if reps < 1:
        raise ValueError(f"ziplm: reps must be >= 1, got {reps}")
    if warmup < 0:
        raise ValueError(f"ziplm: warmup must be >= 0, got {warmup}")


def _attention_heads(wq: torch.Tensor, wk: torch.Tensor, head_dim: int) -> tuple[int, int]:
    if head_dim <= 0:
        raise ValueError(f"ziplm: head_dim must be > 0, got {head_dim}")
    if wq.shape[0] % head_dim or wk.shape[0] % head_dim:
        raise ValueError(f"ziplm: wq/wk rows {wq.shape[0]}/{wk.shape[0]} are not multiples of head_dim {head_dim}")
    nq, nkv = wq.shape[0] // head_dim, wk.shape[0] // head_dim
    if nq and (nkv == 0 or nq % nkv):
        raise ValueError(f"ziplm: nq = {nq} query heads must be a multiple of nkv = {nkv} key/value heads")
    return nq, nkv


def _attention_forward(x, wq, wk, wv, wo, head_dim: int, nq: int, nkv: int, causal: bool) -> Optional[torch.Tensor]:
    if nq == 0:
        return None
    B, T, _ = x.shape

    def heads(y: torch.Tensor, h: int) -> torch.Tensor:
        return y.view(B, T, h, head_dim).transpose(1, 2)

    q = heads(F.linear(x, wq), nq)
    k = heads(F.linear(x, wk), nkv)
    v = heads(F.linear(x, wv), nkv)
    if nkv != nq:
        k = k.repeat_interleave(nq // nkv, dim=1)
        v = v.repeat_interleave(nq // nkv, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.linear(o.transpose(1, 2).reshape(B, T, nq * head_dim), wo)


def _attention_decode_forward(x, wq, wk, wv, wo, k_cache, v_cache, head_dim: int, nq: int,
                              nkv: int) -> Optional[torch.Tensor]:
    if nq == 0:
        return None
    B = x.shape[0]

    def heads(y: torch.Tensor, h: int) -> torch.Tensor:
        return y.view(B, 1, h, head_dim).transpose(1, 2)

    q = heads(F.linear(x, wq), nq)
    k = torch.cat([k_cache, heads(F.linear(x, wk), nkv)], dim=2)
    v = torch.cat([v_cache, heads(F.linear(x, wv), nkv)], dim=2)
    if nkv != nq:
        k = k.repeat_interleave(nq // nkv, dim=1)
        v = v.repeat_interleave(nq // nkv, dim=1)
    o = F.scaled_dot_product_attention(q, k, v)
    return F.linear(o.transpose(1, 2).reshape(B, 1, nq * head_dim), wo)


def _check_decode(x, k_cache, v_cache, nkv: int, head_dim: int) -> None:
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"ziplm: decode timing takes one new token per sequence: x must be (B, 1, d), got {tuple(x.shape)}")
    want = (x.shape[0], nkv, k_cache.shape[2] if k_cache.dim() == 4 else -1, head_dim)
    if k_cache.dim() != 4 or tuple(k_cache.shape) != want or v_cache.shape != k_cache.shape:
        raise ValueError(f"ziplm: k_cache and v_cache must be (B, nkv, L, head_dim) = {want}, "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")


def attention_decode_block_reference(x, wq, wk, wv, wo, k_cache, v_cache, head_dim: int) -> torch.Tensor:
    """Output ``(B, 1, d)`` of the decode step that ``time_attention_decode`` times (zeros when removed)."""
    nq, nkv = _attention_heads(wq, wk, head_dim)
    _check_decode(x, k_cache, v_cache, nkv, head_dim)
    with torch.no_grad():
        y = _attention_decode_forward(x, wq, wk, wv, wo, k_cache, v_cache, head_dim, nq, nkv)
    return torch.zeros_like(x) if y is None else y


def _ffn_forward(x, w_up, w_gate, w_down) -> Optional[torch.Tensor]:
    if w_up.shape[0] == 0:
        return None
    if w_gate is not None:
        return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
    return F.linear(F.gelu(F.linear(x, w_up)), w_down)


def attention_block_reference(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    wo: torch.Tensor,
    head_dim: int,
    causal: bool = True,
) -> torch.Tensor:
    """Output ``(B, T, d)`` of the attention block that ``time_attention`` times.

    A removed block (``nq == 0``) contributes nothing to the residual stream: returns zeros.
    """
    nq, nkv = _attention_heads(wq, wk, head_dim)
    with torch.no_grad():
        y = _attention_forward(x, wq, wk, wv, wo, head_dim, nq, nkv, causal)
    return torch.zeros_like(x) if y is None else y


def ffn_block_reference(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_gate: Optional[torch.Tensor],
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Output ``(B, T, d)`` of the FFN block that ``time_ffn`` times (zeros when ``m == 0``)."""
    with torch.no_grad():
        y = _ffn_forward(x, w_up, w_gate, w_down)
    return torch.zeros_like(x) if y is None else y


def _perf_counter_loop(device: torch.device, warmup: int, reps: int, block: Callable[[], object]) -> torch.Tensor:
    _check_counts(warmup, reps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = torch.empty(reps, dtype=torch.float64)
    with torch.inference_mode():
        for _ in range(warmup):
            block()
        sync()
        for i in range(reps):
            t0 = time.perf_counter()
            block()
            sync()
            times[i] = time.perf_counter() - t0
    return times


def reference_time_attention(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    wo: torch.Tensor,
    head_dim: int,
    causal: bool = True,
    warmup: int = 3,
    reps: int = 20,
) -> torch.Tensor:
    """Oracle for ``time_attention``: a Python ``time.perf_counter`` loop over the same block.

    Returns the raw per-repetition seconds (float64, CPU, length ``reps``). On CUDA each
    repetition ends with ``torch.cuda.synchronize()``, so it includes launch overhead.
    """
    nq, nkv = _attention_heads(wq, wk, head_dim)
    return _perf_counter_loop(x.device, warmup, reps,
                              lambda: _attention_forward(x, wq, wk, wv, wo, head_dim, nq, nkv, causal))


def reference_time_attention_decode(x, wq, wk, wv, wo, k_cache, v_cache, head_dim: int, warmup: int = 3,
                                    reps: int = 20) -> torch.Tensor:
    """Oracle for ``time_attention_decode``: a Python ``time.perf_counter`` loop over the same step."""
    nq, nkv = _attention_heads(wq, wk, head_dim)
    _check_decode(x, k_cache, v_cache, nkv, head_dim)
    return _perf_counter_loop(x.device, warmup, reps, lambda: _attention_decode_forward(
        x, wq, wk, wv, wo, k_cache, v_cache, head_dim, nq, nkv))


def reference_time_ffn(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_gate: Optional[torch.Tensor],
    w_down: torch.Tensor,
    warmup: int = 3,
    reps: int = 20,
) -> torch.Tensor:
    """Oracle for ``time_ffn``: a Python ``time.perf_counter`` loop over the same block.

    Returns the raw per-repetition seconds (float64, CPU, length ``reps``).
    """
    return _perf_counter_loop(x.device, warmup, reps, lambda: _ffn_forward(x, w_up, w_gate, w_down))
