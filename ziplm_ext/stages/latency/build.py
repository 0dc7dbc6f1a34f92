"""Building and checking latency tables (ZipLM paper: the per-layer latency table of the inference
environment, with which the search meets runtime speedup targets).

* :func:`build_latency_table` times one attention block at every kept KV-group / head count and
  one FFN block at a grid of kept widths (:mod:`ziplm_ext.stages.levels`) on random weights of the
  model's shapes, and measures the dense model end to end, all with the environment's engine
  (:func:`ziplm_ext.engines.get_engine`).  The result is a
  :class:`~ziplm_ext.stages.latency.table.LatencyTable` with the additive time model

      T(model) = T_dense - T_prunable + sum_l t_l(level_l).

* :func:`add_module_overheads` adds each module kind's fixed cost, measured end to end;
  :func:`build_environment_table` is the table ``prune`` searches with (both steps).
* :func:`check_table_for_model` and :func:`table_grid_fn` for a table given by the user.
* :func:`measure_speedups` measures real (sliced) models against the dense one end to end,
  interleaved round-robin so that slow drifts of a shared machine hit every variant alike;
  :func:`~ziplm_ext.stages.latency.correct.calibrate_table` (importable from here) corrects a
  table when such measurements disagree with its additive prediction.

Both modes of :class:`~ziplm_ext.env.InferenceEnv` are supported: ``mode="prefill"`` (one forward
pass over ``batch_size x seq_len`` tokens) and ``mode="decode"`` (causal LMs only: one generation
step over a KV cache of ``seq_len`` tokens); see :mod:`ziplm_ext.engines.torch_eager`.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ziplm_ext.adapters import get_adapter
from ziplm_ext.adapters.shapes import ModelShapes, model_shapes
from ziplm_ext.engines import get_engine
from ziplm_ext.engines.base import BlockTimer, Engine
from ziplm_ext.env import InferenceEnv
from ziplm_ext.stages.latency.correct import calibrate_table  # noqa: F401  KEEP: the solve loop imports it from here, tests patch it here
from ziplm_ext.stages.latency.table import LatencyTable
from ziplm_ext.stages.levels import layer_grid, model_grid

__all__ = [
    "build_latency_table",
    "measure_model_time",
    "measure_speedups",
    "calibrate_table",
    "add_module_overheads",
    "build_environment_table",
    "check_table_for_model",
    "table_grid_fn",
]


# --------------------------------------------------------------------------------------
# end-to-end measurements, through the environment's engine
# --------------------------------------------------------------------------------------


def measure_model_time(model, env: InferenceEnv, *, reps: int = 30, warmup: int = 5) -> float:
    """Median seconds of one unit of work of `model` in `env` (a forward pass over random token ids
    of shape ``(batch_size, seq_len)``, or in decode mode one generation step over a KV cache of
    ``seq_len`` tokens), timed by the environment's engine; see
    :func:`ziplm_ext.engines.torch_eager.measure_model_time`."""
    return get_engine(env).model_time(model, env, reps=reps, warmup=warmup)


def measure_speedups(
    dense, models: Sequence, env: InferenceEnv, *, rounds: int = 15, reps_per_round: int = 3, warmup: int = 3
) -> List[float]:
    """End-to-end speedups ``median(dense times) / median(model_i times)``, measured by the
    environment's engine interleaved: each round runs ``reps_per_round`` units of work of the dense
    model, then of ``models[0]``, ``models[1]``, ... (direction alternating between rounds), so that
    slow drifts of a shared machine affect all variants alike; every model is warmed up first.

    Callers look this up as a module global of :mod:`ziplm_ext.stages.latency.build` (tests replace
    it there)."""
    return get_engine(env).speedups(dense, models, env, rounds=rounds, reps_per_round=reps_per_round, warmup=warmup)


# --------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------


def _resolve_levels(model, levels: Optional[Mapping[str, Sequence[int]]]) -> Dict[str, List[int]]:
    """The grid to time per layer: :func:`~ziplm_ext.stages.levels.model_grid`, with the layers
    named in `levels` replaced by the given kept counts plus 0 and the full width."""
    layers = {l.name: l for l in get_adapter(model).prunable_layers(model)}
    out = model_grid(model)
    if levels is not None:
        unknown = sorted(set(levels) - set(layers))
        if unknown:
            raise KeyError(f"levels name unknown layer(s): {', '.join(unknown)}")
        for name, ks in levels.items():
            n = layers[name].num_structures
            ks = sorted({int(k) for k in ks} | {0, n})
            bad = [k for k in ks if not 0 <= k <= n]
            if bad:
                raise ValueError(f"{name}: kept counts {bad} outside [0, {n}]")
            out[name] = ks
    return out


def _time_blocks(timer: BlockTimer, distinct: Sequence[Tuple[str, int]], reps: int, rounds: int, warmup: int,
                 progress: bool) -> Dict[Tuple[str, int], List[Any]]:
    """Per (kind, width): the chunks of per-repetition seconds of `reps` repetitions, split over
    `rounds` passes over all of `distinct` (direction alternating between passes, against drift)."""
    reps_per = [reps // rounds + (1 if r < reps % rounds else 0) for r in range(rounds)]
    samples: Dict[Tuple[str, int], List[Any]] = {key: [] for key in distinct}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(distinct) * rounds, desc="latency table", unit="timing")
    try:
        for r in range(rounds):
            order = distinct if r % 2 == 0 else distinct[::-1]  # alternate direction against drift
            for kind, k in order:
                samples[(kind, k)].append(timer.time_block(kind, k, warmup, reps_per[r]))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return samples


def _summarise(samples: Mapping[Tuple[str, int], List[Any]]):
    """Per (kind, width) the median seconds, and per kind and width the relative spread
    ``(p90 - p10) / median``."""
    medians: Dict[Tuple[str, int], float] = {}
    spreads: Dict[str, Dict[str, float]] = {"attn": {}, "ffn": {}}
    for key, chunks in samples.items():
        t = torch.cat([torch.as_tensor(c) for c in chunks]).to(torch.float64)
        p10, med, p90 = (float(v) for v in t.quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)))
        medians[key] = med
        spreads[key[0]][str(key[1])] = (p90 - p10) / med if med > 0 else float("nan")
    return medians, spreads


def _table_meta(engine: Engine, model, env: InferenceEnv, shapes: ModelShapes, settings: Mapping[str, Any],
                spreads: Mapping[str, Any]) -> Dict[str, Any]:
    """What a table records about how it was measured: the engine's host description, the timing
    `settings` (reps, rounds, warmup, model_reps, timer), the date, the model's shapes and the spreads."""
    return {
        **engine.host_meta(env),
        **settings,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_type": str(getattr(model.config, "model_type", "")),
        "shapes": {
            "hidden": shapes.hidden, "num_heads": shapes.num_heads, "num_kv_heads": shapes.num_kv_heads,
            "head_dim": shapes.head_dim, "d_ff": shapes.d_ff, "gated": shapes.gated, "causal": shapes.causal,
        },
        "spread": dict(spreads),
    }


