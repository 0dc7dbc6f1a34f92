"""Local search in the width space: swap time between layers under the budget. NumPy only.

After SPDY, the best allocation is refined by moves that keep it within the time budget (the
swap moves of layer-wise combinatorial search, OSSCAR; Meng et al. 2024; and of evolutionary
allocation search, EvoPress; Sieberling et al. 2024): one layer goes up to a wider level, and,
when that no longer fits, another layer goes down by the fewest levels that make it fit again.
A move is kept when the caller's loss drops. Every candidate is scored by the real loss, like
SPDY's; a caller that reuses block outputs (:class:`~.objective.StitchedLoss`) pays only for the
blocks from the first changed one on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

from ziplm_ext.stages.search.dp import as_arrays, total_time

__all__ = ["LocalResult", "local_search"]


@dataclass
class LocalResult:
    """Outcome of :func:`local_search`: the best level indices and their loss, the distinct
    evaluations spent, the moves proposed and the moves accepted (each lowered the loss)."""

    level_index: List[int]
    loss: float
    num_evaluations: int
    num_proposals: int
    num_accepted: int
    history: List[float] = field(default_factory=list)


def _orders(widths, E, T) -> List[np.ndarray]:
    """Each layer's usable levels (finite time and error), narrowest first (ties: cheaper first)."""
    out = []
    for w, e, t in zip(widths, E, T):
        w = np.asarray(w, dtype=np.int64).reshape(-1)
        usable = np.flatnonzero(np.isfinite(e) & np.isfinite(t))
        out.append(usable[np.lexsort((t[usable], w[usable]))])
    return out


class _Moves:
    """Proposes swap moves around the current allocation; see :func:`local_search`."""

    def __init__(self, widths, E, T, budget: float, levels: List[int], rng: np.random.Generator):
        self.T, self.budget, self.rng = T, budget, rng
        self.order = _orders(widths, E, T)
        self.pos = [int(np.flatnonzero(o == i)[0]) if (o == i).any() else -1 for o, i in zip(self.order, levels)]
        self.levels = list(levels)

    def propose(self) -> Optional[List[int]]:
        """A neighbour within the budget: layer i up by 1-2 levels, and (if needed) layer j down
        by the fewest levels that fit; None when the drawn move cannot fit."""
        L = len(self.levels)
        i = int(self.rng.integers(L))
        step = 1 if self.rng.random() < 0.75 else 2
        if self.pos[i] < 0 or self.pos[i] + step >= len(self.order[i]):
            return None
        new = list(self.levels)
        new[i] = int(self.order[i][self.pos[i] + step])
        excess = total_time(self.T, new) - self.budget
        if excess <= 0:
            return new
        j = int(self.rng.integers(L - 1))
        j += j >= i
        if self.pos[j] <= 0:
            return None
        for p in range(self.pos[j] - 1, -1, -1):
            lv = int(self.order[j][p])
            if self.T[j][self.levels[j]] - self.T[j][lv] >= excess:
                new[j] = lv
                return new if total_time(self.T, new) <= self.budget else None
        return None

    def accept(self, levels: List[int]) -> None:
        self.levels = list(levels)
        self.pos = [int(np.flatnonzero(o == i)[0]) if (o == i).any() else -1 for o, i in zip(self.order, levels)]


def local_search(widths: Sequence[Sequence[int]], layer_errors, layer_times, budget: float,
                 evaluate: Callable[[List[int]], float], start: Sequence[int], *, max_evaluations: int,
                 start_loss: Optional[float] = None, seed: int = 0,
                 progress: Optional[Callable[[int, float], None]] = None) -> LocalResult:
    """First-improvement hill climbing over swap moves, from ``start`` (level indices within the budget).

    ``widths[l][i]``: the width of level ``i`` of layer ``l`` (moves go along each layer's levels
    ordered by width); ``layer_errors`` only mark unavailable levels (``inf``); ``layer_times``
    and ``budget`` as for :func:`~.dp.solve_dp`. ``evaluate(levels) -> float`` is the loss (NaN
    counts as +inf); ``start_loss`` its known value at ``start`` (else evaluated first). Stops
    after ``max_evaluations`` distinct evaluations (the start's included when evaluated here), or
    when 50 moves in a row were already seen or could not fit. ``progress(evaluations, best)``
    is called after each evaluation. The result is never worse than the start.
    """
    E, T = as_arrays(layer_errors, layer_times)
    if len(widths) != len(E) or len(start) != len(E):
        raise ValueError(f"widths and start must have one entry per layer ({len(E)})")
    W = [np.asarray(w, dtype=np.int64).reshape(-1) for w in widths]
    if any(w.shape != e.shape for w, e in zip(W, E)):
        raise ValueError("widths must have one entry per level of each layer")
    start = [int(i) for i in start]
    if total_time(T, start) > budget:
        raise ValueError("local_search: the start allocation does not fit the budget")
    seen: dict = {}

    def score(levels) -> float:
        key = tuple(levels)
        if key not in seen:
            v = float(evaluate(list(key)))
            seen[key] = math.inf if math.isnan(v) else v
            if progress is not None:
                progress(len(seen), min(seen.values()))
        return seen[key]

    if start_loss is None:
        best = score(start)
    else:
        best = seen[tuple(start)] = float(start_loss)
    moves = _Moves(W, E, T, float(budget), start, np.random.default_rng(seed))
    proposals = accepted = idle = 0
    while len(seen) < max_evaluations + (start_loss is not None) and idle < 50:
        cand = moves.propose()
        proposals += 1
        if cand is None or tuple(cand) in seen:
            idle += 1
            continue
        idle = 0
        v = score(cand)
        if v < best:
            best, accepted = v, accepted + 1
            moves.accept(cand)
    return LocalResult(moves.levels, best, len(seen) - (start_loss is not None), proposals, accepted,
                       list(seen.values()))
