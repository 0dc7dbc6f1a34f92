"""Allocation search for a speedup target (ZIPLM.md section 5). NumPy only.

* :func:`solve_dp` -- given per-layer candidate levels with (weighted) errors and
  times, pick one level per layer minimising the summed error subject to the summed
  time fitting a budget (knapsack-style DP over quantised time).
* :func:`spdy_search` -- SPDY: search per-layer error weights ``c in [0,1]^L``; each
  ``c`` gives a DP solution whose *real* calibration loss (``evaluate``) is the score.
* :func:`uniform_levels` -- the uniform-fraction baseline at the same budget, used as
  a baseline and as a seed for SPDY.

Conventions: "level" here always means an *index* into the per-layer candidate
arrays (``errors[l]``, ``times[l]``, ``level_counts[l]``), not a structure count.
"""

from __future__ import annotations

from ziplm_ext.errors import UnreachableTargetError  # noqa: F401  (raised here; re-exported)

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

__all__ = [
    "UnreachableTargetError",
    "solve_dp",
    "SearchResult",
    "spdy_search",
    "uniform_levels",
    "uniform_allocation",
    "total_time",
]


def _as_arrays(errors, times):
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


def total_time(times: Sequence[np.ndarray], levels: Sequence[int]) -> float:
    """Sum of the true (unquantised) times of the chosen levels."""
    return float(sum(float(np.asarray(t, dtype=np.float64)[i]) for t, i in zip(times, levels)))


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
    E, T = _as_arrays(errors, times)
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

    # Quantise (conservatively, see docstring). x*buckets/slack may round below the
    # exact quotient in floating point; bump any level whose bucket count does not cover it.
    Q = []
    for t, u, m in zip(T, usable, tmin):
        x = np.where(u, t - m, 0.0)
        with np.errstate(invalid="ignore", over="ignore"):
            q = np.ceil(x * buckets / slack)
            q = q + (q * slack / buckets < x)
        q = np.where(u & (q <= buckets), q, buckets + 1)  # buckets+1 => never fits
        Q.append(q.astype(np.int64))

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
    if not np.isfinite(dp).any():  # cannot happen after the checks above, kept as a guard
        raise UnreachableTargetError(f"unreachable: no combination fits the budget {budget:.6g}s")
    b = int(np.argmin(dp))  # first minimum = smallest total time among equal errors
    levels = [0] * len(E)
    for l in range(len(E) - 1, -1, -1):
        i = int(choice[l, b])
        assert i >= 0
        levels[l] = i
        b -= int(Q[l][i])
    assert b == 0
    return levels


# ---------------------------------------------------------------------------- SPDY


@dataclass
class SearchResult:
    """Outcome of :func:`spdy_search`.

    ``levels``/``loss``: the best assignment found and its evaluated loss.
    ``weights``: the weight vector ``c`` whose DP solution is ``levels``, or ``None``
    when the best assignment is one of the ``seed_solutions`` (``from_seed`` True).
    ``search_weights``: the best weight vector found by the search itself (its loss
    is ``search_loss``; it may be worse than a seed solution).
    ``num_evaluations``: distinct calls to ``evaluate``; ``num_proposals``: candidates
    tried (cache hits included). ``history``: loss of each evaluation, in order.
    """

    levels: List[int]
    loss: float
    weights: Optional[np.ndarray]
    num_evaluations: int
    history: List[float] = field(default_factory=list)
    from_seed: bool = False
    search_weights: Optional[np.ndarray] = None
    search_loss: float = math.inf
    num_proposals: int = 0


