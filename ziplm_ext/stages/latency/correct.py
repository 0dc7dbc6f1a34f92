"""Correcting a latency table when end-to-end measurements disagree with its additive prediction
(ZipLM paper: the speedup targets are guaranteed by measuring the pruned models in the inference
environment; here misses re-fit the table).

One least-squares scale factor on the prunable part, :func:`calibrate_table`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence, Tuple

from ziplm_ext.stages.latency.table import LatencyTable

__all__ = ["calibrate_table"]


def calibrate_table(
    table: LatencyTable, measured: Sequence[Tuple[Mapping[str, int], float]]
) -> LatencyTable:
    """Correct ``table`` so that its predictions match end-to-end measured speedups.

    Model: the unprunable part is right, but the isolated block timings are off by one
    common factor ``a`` inside the real model (caches, fusion, threading, layer norms and
    residual adds that scale with the layer). With ``P(levels) = sum_l t_l(level_l)``
    and the dense model fitted exactly (``dense_time`` is kept):

        T(levels) = dense_time - a * (P_dense - P(levels)).

    Each measurement ``(levels_i, s_i)`` gives ``T_i = dense_time / s_i``, i.e. a measured
    time saving ``r_i = dense_time - T_i`` against the predicted saving ``a * D_i`` with
    ``D_i = P_dense - P(levels_i)``.  ``a`` is the least-squares fit
    ``a = sum(r_i D_i) / sum(D_i^2)``, clamped to ``(0, dense_time / P_dense]`` (the table
    needs ``0 < prunable_time <= dense_time``).

    The returned copy has every layer time and ``prunable_time`` multiplied by ``a`` and the
    same ``dense_time``, so ``unprunable_time = dense_time - a * P_dense``.  ``meta["calibration"]``
    records ``a``, the number of measurements, and the relative time errors before and after.
    """
    if not measured:
        raise ValueError("calibrate_table needs at least one (levels, measured_speedup) pair")
    dense = table.dense_time
    p_dense = table.prunable_time
    if p_dense <= 0:
        raise ValueError("table has no prunable time to scale")
    num = den = 0.0
    rows = []
    for levels, s in measured:
        s = float(s)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"measured speedup must be finite and > 0, got {s}")
        p = table.predict_time(levels) - table.unprunable_time
        d = p_dense - p
        r = dense - dense / s
        num += r * d
        den += d * d
        rows.append((levels, s, d))
    if den <= 0:
        raise ValueError("all measurements are of the dense configuration; nothing to calibrate")
    a_fit = num / den
    a = min(max(a_fit, 1e-6), dense / p_dense)
    out = LatencyTable(
        env=table.env,
        dense_time=dense,
        prunable_time=min(a * p_dense, dense),
        layer_times={n: {k: t * a for k, t in row.items()} for n, row in table.layer_times.items()},
        meta=dict(table.meta),
    )

    def rel_err(tab):
        return [tab.predict_time(lv) / (dense / s) - 1.0 for lv, s, _ in rows]

    prev = dict(table.meta.get("calibration") or {})
    out.meta["calibration"] = {
        "scale": a,
        "scale_fit": a_fit,
        "cumulative_scale": a * float(prev.get("cumulative_scale", 1.0)),
        "n_measurements": len(rows),
        "model": "T = dense_time - a * (P_dense - P(levels))",
        "rel_time_error_before": rel_err(table),
        "rel_time_error_after": rel_err(out),
    }
    return out
