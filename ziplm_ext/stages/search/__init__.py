"""Allocation search for a speedup target (ZipLM paper, structured SPDY search).

* :mod:`.dp` -- the knapsack over quantised time (:func:`solve_dp`), NumPy only.
* :mod:`.spdy` -- SPDY: per-layer error weights scored by the real loss (:func:`spdy_search`), NumPy only.
* :mod:`.uniform` -- uniform width fractions: the baseline and the SPDY seed, NumPy only.
* :mod:`.local` -- local swap moves in the width space under the budget (:func:`local_search`), NumPy only.
* :mod:`.objective` -- :class:`StitchedLoss`, the calibration loss SPDY minimises (torch).
* :mod:`.problem` -- :class:`SearchProblem` (one database priced by one latency table) and
  :func:`search_target`, the search for one target (seeds, SPDY, local moves).

The NumPy-only names load eagerly; ``StitchedLoss``, ``SearchProblem`` and ``search_target`` on
first use (they need torch).
"""
from ziplm_ext.errors import UnreachableTargetError
from ziplm_ext.stages.search.dp import solve_dp, total_time
from ziplm_ext.stages.search.local import LocalResult, local_search
from ziplm_ext.stages.search.spdy import SearchResult, SpdyOptions, spdy_search
from ziplm_ext.stages.search.uniform import uniform_allocation, uniform_levels, uniform_per_kind_levels

__all__ = ["UnreachableTargetError", "solve_dp", "total_time", "SearchResult", "SpdyOptions", "spdy_search",
           "uniform_allocation", "uniform_levels", "uniform_per_kind_levels", "LocalResult", "local_search", "StitchedLoss", "SearchProblem",
           "search_target"]


def __getattr__(name):
    if name == "StitchedLoss":
        from ziplm_ext.stages.search.objective import StitchedLoss

        return StitchedLoss
    if name in ("SearchProblem", "search_target"):
        from ziplm_ext.stages.search import problem

        return getattr(problem, name)
    raise AttributeError(f"module 'ziplm_ext.stages.search' has no attribute {name!r}")
