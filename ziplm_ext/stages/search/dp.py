"""The knapsack at the heart of the allocation search (ZipLM paper, structured SPDY search). NumPy only.

:func:`solve_dp` -- given each layer's candidate levels with (weighted) errors and times, pick one
level per layer minimising the summed error subject to the summed time fitting a budget (a
knapsack-style dynamic programme over quantised time). :func:`total_time` sums the true times of
a choice.

Conventions: a *level index* is a position in a layer's candidate arrays (``errors[l]``,
``times[l]``), not a structure count; the search modules (:mod:`.spdy`, :mod:`.uniform`) return
lists of level indices, one per layer.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

from ziplm_ext.errors import UnreachableTargetError

__all__ = ["UnreachableTargetError", "solve_dp", "total_time"]


def as_arrays(errors, times):
    """Validate per-layer ``errors``/``times`` and return them as float64 arrays."""
    if len(errors) != len(times):
        raise ValueError(f"errors has {len(errors)} layers but times has {len(times)}")
    if len(errors) == 0:
        raise ValueError("no layers given")
    E, T = [], []
    for l, (e, t) in enumerate(zip(errors, times)):
        e = np.asarray(e, dtype=np.float64).reshape(-1)
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        if e.shape != t.shape or e.size == 0:
            raise ValueError(f"layer {l}: errors and times must be non-empty and of equal length ({e.size} vs {t.size})")
        if np.isnan(e).any() or (e < 0).any():
            raise ValueError(f"layer {l}: errors must be >= 0 (inf allowed, NaN not)")
        if np.isnan(t).any() or (t < 0).any():
            raise ValueError(f"layer {l}: times must be >= 0 (inf = unavailable level, NaN not)")
        E.append(e)
        T.append(t)
    return E, T


def total_time(times: Sequence[np.ndarray], level_indices: Sequence[int]) -> float:
    """Sum of the true (unquantised) times of the chosen levels."""
    return float(sum(float(np.asarray(t, dtype=np.float64)[i]) for t, i in zip(times, level_indices)))


def solve_dp(
    errors: List[np.ndarray],
    times: List[np.ndarray],
    budget: float,
    buckets: int = 10000,
) -> List[int]:
    """Choose one level per layer minimising ``sum errors`` s.t. ``sum times <= budget``.

    ``errors[l][i] >= 0`` and ``times[l][i] >= 0`` describe candidate level ``i`` of
    layer ``l`` (``inf`` error or time marks a level as unavailable). Returns the
    chosen level indices. Cost O(L * levels * buckets), vectorised over buckets.

    Time quantisation: the DP runs on the *excess* time over each layer's cheapest
    level, ``x = t - min_l``, against the slack ``S = budget - sum_l min_l`` (so the
    all-cheapest solution is always representable and the grid is as fine as
    possible). Each excess is mapped to ``ceil(x / w)`` buckets of width
    ``w = S / buckets`` -- rounded UP, so a solution whose quantised total fits in
    ``buckets`` also fits the budget in true time (``x <= ceil(x/w) * w``).
    Tradeoff: rounding up is conservative. Every layer may waste up to one bucket,
    so the DP effectively works with a budget between ``budget - L*w`` and
    ``budget`` and can miss solutions whose true total lies within ``L*w`` of the
    budget (with L=24, buckets=1e4 that is <= 0.24% of the slack). Rounding to
    nearest would be unbiased but could return solutions that exceed the budget,
    i.e. miss the speedup target, which is the worse failure here. Increase
    ``buckets`` to tighten it. Ties in the minimal error are broken towards the
    smallest quantised total time.

    Raises :class:`UnreachableTargetError` if even the cheapest levels do not fit.
    """
    E, T = as_arrays(errors, times)
    budget = float(budget)
    buckets = int(buckets)
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    if not math.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget}")
    # A level is usable only if its time and error are finite.
    usable = [np.isfinite(t) & np.isfinite(e) for e, t in zip(E, T)]
    for l, u in enumerate(usable):
        if not u.any():
            raise ValueError(f"layer {l} has no level with finite error and time")
    min_time = sum(float(t[u].min()) for t, u in zip(T, usable))
    if min_time > budget:
        raise UnreachableTargetError(
            f"unreachable: the minimum achievable time {min_time:.6g}s exceeds the budget {budget:.6g}s"
        )
    # Work with the excess over each layer's cheapest level: the all-cheapest solution
    # then costs 0 buckets (always representable) and the bucket grid only has to span
    # the slack budget - min_time, which makes it finer.
    tmin = [float(t[u].min()) for t, u in zip(T, usable)]
    slack = budget - min_time
    if slack <= 0:
        # Only each layer's cheapest levels fit; take the least error among them.
        out = []
        for e, t, u, m in zip(E, T, usable, tmin):
            cand = np.where(u & (t <= m), e, np.inf)
            out.append(int(np.argmin(cand)))
        return out
    Q = _quantise(T, usable, tmin, slack, buckets)
    return _knapsack(E, Q, buckets, budget)


def _quantise(T, usable, tmin, slack: float, buckets: int) -> List[np.ndarray]:
    """Each level's excess time over its layer's cheapest level in buckets of ``slack / buckets``,
    rounded up (see :func:`solve_dp`); ``buckets + 1`` marks a level that can never fit."""
    # x*buckets/slack may round below the exact quotient in floating point; bump any level
    # whose bucket count does not cover it.
    Q = []
    for t, u, m in zip(T, usable, tmin):
        x = np.where(u, t - m, 0.0)
        with np.errstate(invalid="ignore", over="ignore"):
            q = np.ceil(x * buckets / slack)
            q = q + (q * slack / buckets < x)
        q = np.where(u & (q <= buckets), q, buckets + 1)  # buckets+1 => never fits
        Q.append(q.astype(np.int64))
    return Q


def _knapsack(E: List[np.ndarray], Q: List[np.ndarray], buckets: int, budget: float) -> List[int]:
    """Minimum summed error with the summed quantised times ``<= buckets``; returns level indices."""
    B = buckets + 1
    dp = np.full(B, np.inf)  # dp[b] = min error with quantised total time exactly b
    dp[0] = 0.0
    choice = np.empty((len(E), B), dtype=np.int32)
    new = np.empty(B)
    for l, (e, q) in enumerate(zip(E, Q)):
        new.fill(np.inf)
        ch = choice[l]
        ch.fill(-1)
        for i in np.argsort(q, kind="stable"):  # any order works; argmin ties go to first found
            qi = int(q[i])
            if qi >= B:
                continue
            cand = dp[: B - qi] + e[i]
            seg = new[qi:]
            better = cand < seg
            seg[better] = cand[better]
            ch[qi:][better] = i
        dp, new = new, dp
    if not np.isfinite(dp).any():  # cannot happen after solve_dp's checks, kept as a guard
        raise UnreachableTargetError(f"unreachable: no combination fits the budget {budget:.6g}s")
    b = int(np.argmin(dp))  # first minimum = smallest total time among equal errors
    level_indices = [0] * len(E)
    for l in range(len(E) - 1, -1, -1):
        i = int(choice[l, b])
        assert i >= 0
        level_indices[l] = i
        b -= int(Q[l][i])
    assert b == 0
    return level_indices
