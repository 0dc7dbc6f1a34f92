"""FLOP end to end (Wang, Wohlwend, Lei, EMNLP 2020): one independently trained model per speedup target.

Per target: the speedup is mapped to a density of the factorised layers on the measured speedup curve
(:mod:`ziplm_ext.methods.flop.curve`), a copy of the factorised model is distilled from the dense model with
the Lagrangian size constraint (:mod:`ziplm_ext.methods.flop.train`), exported
(:mod:`ziplm_ext.methods.flop.export`), timed, shrunk if it misses its target, and evaluated.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ziplm_ext.adapters import get_adapter
from ziplm_ext.config import FlopConfig, validate_targets
from ziplm_ext.engines import in_env
from ziplm_ext.env import InferenceEnv
from ziplm_ext.errors import UnreachableTargetError
from ziplm_ext.eval.evaluate import evaluate_model
from ziplm_ext.methods.flop.curve import SpeedupCurve, measure_speedup_curve, shrink_factor
from ziplm_ext.methods.flop.export import (export_flop_model, exported_density, flop_ranks, model_ranks,
                                           shrunk_ranks)
from ziplm_ext.methods.flop.factorize import factorize_model, factorized_layers
from ziplm_ext.methods.flop.train import train_flop
from ziplm_ext.results import MIN_SPEEDUP_FRACTION, PrunedFamily, PrunedResult, num_parameters
from ziplm_ext.stages.distill import DistillConfig, check_train_data
from ziplm_ext.stages.latency import build as latency  # measure_speedups looked up at call time (tests patch it)

__all__ = ["flop_prune"]


def _config_with(config: Optional[FlopConfig], legacy: dict) -> FlopConfig:
    """``config`` (default ``FlopConfig()``) with the old keyword arguments of :func:`flop_prune` applied."""
    names = {f.name for f in dataclasses.fields(FlopConfig)}
    unknown = sorted(set(legacy) - names)
    if unknown:
        raise TypeError(f"flop_prune() got unexpected keyword argument(s): {', '.join(unknown)}")
    config = config or FlopConfig()
    if legacy:
        warnings.warn(f"flop_prune({', '.join(k + '=' for k in sorted(legacy))}) is deprecated: pass "
                      f"config=FlopConfig({', '.join(k + '=...' for k in sorted(legacy))})",
                      DeprecationWarning, stacklevel=3)
        config = dataclasses.replace(config, **legacy)
    return config


@dataclass
class _TargetRun:
    """One target's model through training, export, measurement and evaluation."""

    target: float
    density: float        # the curve's density for the target (the training goal)
    student: Any          # the factorised, trained model
    stats: Any            # FinetuneStats of its training
    expected: float       # the constraint's measure s_hat at the end of training
    ranks: dict
    model: Optional[nn.Module] = None  # the exported model
    measured: float = math.nan
    shrinks: int = 0


def _train_targets(model, base, train_data, densities: dict, config: FlopConfig, distill) -> list[_TargetRun]:
    """A trained copy of the factorised ``base`` per target (distilled from ``model``), in target order."""
    runs = []
    for t, density in densities.items():
        student = copy.deepcopy(base)
        stats, ctl = train_flop(student, model, train_data, density, config, distill, desc=f"FLOP {t:g}x")
        with torch.no_grad():
            s_hat = float(ctl.expected_density())
        runs.append(_TargetRun(t, density, student, stats, s_hat, flop_ranks(student)))
    return runs


def _measure(model, runs: list[_TargetRun], env: InferenceEnv, rounds: int) -> None:
    speeds = latency.measure_speedups(model, [r.model for r in runs], env, rounds=rounds)
    for r, s in zip(runs, speeds):
        r.measured = s


def _export_and_measure(model, runs: list[_TargetRun], curve: SpeedupCurve, env: InferenceEnv,
                        config: FlopConfig) -> None:
    """Export every run, time them together against ``model``; shrink and re-time the ones below
    ``MIN_SPEEDUP_FRACTION`` x their target, at most ``config.max_shrinks`` times, then raise
    :class:`~ziplm_ext.errors.UnreachableTargetError` for any still missing."""
    for r in runs:
        r.model = export_flop_model(r.student, r.ranks)
    _measure(model, runs, env, config.measure_rounds)
    for _ in range(config.max_shrinks):
        todo = [r for r in runs if r.measured < MIN_SPEEDUP_FRACTION * r.target]
        if not todo:
            break
        for r in todo:
            factor = shrink_factor(curve, r.target, r.measured, exported_density(r.model))
            r.ranks = shrunk_ranks(factorized_layers(r.student), r.ranks, factor)
            r.model = export_flop_model(r.student, r.ranks)
            r.shrinks += 1
        _measure(model, todo, env, config.measure_rounds)
    missed = [r for r in runs if r.measured < MIN_SPEEDUP_FRACTION * r.target]
    if missed:
        raise UnreachableTargetError(
            f"FLOP could not meet target(s) after {config.max_shrinks} shrink round(s): "
            + "; ".join(f"{r.target:g}x measured {r.measured:.2f}x" for r in missed)
            + f" (fastest uniform low-rank variant {curve.max_speedup:.2f}x)")


