"""One search problem -- an OBS database priced by a latency table -- and the search for one target.

The ZipLM search (ZipLM paper, structured SPDY search): every prunable layer offers a grid of
candidate widths, each with the database's pruning error and the table's time; the allocation
for a speedup target picks one width per layer that fits the time budget and minimises the
calibration loss. The search starts from the uniform allocations at the same budget (the
per-kind one of the uniform baseline among them), so its result is never worse than that
baseline on the calibration loss.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from ziplm_ext.errors import UnreachableTargetError
from ziplm_ext.stages.database import ObsDatabase
from ziplm_ext.stages.latency.table import LatencyTable
from ziplm_ext.stages.search.local import local_search
from ziplm_ext.stages.search.spdy import SpdyOptions, spdy_search
from ziplm_ext.stages.search.uniform import uniform_levels, uniform_per_kind_levels

__all__ = ["SearchProblem", "search_target", "seed_allocations"]


class SearchProblem:
    """Each searched layer's grid of candidate widths with their errors and times, for one latency table.

    ``names``, ``grids``, ``errors``, ``kinds`` and ``times`` hold one entry per searched layer (the
    database's layers); ``fixed`` maps layers outside the search (already removed modules) to their
    width, which every allocation keeps.
    """

    def __init__(self, db: ObsDatabase, table: LatencyTable, fixed: Optional[dict[str, int]] = None):
        self.fixed = dict(fixed or {})
        self.names = db.names()
        self.grids = [db[n].grid for n in self.names]
        self.errors = [np.asarray(db[n].errors) for n in self.names]
        self.kinds = [db[n].layer.kind for n in self.names]
        self.set_table(table)

    def set_table(self, table: LatencyTable) -> None:
        """Price the grids with `table` (e.g. a table re-fitted to measurements)."""
        self.table = table
        self.times = [np.asarray([table.layer_time(n, c) for c in grid]) for n, grid in zip(self.names, self.grids)]

    def to_widths(self, level_indices: Sequence[int]) -> dict[str, int]:
        """The widths of every layer (fixed ones included) for one level index per searched layer."""
        return {**self.fixed, **{n: int(grid[i]) for n, grid, i in zip(self.names, self.grids, level_indices)}}

    def budget(self, target: float) -> float:
        """Time the searched layers may take together for the speedup `target`."""
        fixed_time = sum(self.table.layer_time(n, c) for n, c in self.fixed.items())
        return self.table.budget(target) - fixed_time


def seed_allocations(problem: SearchProblem, budget: float) -> list[list[int]]:
    """The cheap allocations every search starts from, best-known first: the per-kind uniform one
    (the uniform baseline's widths), the single-fraction uniform one, and the uniform ones that
    prune only one kind (where they fit). Duplicates dropped; each fits `budget`.

    Raises :class:`UnreachableTargetError` when not even the per-kind uniform allocation fits."""
    seeds = [uniform_per_kind_levels(problem.grids, problem.times, budget, problem.kinds)]
    tries = [lambda: uniform_levels(problem.grids, problem.times, budget, problem.kinds)]
    for kind in sorted(set(problem.kinds)):
        tries.append(lambda k=kind: uniform_levels(problem.grids, problem.times, budget, problem.kinds, [k]))
    for make in tries:
        try:
            levels = make()
        except UnreachableTargetError:
            continue
        if levels not in seeds:
            seeds.append(levels)
    return seeds


def search_target(problem: SearchProblem, target: float, loss, *, evaluations: int, seed: int,
                  progress: bool, local_fraction: float = 0.5) -> tuple[dict[str, int], float, dict]:
    """The search for one speedup target: seeds, SPDY, then local swap moves (ZipLM paper,
    structured SPDY search; swap moves as in OSSCAR).

    The seeds (:func:`seed_allocations`, the per-kind uniform allocation of the uniform baseline
    first) are scored first and stay candidates, so the result's loss is never above theirs. Of
    the remaining ``evaluations`` (distinct loss evaluations in all), ``local_fraction`` goes to
    local search from the best allocation found, the rest to SPDY. `loss(widths) -> float` is the
    objective (a :class:`~.objective.StitchedLoss`). Returns the widths found, their loss and
    search statistics (``evaluations``, ``proposals``, ``from_uniform_seed``, ``uniform_loss`` --
    the per-kind uniform allocation's --, ``seed_losses``, ``spdy_loss``, ``local_accepted``)."""
    if not 0.0 <= local_fraction <= 1.0:
        raise ValueError(f"local_fraction must lie in [0, 1], got {local_fraction!r}")
    budget = problem.budget(target)
    seeds = seed_allocations(problem, budget)
    bar = tqdm(total=evaluations, desc=f"search {target:g}x", disable=not progress, leave=False)
    cache: dict[tuple, float] = {}

    def evaluate(level_indices):
        key = tuple(int(i) for i in level_indices)
        if key not in cache:
            cache[key] = loss(problem.to_widths(key))
            bar.n = len(cache)
            bar.set_postfix(best=f"{min(cache.values()):.4g}")
            bar.refresh()
        return cache[key]

    seeds = seeds[:max(1, evaluations)]
    rest = max(0, evaluations - len(seeds))
    n_spdy = rest - int(round(rest * local_fraction))
    n_init = min(1, n_spdy)
    n_random = (n_spdy - n_init) // 5
    options = SpdyOptions(num_random=n_random, num_mutation_rounds=n_spdy - n_init - n_random, seed=seed,
                          init_weights=[np.ones(len(problem.names))] * n_init, seed_solutions=seeds, buckets=2000)
    res = spdy_search(problem.errors, problem.times, budget, evaluate, options)
    local = local_search(problem.grids, problem.errors, problem.times, budget, evaluate, res.level_index,
                         start_loss=res.loss, max_evaluations=max(0, evaluations - len(cache)), seed=seed)
    bar.close()
    seed_losses = [cache[tuple(s)] for s in seeds]
    info = dict(evaluations=len(cache), proposals=res.num_proposals + local.num_proposals,
                from_uniform_seed=res.from_seed and local.num_accepted == 0, uniform_loss=seed_losses[0],
                seed_losses=seed_losses, spdy_loss=res.loss, local_accepted=local.num_accepted)
    return problem.to_widths(local.level_index), local.loss, info
