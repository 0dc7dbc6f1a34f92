"""One search problem -- an OBS database priced by a latency table -- and the search for one target.

The ZipLM search (ZipLM paper, structured SPDY search): every prunable layer offers a grid of
candidate widths, each with the database's pruning error and the table's time; the allocation
for a speedup target picks one width per layer that fits the time budget and minimises the
calibration loss. The search starts from the uniform allocation at the same budget, so its
result is never worse than that baseline on the calibration loss.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from ziplm_ext.stages.database import ObsDatabase
from ziplm_ext.stages.latency.table import LatencyTable
from ziplm_ext.stages.search.spdy import SpdyOptions, spdy_search
from ziplm_ext.stages.search.uniform import uniform_levels

__all__ = ["SearchProblem", "search_target"]


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


def search_target(problem: SearchProblem, target: float, loss, *, evaluations: int, seed: int,
                  progress: bool) -> tuple[dict[str, int], float, dict]:
    """SPDY search for one speedup target, seeded with the uniform allocation at the same budget.

    `loss(widths) -> float` is the objective (a :class:`~.objective.StitchedLoss`). Returns the
    widths found, their loss and search statistics (``evaluations``, ``proposals``,
    ``from_uniform_seed``, ``uniform_loss``)."""
    budget = problem.budget(target)
    uniform = uniform_levels(problem.grids, problem.times, budget, problem.kinds)
    bar = tqdm(total=evaluations, desc=f"SPDY {target:g}x", disable=not progress, leave=False)

    def evaluate(level_indices):
        return loss(problem.to_widths(level_indices))

    def tick(i, total, best):
        bar.total = total
        bar.n = i
        bar.set_postfix(best=f"{best:.4g}")
        bar.refresh()

    n_random = max(1, evaluations // 5)
    options = SpdyOptions(num_random=n_random, num_mutation_rounds=max(0, evaluations - n_random - 1), seed=seed,
                          init_weights=[np.ones(len(problem.names))], seed_solutions=[uniform], buckets=2000)
    res = spdy_search(problem.errors, problem.times, budget, evaluate, options, progress=tick)
    bar.close()
    info = dict(evaluations=res.num_evaluations, proposals=res.num_proposals, from_uniform_seed=res.from_seed,
                uniform_loss=res.history[0] if res.history else None)
    return problem.to_widths(res.level_index), res.loss, info