def spdy_search(
    layer_errors: List[np.ndarray],
    layer_times: List[np.ndarray],
    budget: float,
    evaluate: Callable[[List[int]], float],
    *,
    num_random: int = 100,
    num_mutation_rounds: int = 1000,
    max_mutations: Optional[int] = None,
    seed: int = 0,
    init_weights: Optional[Sequence[Sequence[float]]] = None,
    seed_solutions: Optional[Sequence[Sequence[int]]] = None,
    buckets: int = 10000,
    progress: Optional[Callable[[int, int, float], None]] = None,
) -> SearchResult:
    """SPDY search (per-layer error reweighting scored by the real loss).

    For a weight vector ``c in [0,1]^L`` the candidate is
    ``solve_dp([c_l * layer_errors[l]], layer_times, budget, buckets)``, scored by
    ``evaluate(levels) -> float`` (the caller's calibration loss of the stitched
    model; lower is better; NaN counts as +inf). Evaluations are cached by the level
    tuple, so a weight vector that maps to an already-seen assignment costs nothing.

    Order of proposals:
      1. ``seed_solutions`` (level index lists, e.g. :func:`uniform_levels` at the same
         budget): evaluated and kept as candidates; each must fit the budget. The
         result is never worse than the best of them.
      2. ``init_weights`` (e.g. ``[np.ones(L)]``), then ``num_random`` vectors drawn
         uniformly from [0,1]^L.
      3. ``num_mutation_rounds`` rounds of local search from the best weight vector
         so far: resample ``k`` random coordinates uniformly in [0,1], with ``k``
         shrinking linearly from ``max_mutations`` (default ``max(1, ceil(L/10))``)
         to 1 over the rounds; a proposal whose loss is <= the current one is
         accepted (ties accepted so the search can drift across plateaus of c that
         map to the same assignment).

    ``progress(i, total, best_loss)`` is called after each proposal (i is 1-based).
    Deterministic given ``seed`` (and a deterministic ``evaluate``).
    """
    E, T = _as_arrays(layer_errors, layer_times)
    L = len(E)
    rng = np.random.default_rng(seed)
    cache: dict = {}
    history: List[float] = []

    def score(levels) -> float:
        key = tuple(int(i) for i in levels)
        if key not in cache:
            v = float(evaluate(list(key)))
            if math.isnan(v):
                v = math.inf
            cache[key] = v
            history.append(v)
        return cache[key]

    def solve(c):
        return solve_dp([ci * e for ci, e in zip(c, E)], T, budget, buckets)

    seeds = [list(map(int, s)) for s in (seed_solutions or [])]
    for j, s in enumerate(seeds):
        if len(s) != L or any(not (0 <= i < len(E[l])) for l, i in enumerate(s)):
            raise ValueError(f"seed_solutions[{j}] must give one valid level index for each of the {L} layers")
        t = total_time(T, s)
        if t > budget:
            raise ValueError(f"seed_solutions[{j}] takes {t:.6g}s, over the budget {budget:.6g}s")
    inits = [np.clip(np.asarray(w, dtype=np.float64).reshape(-1), 0.0, 1.0) for w in (init_weights or [])]
    for j, w in enumerate(inits):
        if w.size != L:
            raise ValueError(f"init_weights[{j}] has {w.size} entries, expected {L}")
    if max_mutations is None:
        max_mutations = max(1, math.ceil(L / 10))
    max_mutations = int(min(max(1, max_mutations), L))

    total = len(seeds) + len(inits) + int(num_random) + int(num_mutation_rounds)
    step = 0
    best_levels: Optional[List[int]] = None
    best_loss = math.inf
    best_from_seed = False
    best_weights: Optional[np.ndarray] = None
    c_best: Optional[np.ndarray] = None  # search state
    c_best_loss = math.inf
    c_best_levels: Optional[List[int]] = None

    def tick():
        nonlocal step
        step += 1
        if progress is not None:
            progress(step, total, best_loss)

    for s in seeds:
        v = score(s)
        if best_levels is None or v < best_loss:
            best_levels, best_loss, best_from_seed, best_weights = s, v, True, None
        tick()

    def consider(c, accept_ties: bool) -> None:
        nonlocal best_levels, best_loss, best_from_seed, best_weights, c_best, c_best_loss, c_best_levels
        levels = solve(c)
        v = score(levels)
        if c_best is None or v < c_best_loss or (accept_ties and v == c_best_loss):
            c_best, c_best_loss, c_best_levels = c.copy(), v, levels
        # Strict improvement only for the overall best: seeds win ties.
        if best_levels is None or v < best_loss:
            best_levels, best_loss, best_from_seed, best_weights = levels, v, False, c.copy()
        tick()

    for c in inits:
        consider(c, accept_ties=False)
    for _ in range(int(num_random)):
        consider(rng.random(L), accept_ties=False)
    R = int(num_mutation_rounds)
    for r in range(R):
        if c_best is None:  # no start points given: start from a random vector
            consider(rng.random(L), accept_ties=False)
            continue
        k = max(1, int(round(max_mutations - (max_mutations - 1) * r / max(1, R - 1))))
        c = c_best.copy()
        idx = rng.choice(L, size=k, replace=False)
        c[idx] = rng.random(k)
        consider(c, accept_ties=True)

    if best_levels is None:
        raise ValueError("spdy_search: nothing to evaluate (no seeds, init weights, random starts or rounds)")
    return SearchResult(
        levels=list(best_levels),
        loss=best_loss,
        weights=best_weights,
        num_evaluations=len(cache),
        history=history,
        from_seed=best_from_seed,
        search_weights=None if c_best is None else c_best.copy(),
        search_loss=c_best_loss,
        num_proposals=step,
    )


