"""Uniform allocations: one width fraction shared by the layers (of a kind) at a time budget. NumPy only.

The baseline ZipLM is compared against (ZipLM paper, comparison with uniform structured pruning)
and the natural seed of the SPDY search. ``grids[l][i]`` is the width (kept structures) of
candidate level ``i`` of layer ``l``; the functions return level indices.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence

import numpy as np

from ziplm_ext.errors import UnreachableTargetError
from ziplm_ext.stages.search.dp import total_time

__all__ = ["uniform_levels", "uniform_allocation", "uniform_per_kind_levels"]


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
    grids: Sequence[Sequence[int]],
    times: Sequence[Sequence[float]],
    budget: float,
    kinds: Optional[Sequence[str]] = None,
    prune_kinds: Optional[Sequence[str]] = None,
):
    """Like :func:`uniform_levels` but returns ``(level indices, fraction)``."""
    L = len(grids)
    if len(times) != L or L == 0:
        raise ValueError(f"grids has {L} layers but times has {len(times)}")
    C = [np.asarray(c, dtype=np.int64).reshape(-1) for c in grids]
    T = [np.asarray(t, dtype=np.float64).reshape(-1) for t in times]
    for l, (c, t) in enumerate(zip(C, T)):
        if c.size == 0 or c.shape != t.shape:
            raise ValueError(f"layer {l}: grids and times must be non-empty and of equal length")
        if (c < 0).any() or np.isnan(t).any() or (t < 0).any():
            raise ValueError(f"layer {l}: widths must be >= 0 and times >= 0")
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
    grids: Sequence[Sequence[int]],
    times: Sequence[Sequence[float]],
    budget: float,
    kinds: Optional[Sequence[str]] = None,
    prune_kinds: Optional[Sequence[str]] = None,
) -> List[int]:
    """Uniform-fraction allocation: the baseline and the natural SPDY seed.

    ``grids[l][i]`` is the number of structures kept at candidate level ``i``
    of layer ``l`` and ``times[l][i]`` its time. The full width of layer ``l`` is
    ``max(grids[l])``.

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
    return uniform_allocation(grids, times, budget, kinds, prune_kinds)[0]


def uniform_per_kind_levels(
    grids: Sequence[Sequence[int]],
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
    if len(kinds) != len(grids):
        raise ValueError(f"kinds has {len(kinds)} entries, expected {len(grids)}")
    names = sorted(set(kinds))
    C = [np.asarray(c, dtype=np.int64).reshape(-1) for c in grids]
    T = [np.asarray(t, dtype=np.float64).reshape(-1) for t in times]
    per_kind = {}
    for k in names:
        fr = {0.0, 1.0}
        for c, kk in zip(grids, kinds):
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
