"""SPDY: search per-layer error weights, score each by the real loss (ZipLM paper, structured SPDY search).

A weight vector ``c in [0,1]^L`` rescales each layer's database errors; :func:`~.dp.solve_dp` turns it
into one level per layer that fits the time budget, and the caller's ``evaluate`` (the calibration
loss of the stitched model) scores that choice. The search looks for the ``c`` whose choice scores
best. NumPy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

from ziplm_ext.stages.search.dp import as_arrays, solve_dp, total_time

__all__ = ["SpdyOptions", "SearchResult", "spdy_search"]

Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class SpdyOptions:
    """How :func:`spdy_search` proposes candidates.

    ``seed_solutions``: level-index lists (e.g. :func:`~.uniform.uniform_levels` at the same budget),
    evaluated first and kept as candidates; each must fit the budget. ``init_weights``: weight vectors
    tried next (e.g. ``[np.ones(L)]``). Then ``num_random`` vectors drawn uniformly from [0,1]^L, then
    ``num_mutation_rounds`` rounds of local search resampling ``k`` coordinates, ``k`` shrinking
    linearly from ``max_mutations`` (default ``max(1, ceil(L/10))``) to 1. ``buckets``: time
    quantisation of :func:`~.dp.solve_dp`. ``seed``: the random generator's seed.
    """

    num_random: int = 100
    num_mutation_rounds: int = 1000
    max_mutations: Optional[int] = None
    seed: int = 0
    init_weights: Optional[Sequence[Sequence[float]]] = None
    seed_solutions: Optional[Sequence[Sequence[int]]] = None
    buckets: int = 10000


@dataclass
class SearchResult:
    """Outcome of :func:`spdy_search`.

    ``level_index``/``loss``: the best assignment found (a position in each layer's grid) and its evaluated loss.
    ``weights``: the weight vector ``c`` whose DP solution is ``level_index``, or ``None``
    when the best assignment is one of the ``seed_solutions`` (``from_seed`` True).
    ``search_weights``: the best weight vector found by the search itself (its loss
    is ``search_loss``; it may be worse than a seed solution).
    ``num_evaluations``: distinct calls to ``evaluate``; ``num_proposals``: candidates
    tried (cache hits included). ``history``: loss of each evaluation, in order.
    """

    level_index: List[int]
    loss: float
    weights: Optional[np.ndarray]
    num_evaluations: int
    history: List[float] = field(default_factory=list)
    from_seed: bool = False
    search_weights: Optional[np.ndarray] = None
    search_loss: float = math.inf
    num_proposals: int = 0


class _Run:
    """State of one search: the evaluation cache, the overall best and the local-search state."""

    def __init__(self, E, T, budget: float, evaluate, buckets: int, total: int, progress: Optional[Progress]):
        self.E, self.T, self.budget, self.evaluate, self.buckets = E, T, budget, evaluate, buckets
        self.total, self.progress, self.step = total, progress, 0
        self.cache: dict = {}
        self.history: List[float] = []
        self.best_levels: Optional[List[int]] = None
        self.best_loss = math.inf
        self.best_from_seed = False
        self.best_weights: Optional[np.ndarray] = None
        self.c_best: Optional[np.ndarray] = None  # local-search state
        self.c_best_loss = math.inf

    def score(self, levels) -> float:
        key = tuple(int(i) for i in levels)
        if key not in self.cache:
            v = float(self.evaluate(list(key)))
            if math.isnan(v):
                v = math.inf
            self.cache[key] = v
            self.history.append(v)
        return self.cache[key]

    def tick(self) -> None:
        self.step += 1
        if self.progress is not None:
            self.progress(self.step, self.total, self.best_loss)

    def add_seed(self, s: List[int]) -> None:
        v = self.score(s)
        if self.best_levels is None or v < self.best_loss:
            self.best_levels, self.best_loss, self.best_from_seed, self.best_weights = s, v, True, None
        self.tick()

    def consider(self, c: np.ndarray, accept_ties: bool) -> None:
        levels = solve_dp([ci * e for ci, e in zip(c, self.E)], self.T, self.budget, self.buckets)
        v = self.score(levels)
        if self.c_best is None or v < self.c_best_loss or (accept_ties and v == self.c_best_loss):
            self.c_best, self.c_best_loss = c.copy(), v
        # Strict improvement only for the overall best: seeds win ties.
        if self.best_levels is None or v < self.best_loss:
            self.best_levels, self.best_loss, self.best_from_seed, self.best_weights = levels, v, False, c.copy()
        self.tick()

    def result(self) -> SearchResult:
        if self.best_levels is None:
            raise ValueError("spdy_search: nothing to evaluate (no seeds, init weights, random starts or rounds)")
        return SearchResult(level_index=list(self.best_levels), loss=self.best_loss, weights=self.best_weights,
                            num_evaluations=len(self.cache), history=self.history, from_seed=self.best_from_seed,
                            search_weights=None if self.c_best is None else self.c_best.copy(),
                            search_loss=self.c_best_loss, num_proposals=self.step)


def _checked_seeds(seed_solutions, E, T, budget: float) -> List[List[int]]:
    L = len(E)
    seeds = [list(map(int, s)) for s in (seed_solutions or [])]
    for j, s in enumerate(seeds):
        if len(s) != L or any(not (0 <= i < len(E[l])) for l, i in enumerate(s)):
            raise ValueError(f"seed_solutions[{j}] must give one valid level index for each of the {L} layers")
        t = total_time(T, s)
        if t > budget:
            raise ValueError(f"seed_solutions[{j}] takes {t:.6g}s, over the budget {budget:.6g}s")
    return seeds


def _checked_inits(init_weights, L: int) -> List[np.ndarray]:
    inits = [np.clip(np.asarray(w, dtype=np.float64).reshape(-1), 0.0, 1.0) for w in (init_weights or [])]
    for j, w in enumerate(inits):
        if w.size != L:
            raise ValueError(f"init_weights[{j}] has {w.size} entries, expected {L}")
    return inits


def spdy_search(
    layer_errors: List[np.ndarray],
    layer_times: List[np.ndarray],
    budget: float,
    evaluate: Callable[[List[int]], float],
    options: Optional[SpdyOptions] = None,
    progress: Optional[Progress] = None,
) -> SearchResult:
    """SPDY search (per-layer error reweighting scored by the real loss).

    For a weight vector ``c in [0,1]^L`` the candidate is
    ``solve_dp([c_l * layer_errors[l]], layer_times, budget, options.buckets)``, scored by
    ``evaluate(level_indices) -> float`` (the caller's calibration loss of the stitched model;
    lower is better; NaN counts as +inf). Evaluations are cached by the level tuple, so a weight
    vector that maps to an already-seen assignment costs nothing.

    Order of proposals (:class:`SpdyOptions`): the seed solutions (the result is never worse than
    the best of them), the initial weights, the random vectors, then the mutation rounds from the
    best weight vector so far; a mutation whose loss is <= the current one is accepted (ties
    accepted so the search can drift across plateaus of c that map to the same assignment).

    ``progress(i, total, best_loss)`` is called after each proposal (i is 1-based).
    Deterministic given ``options.seed`` (and a deterministic ``evaluate``).
    """
    opts = options or SpdyOptions()
    E, T = as_arrays(layer_errors, layer_times)
    L = len(E)
    rng = np.random.default_rng(opts.seed)
    seeds = _checked_seeds(opts.seed_solutions, E, T, budget)
    inits = _checked_inits(opts.init_weights, L)
    max_mutations = opts.max_mutations if opts.max_mutations is not None else max(1, math.ceil(L / 10))
    max_mutations = int(min(max(1, max_mutations), L))
    R = int(opts.num_mutation_rounds)
    run = _Run(E, T, budget, evaluate, opts.buckets, len(seeds) + len(inits) + int(opts.num_random) + R, progress)
    for s in seeds:
        run.add_seed(s)
    for c in inits:
        run.consider(c, accept_ties=False)
    for _ in range(int(opts.num_random)):
        run.consider(rng.random(L), accept_ties=False)
    for r in range(R):
        if run.c_best is None:  # no start points given: start from a random vector
            run.consider(rng.random(L), accept_ties=False)
            continue
        k = max(1, int(round(max_mutations - (max_mutations - 1) * r / max(1, R - 1))))
        c = run.c_best.copy()
        idx = rng.choice(L, size=k, replace=False)
        c[idx] = rng.random(k)
        run.consider(c, accept_ties=True)
    return run.result()