# ------------------------------------------------------------------- uniform baseline


def _level_at_fraction(counts: np.ndarray, times: np.ndarray, f: float) -> int:
    """Index of the level with the largest kept count <= ``f * full`` (among equal counts the
    cheaper one; the smallest count if none is that small; the widest level of an empty layer)."""
    full = int(counts.max())
    if full == 0:
        return int(np.argmax(counts))
    ok = counts <= f * full + 1e-9 * full
    idx = np.flatnonzero(counts == (counts[ok].max() if ok.any() else counts.min()))
    return int(idx[np.argmin(times[idx])])


def uniform_allocation(
    level_counts: Sequence[Sequence[int]],
    times: Sequence[Sequence[float]],
    budget: float,
    kinds: Optional[Sequence[str]] = None,
    prune_kinds: Optional[Sequence[str]] = None,
):
    """Like :func:`uniform_levels` but returns ``(levels, fraction)``."""
    L = len(level_counts)
    if len(times) != L or L == 0:
        raise ValueError(f"level_counts has {L} layers but times has {len(times)}")
    C = [np.asarray(c, dtype=np.int64).reshape(-1) for c in level_counts]
    T = [np.asarray(t, dtype=np.float64).reshape(-1) for t in times]
    for l, (c, t) in enumerate(zip(C, T)):
        if c.size == 0 or c.shape != t.shape:
            raise ValueError(f"layer {l}: level_counts and times must be non-empty and of equal length")
        if (c < 0).any() or np.isnan(t).any() or (t < 0).any():
            raise ValueError(f"layer {l}: counts must be >= 0 and times >= 0")
    if kinds is not None and len(kinds) != L:
        raise ValueError(f"kinds has {len(kinds)} entries, expected {L}")
    if prune_kinds is not None and kinds is None:
        raise ValueError("prune_kinds needs kinds")
    pruned = [True] * L if prune_kinds is None else [k in set(prune_kinds) for k in kinds]
    full = [int(c.max()) for c in C]

    def pick(l: int, f: float) -> int:
        return _level_at_fraction(C[l], T[l], f if pruned[l] else 1.0)

    fracs = {1.0, 0.0}
    for l in range(L):
        if pruned[l] and full[l] > 0:
            fracs.update(float(x) / full[l] for x in C[l])
    min_t = None
    for f in sorted(fracs, reverse=True):
        levels = [pick(l, f) for l in range(L)]
        t = total_time(T, levels)
        min_t = t if min_t is None else min(min_t, t)
        if t <= budget:
            return levels, f
    raise UnreachableTargetError(
        f"unreachable: the smallest uniform allocation takes {min_t:.6g}s, over the budget {float(budget):.6g}s"
    )


