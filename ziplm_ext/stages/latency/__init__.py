"""Latency tables: how long each prunable layer takes at each kept width in one inference
environment (ZipLM paper: the per-layer latency table with which the search meets speedup targets).

* :mod:`~ziplm_ext.stages.latency.table` -- the :class:`LatencyTable` format and its additive time model;
* :mod:`~ziplm_ext.stages.latency.build` -- measuring a table with the environment's engine,
  module overheads, checks of a given table, end-to-end speedups;
* :mod:`~ziplm_ext.stages.latency.correct` -- re-fitting a table to measured speedups.
"""