def _fit_prunable(layer_times: Dict[str, Dict[int, float]], prunable: float, dense: float, meta: Dict[str, Any]):
    """``(layer_times, prunable_time)`` with ``prunable_time <= dense``: block timings in isolation
    can exceed the end-to-end time on a noisy machine; the table format needs prunable <= dense, so
    the layer times are scaled down, with a warning and ``meta["prunable_rescale"]``."""
    if prunable <= dense:
        return layer_times, prunable
    scale = dense / prunable
    warnings.warn(
        f"ziplm_ext: sum of full-width layer times {prunable:.6g}s exceeds the dense end-to-end time "
        f"{dense:.6g}s; scaling layer times by {scale:.4f} (recorded in meta['prunable_rescale'])",
        RuntimeWarning,
        stacklevel=3,
    )
    meta["prunable_rescale"] = scale
    return {n: {k: t * scale for k, t in row.items()} for n, row in layer_times.items()}, dense


def build_latency_table(
    model,
    env: InferenceEnv,
    levels: Optional[Mapping[str, Sequence[int]]] = None,
    *,
    reps: int = 50,
    warmup: int = 5,
    progress: bool = True,
    rounds: int = 3,
    model_reps: int = 30,
    timer: str = "auto",
) -> LatencyTable:
    """Measure a :class:`LatencyTable` for ``model`` (dense, on ``env.device`` / ``env.dtype``).

    Args:
        model: a dense HF model supported by :func:`ziplm_ext.adapters.get_adapter`.
        env: the inference environment (``mode="decode"`` only for causal LMs).
        levels: layer name -> kept counts to time. Layers not named get the default grid
            (every count for attention, :func:`~ziplm_ext.stages.levels.ffn_grid` for FFN); 0 and
            the full width are always added.
        reps: timed repetitions per (kind, kept count), split over ``rounds`` interleaved
            passes (round-robin over all distinct timings, against machine drift); the
            stored time is the median over all repetitions.
        warmup: untimed repetitions before each pass of each timing.
        progress: show a tqdm bar over the distinct timings.
        rounds: interleaved passes (see ``reps``).
        model_reps: repetitions of the dense end-to-end measurement.
        timer: the engine's block clock; PyTorch eager: ``"native"`` (``torch.ops.ziplm`` timing
            loops), ``"python"`` (the ``time.perf_counter`` oracles of :mod:`ziplm_ext.native.timing`)
            or ``"auto"`` (native if the extension works, else python with a warning). Recorded in
            ``meta["timer"]``.

    Every block of a dense model has the same shapes, so each distinct (kind, kept count)
    is timed once and the time reused for all blocks of that kind (the table is still keyed
    by each layer name).  Kept count 0 (removed module) is stored as 0.0 without timing.

    ``meta`` records the torch version, host (CPU model or GPU name), reps, rounds, date,
    timer, and per (kind, kept count) the relative spread ``(p90 - p10) / median``.
    """
    if reps < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"need reps >= 1, warmup >= 0, rounds >= 1 (got {reps}, {warmup}, {rounds})")
    engine = get_engine(env)
    engine.check(model, env)
    layers = get_adapter(model).prunable_layers(model)
    per_layer = _resolve_levels(model, levels)
    shapes = model_shapes(model.config)
    rounds = min(rounds, reps)
    block_timer = engine.block_timer(shapes, env, timer, stacklevel=3)
    distinct = sorted({(l.kind, k) for l in layers for k in per_layer[l.name] if k > 0})
    medians, spreads = _summarise(_time_blocks(block_timer, distinct, reps, rounds, warmup, progress))
    layer_times = {l.name: {k: (0.0 if k == 0 else medians[(l.kind, k)]) for k in per_layer[l.name]} for l in layers}
    prunable = sum(layer_times[l.name][l.num_structures] for l in layers)

    dense = engine.model_time(model, env, reps=model_reps, warmup=warmup)
    reference = engine.reference_meta(model, env, dense, model_reps, warmup, stacklevel=3)
    settings = dict(reps=reps, rounds=rounds, warmup=warmup, model_reps=model_reps, timer=block_timer.timer)
    meta = {**_table_meta(engine, model, env, shapes, settings, spreads), **reference}
    layer_times, prunable = _fit_prunable(layer_times, prunable, dense, meta)
    return LatencyTable(env=env, dense_time=dense, prunable_time=prunable, layer_times=layer_times, meta=meta)