def uniform_levels(
    level_counts: Sequence[Sequence[int]],
    times: Sequence[Sequence[float]],
    budget: float,
    kinds: Optional[Sequence[str]] = None,
    prune_kinds: Optional[Sequence[str]] = None,
) -> List[int]:
    """Uniform-fraction allocation: the baseline and the natural SPDY seed.

    ``level_counts[l][i]`` is the number of structures kept at candidate level ``i``
    of layer ``l`` and ``times[l][i]`` its time. The full width of layer ``l`` is
    ``max(level_counts[l])``.

    Semantics: for a fraction ``f in [0,1]``, layer ``l`` takes the level with the
    largest kept count ``<= f * full_l`` (closest from below; among equal counts the
    cheaper one; if no level is that small, its smallest-count level). One ``f`` is
    shared by all pruned layers, so every layer of the same kind with the same grid
    gets the same level. Candidate fractions are ``{0, 1}`` and every ``count/full_l``
    of every pruned layer; they are tried from the largest down and the first whose
    summed time is ``<= budget`` is returned (this is the largest fitting fraction
    even if the measured times are not monotone in the count).

    ``kinds`` (one label per layer, e.g. ``"attn"``/``"ffn"``) with ``prune_kinds``
    restricts pruning to those kinds; layers of other kinds stay at full width
    (e.g. ``prune_kinds=["ffn"]`` for the uniform FFN-only baseline). Without
    ``prune_kinds`` every layer is pruned.

    Returns level indices. Raises :class:`UnreachableTargetError` if even ``f = 0``
    does not fit.
    """
    return uniform_allocation(level_counts, times, budget, kinds, prune_kinds)[0]


def uniform_per_kind_levels(
    level_counts: Sequence[Sequence[int]],
    times: Sequence[Sequence[float]],
    budget: float,
    kinds: Sequence[str],
) -> List[int]:
    """Uniform baseline with one width fraction per layer kind (e.g. one for all attention
    layers, one for all FFNs), chosen to meet ``budget`` as tightly as possible.

    A single shared fraction moves in coarse steps when one kind has few structures (3 KV
    groups: 1, 2/3, 1/3, 0), so the plain uniform model often lands far beyond its target.
    Here every combination of per-kind fractions (each from that kind's candidate fractions,
    with :func:`uniform_levels`' rounding) is tried, and the one with the largest predicted
    time that still fits the budget is returned (ties: the larger fraction of the first kind).
    Still "the same width in every layer of a kind": no per-layer choice is made.

    Raises :class:`UnreachableTargetError` if no combination fits.
    """
    if len(kinds) != len(level_counts):
        raise ValueError(f"kinds has {len(kinds)} entries, expected {len(level_counts)}")
    names = sorted(set(kinds))
    C = [np.asarray(c, dtype=np.int64).reshape(-1) for c in level_counts]
    T = [np.asarray(t, dtype=np.float64).reshape(-1) for t in times]
    per_kind = {}
    for k in names:
        fr = {0.0, 1.0}
        for c, kk in zip(level_counts, kinds):
            if kk == k and max(c) > 0:
                fr.update(float(x) / max(c) for x in c)
        per_kind[k] = sorted(fr, reverse=True)
    best, best_t = None, -1.0
    for combo in itertools.product(*(per_kind[k] for k in names)):
        frac = dict(zip(names, combo))
        levels = [_level_at_fraction(c, t, frac[kk]) for c, t, kk in zip(C, T, kinds)]
        t = total_time(T, levels)
        if t <= budget and t > best_t:
            best, best_t = levels, t
    if best is None:
        raise UnreachableTargetError(f"no per-kind uniform allocation fits the time budget {budget:.6g}s")
    return best