def _deliver(model, runs: list[_TargetRun], curve: SpeedupCurve, env: InferenceEnv, eval_data) -> tuple:
    """``(dense_metrics, results)``: each run's model in the environment's dtype, evaluated as deployed."""
    dense_metrics = {}
    deployed = in_env(model, env)  # quality as deployed: both models in the environment's dtype
    if eval_data is not None:
        dense_metrics = evaluate_model(deployed, deployed, eval_data)
    results = []
    for r in runs:
        m, stats = r.model.to(dtype=env.torch_dtype), r.stats
        r.model = r.student = None  # free the trained copy once its model is delivered
        metrics = evaluate_model(m, deployed, eval_data) if eval_data is not None else {}
        density = exported_density(m)
        metrics.update(flop_target_density=r.density, flop_expected_density=r.expected,
                       flop_hard_sparsity=1.0 - density, flop_shrink_rounds=float(r.shrinks),
                       train_tokens_per_second=stats.tokens_per_second, train_seconds=stats.seconds)
        cal = stats.final.get("distill", stats.final.get("total", float("nan")))
        results.append(PrunedResult(r.target, m, model_ranks(m), curve.speedup_at(density), r.measured, float(cal),
                                    num_parameters(m), metrics))
    return dense_metrics, results


def flop_prune(model: nn.Module, train_data, targets, env: Optional[InferenceEnv] = None,
               config: Optional[FlopConfig] = None, *, distill=None, eval_data=None, tokenizer=None,
               model_name: Optional[str] = None, curve: Optional[SpeedupCurve] = None, **legacy):
    """FLOP, one independently trained model per speedup target, each measured in ``env``.

    Per target: the speedup is mapped to a density of the factorised layers
    (:func:`~ziplm_ext.methods.flop.curve.measure_speedup_curve`, before any training; unreachable
    targets fail here), a deep copy of ``model`` is factorised and distilled from ``model`` for
    ``config.steps`` steps with the Lagrangian constraint (:func:`~ziplm_ext.methods.flop.train.train_flop`),
    and exported (:func:`~ziplm_ext.methods.flop.export.export_flop_model`).  All targets' models are
    then timed together against the dense model; a model below ``0.97 x`` its target is shrunk (no more
    training) and re-timed, at most ``config.max_shrinks`` times, else
    :class:`~ziplm_ext.errors.UnreachableTargetError`.

    Args:
        train_data: ``(N, T)`` LongTensor (causal LMs) or ``(input_ids, attention_mask)`` (encoders).
        targets: speedups (> 1) over the dense model.
        config: :class:`~ziplm_ext.config.FlopConfig` (default: its defaults).  The old keyword form
            (``steps=``, ``gate_lr=``, ... named like its fields) still works, with a DeprecationWarning.
        distill: :class:`ziplm_ext.stages.distill.DistillConfig` (default: its defaults with
            ``config.seed``); the same objective and budget as the other methods' fine-tuning.
        curve: a :class:`~ziplm_ext.methods.flop.curve.SpeedupCurve` measured before for this model and
            ``env`` (e.g. by an earlier call: ``family.speedup_curve``); skips the curve's timing.
        eval_data: held-out data for :func:`ziplm_ext.eval.evaluate.evaluate_model`.

    Returns a :class:`~ziplm_ext.results.PrunedFamily` (``latency_table=None``; the curve is attached as the extra
    attribute ``speedup_curve``).  Each result's ``widths`` maps layer paths to kept ranks;
    ``predicted_speedup`` is the curve's value at the model's exported density; ``calibration_loss`` is
    the final distillation loss (mean of the last 10% of steps, the Lagrangian excluded); ``metrics``
    holds the evaluation metrics plus ``flop_target_density``, ``flop_expected_density`` (end of
    training), ``flop_hard_sparsity``, ``flop_shrink_rounds``, ``train_tokens_per_second`` and
    ``train_seconds``.
    """
    config = _config_with(config, legacy)
    env = env or InferenceEnv()
    targets = validate_targets(targets)
    get_adapter(model)  # unsupported architectures fail here (UnsupportedArchitectureError is a ValueError)
    check_train_data(train_data, model.get_input_embeddings().weight.shape[0])
    distill = distill or DistillConfig(seed=config.seed)
    model.eval()
    torch.manual_seed(config.seed)
    stages: dict[str, float] = {}

    t0 = time.perf_counter()
    base = copy.deepcopy(model)
    factorize_model(base)  # one SVD per layer, shared by the curve and every target
    if curve is None:
        curve = measure_speedup_curve(model, env, config.curve_densities, rounds=config.measure_rounds,
                                      factorized=base)
    densities = {t: curve.density_for(t) for t in targets}  # raises for unreachable targets
    stages["calibrate_speed"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    runs = _train_targets(model, base, train_data, densities, config, distill)
    del base
    stages["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _export_and_measure(model, runs, curve, env, config)
    stages["measure"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense_metrics, results = _deliver(model, runs, curve, env, eval_data)
    stages["evaluation"] = time.perf_counter() - t0
    name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    family = PrunedFamily(results, env, None, 0.0, num_parameters(model), dense_metrics, {}, stages, name, tokenizer,
                          method="FLOP")
    family.speedup_curve = curve  # not part of PrunedFamily's fields (nor of family.json)
    return family