# --------------------------------------------------------------------------------------
# the table prune searches with
# --------------------------------------------------------------------------------------


def add_module_overheads(table: LatencyTable, model: nn.Module, env: InferenceEnv, rounds: int = 15) -> LatencyTable:
    """Add each module's fixed cost to the native block timings.

    The slice-timing ops time the block arithmetic only. A real module also pays a cost that does
    not shrink with its width (framework dispatch, norms, rotary embeddings, residual adds) and
    that vanishes only when the module is removed. We measure it end to end: the dense model
    against copies with every attention (resp. FFN) module removed, interleaved; the saved time per
    module minus its native full-width time is that kind's overhead, added to every kept count > 0.
    A third copy with every module removed measures the unprunable part (embeddings, head, norms)
    directly; when noise makes the modules add up to more than the rest of the model, the kept
    entries are scaled down so that this measured part stays (otherwise the table would claim an
    almost free model and unreachable targets would pass as reachable).
    """
    adapter = get_adapter(model)
    layers = adapter.prunable_layers(model)
    kinds = sorted({l.kind for l in layers})
    variants = []
    for removed in [(kind,) for kind in kinds] + [tuple(kinds)]:
        m = copy.deepcopy(model).eval()
        for l in layers:
            if l.kind in removed:
                adapter.slice(m, l, [])
        variants.append(m)
    # looked up as this module's global on purpose: tests (and only tests) replace it here
    *speedups, s_all = measure_speedups(model, variants, env, rounds=rounds)
    layer_times = {n: dict(row) for n, row in table.layer_times.items()}
    overheads = {}
    for kind, s in zip(kinds, speedups):
        mine = [l for l in layers if l.kind == kind]
        real = table.dense_time * (1 - 1 / s) / len(mine)  # measured time of one full module
        native = float(np.mean([table.layer_time(l.name, l.num_structures) for l in mine]))
        overheads[kind] = max(0.0, real - native)
        for l in mine:
            for k in layer_times[l.name]:
                if k > 0:
                    layer_times[l.name][k] += overheads[kind]
    prunable = sum(layer_times[l.name][l.num_structures] for l in layers)
    unprunable = min(max(table.dense_time / s_all, 0.001 * table.dense_time), 0.95 * table.dense_time)
    limit = table.dense_time - unprunable
    if prunable > limit:  # noise: keep the measured unprunable part, scale the modules down
        scale = limit / prunable
        layer_times = {n: {k: t * scale for k, t in row.items()} for n, row in layer_times.items()}
        prunable = sum(layer_times[l.name][l.num_structures] for l in layers)
    meta = dict(table.meta, module_overheads=overheads, module_removal_speedups=dict(zip(kinds, speedups)),
                all_modules_removed_speedup=s_all)
    return LatencyTable(table.env, table.dense_time, prunable, layer_times, meta)


def build_environment_table(model: nn.Module, env: InferenceEnv, *, ffn_multiple: int = 1, reps: int = 30,
                            rounds: int = 15, progress: bool = True) -> LatencyTable:
    """The latency table `prune` searches with: native block timings on the level grid (FFN widths
    rounded to `ffn_multiple`) plus each module kind's measured fixed overhead. ``ziplm latency``
    writes exactly this, so a saved table can be passed back to ``prune``."""
    grid_fn = functools.partial(layer_grid, ffn_multiple=ffn_multiple)
    layers = get_adapter(model).prunable_layers(model)
    table = build_latency_table(model, env, {l.name: grid_fn(l) for l in layers}, reps=reps, progress=progress)
    table = add_module_overheads(table, model, env, rounds=rounds)
    table.meta["ffn_multiple"] = ffn_multiple
    return table


def check_table_for_model(table: LatencyTable, model: nn.Module, env: InferenceEnv) -> None:
    """A given table must be for this environment and this model's layers at their dense widths."""
    table.check_env(env)
    layers = get_adapter(model).prunable_layers(model)
    missing = [l.name for l in layers if l.name not in table.layer_times]
    extra = sorted(set(table.layer_times) - {l.name for l in layers})
    if missing or extra:
        raise ValueError(f"latency table does not match the model's layers (missing: {', '.join(missing) or '-'}; "
                         f"unknown: {', '.join(extra) or '-'})")
    for l in layers:
        if table.full_count(l.name) != l.num_structures:
            raise ValueError(f"latency table has {table.full_count(l.name)} structures at full width for {l.name}, "
                             f"the model {l.num_structures}: it was measured for another model")


def table_grid_fn(table: LatencyTable):
    """The level grid of a given table: the kept counts it has times for."""
    def levels(layer) -> list[int]:
        return sorted(table.layer_times[layer.name])

    return levels
