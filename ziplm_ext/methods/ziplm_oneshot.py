"""One-shot ZipLM: latency table → calibration and OBS database → search → slice → measure (ZipLM paper).

Every target is pruned from the dense model without training. The search runs on the latency
table; every candidate model is then timed end to end in the inference environment, the table is
re-fitted to those measurements and missed (or overshot) targets are searched again.

:func:`prune_oneshot` is the method; :func:`prepare`, :func:`solve_targets` and :func:`finish` are
the pieces gradual mode (:mod:`ziplm_ext.methods.ziplm_gradual`) shares.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ziplm_ext import dist
from ziplm_ext.adapters import get_adapter
from ziplm_ext.config import PruneConfig, validate_targets
from ziplm_ext.env import InferenceEnv
from ziplm_ext.errors import UnreachableTargetError
from ziplm_ext.results import MAX_OVERSHOOT, MIN_SPEEDUP_FRACTION, PrunedFamily, PrunedResult, num_parameters
from ziplm_ext.stages.calibrate import make_batches
from ziplm_ext.stages.database import ObsDatabase, build_database
from ziplm_ext.stages.latency.build import build_environment_table, check_table_for_model, table_grid_fn
from ziplm_ext.stages.latency.table import LatencyTable
from ziplm_ext.stages.levels import layer_grid
from ziplm_ext.stages.search.objective import StitchedLoss
from ziplm_ext.stages.search.problem import SearchProblem, search_target
from ziplm_ext.stages.search.uniform import uniform_per_kind_levels
from ziplm_ext.stages.resolve import resolve_sequential
from ziplm_ext.stages.slicing import build_magnitude_model, build_pruned_model

__all__ = ["ZipLMRun", "prune_oneshot", "prepare", "solve_targets", "resolve_results", "build_baselines", "finish"]


@dataclass
class ZipLMRun:
    """One ZipLM run: its settings, calibration ids, latency table and grid, and the time per stage."""

    env: InferenceEnv
    config: PruneConfig
    ids: torch.Tensor                     # calibration token ids (N, seq)
    table: LatencyTable                   # re-fitted tables replace it as the run goes on
    grid_fn: Callable                     # layer -> candidate widths, one grid for the table and the database
    stages: dict[str, float] = field(default_factory=dict)

    def add_stage(self, key: str, t0: float) -> None:
        """Add the time since `t0` to stage `key`."""
        self.stages[key] = self.stages.get(key, 0.0) + time.perf_counter() - t0


# ----------------------------------------------------------------------------- preparation


def calibration_tensor(calibration, tokenizer, env: InferenceEnv, num_blocks: int, seed: int, model) -> torch.Tensor:
    """Calibration token ids (N, seq): given as ids, or tokenised from texts into `num_blocks` sequences."""
    if isinstance(calibration, torch.Tensor):
        ids = calibration
    else:
        if tokenizer is None:
            raise ValueError("calibration given as texts needs tokenizer=")
        from ziplm_ext.eval.data import token_blocks
        from ziplm_ext.io.models import check_tokenizer

        check_tokenizer(model, tokenizer)
        ids = token_blocks(list(calibration), tokenizer, env.seq_len, num_blocks, seed=seed)
    if ids.ndim != 2 or ids.numel() == 0:
        raise ValueError(f"calibration must be a non-empty (N, seq) LongTensor, got shape {tuple(ids.shape)}")
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(f"calibration token ids out of range for the model's {vocab}-token vocabulary "
                         "(tokenizer does not match the model?)")
    return ids.long()


def prepare(model: nn.Module, calibration, targets: Sequence[float], env: InferenceEnv, config: PruneConfig, *,
            tokenizer=None, latency_table: Optional[LatencyTable] = None) -> ZipLMRun:
    """The checks and first stage of both ZipLM modes: calibration ids, the latency table (built in
    `env`, or the given one checked against the model, whose grid of widths is then used), and every
    target reachable in it."""
    get_adapter(model)  # unsupported architectures fail here, before any work
    model.eval()
    cal = config.calibration
    ids = calibration_tensor(calibration, tokenizer, env, cal.num_blocks, config.seed, model)
    if ids.shape[0] < 2:
        raise ValueError(f"calibration data too small: {ids.shape[0]} sequence(s), need at least 2")
    torch.manual_seed(config.seed)
    grid_fn = functools.partial(layer_grid, ffn_multiple=cal.ffn_multiple)
    t0 = time.perf_counter()
    if latency_table is None:
        # Under torchrun rank 0 alone times the table (the other ranks wait idle, so the timing is
        # not contended) and broadcasts it.
        if dist.rank() == 0:
            latency_table = build_environment_table(model, env, ffn_multiple=cal.ffn_multiple,
                                                    reps=config.measure.latency_reps, rounds=config.measure.rounds,
                                                    progress=config.progress)
        latency_table = dist.broadcast_object(latency_table, src=0)
    else:
        check_table_for_model(latency_table, model, env)
        grid_fn = table_grid_fn(latency_table)
    run = ZipLMRun(env, config, ids, latency_table, grid_fn)
    run.stages["latency"] = time.perf_counter() - t0
    max_s = latency_table.max_speedup()
    unreachable = [t for t in targets if t > max_s]
    if unreachable:
        raise UnreachableTargetError(
            f"target(s) {', '.join(f'{t:g}x' for t in unreachable)} unreachable: the most this model can gain in "
            f"this environment is {max_s:.2f}x (every prunable module removed)")
    return run


# ----------------------------------------------------------------------------- the method


def prune_oneshot(model: nn.Module, calibration, targets, env: InferenceEnv, config: PruneConfig, *,
                  tokenizer=None, eval_data=None, latency_table: Optional[LatencyTable] = None,
                  model_name: Optional[str] = None) -> PrunedFamily:
    """One-shot ZipLM: one model per target, each pruned from the dense `model` (see :func:`ziplm_ext.prune`).

    Under torchrun (a process group of several ranks) the calibration and the OBS database are
    spread over the ranks; rank 0 returns the family, the other ranks return None."""
    targets = validate_targets(targets)
    run = prepare(model, calibration, targets, env, config, tokenizer=tokenizer, latency_table=latency_table)
    t0 = time.perf_counter()
    db = build_database(model, make_batches(run.ids, None, batch_size=8), damp=config.calibration.damp,
                        workdir=config.workdir, progress=config.progress, grid_fn=run.grid_fn)
    run.stages["database"] = time.perf_counter() - t0
    if dist.rank() != 0:
        # Rank 0 alone searches, measures and delivers; the others receive the chosen widths (from
        # which build_pruned_model(model, db, widths) rebuilds the same models) and deliver nothing.
        dist.broadcast_object(None, src=0)
        return None
    loss = StitchedLoss(model, db, run.ids[:config.calibration.loss_blocks])
    problem = SearchProblem(db, run.table)
    dense_loss = loss({n: db[n].layer.num_structures for n in db.names()})
    results = solve_targets(model, model, db, problem, loss, targets, run)
    dist.broadcast_object([r.widths for r in results], src=0)
    resolve_results(results, model, loss, run)
    run.table = problem.table
    t0 = time.perf_counter()
    baselines = build_baselines(model, db, problem, loss, targets, run)
    run.stages["baselines"] = time.perf_counter() - t0
    return finish(model, run, results, baselines, dense_loss, eval_data=eval_data, model_name=model_name,
                  tokenizer=tokenizer, method="ZipLM")


# ----------------------------------------------------------------------------- search, build, measure


def solve_targets(base: nn.Module, dense: nn.Module, db: ObsDatabase, problem: SearchProblem, loss: StitchedLoss,
                  targets: Sequence[float], run: ZipLMRun) -> list[PrunedResult]:
    """Search every target, build the models from `base`, measure them against `dense` end to end
    and re-solve missed or overshot targets on a re-fitted table. Returns one result per target."""
    t0 = time.perf_counter()
    chosen: dict[float, tuple] = {}
    for t in targets:
        chosen[t] = search_target(problem, t, loss, evaluations=run.config.search.spdy_evaluations,
                                  seed=run.config.seed, progress=run.config.progress)
    run.add_stage("search", t0)
    t0 = time.perf_counter()
    if not run.config.measure.measure:
        results = []
        for t, (widths, cal, _) in chosen.items():
            m = build_pruned_model(base, db, widths)
            results.append(PrunedResult(t, m, widths, problem.table.predict_speedup(widths), None, cal,
                                        num_parameters(m)))
        run.add_stage("build", t0)
        return results
    best, fastest, corrections = _measure_and_correct(base, dense, db, problem, loss, chosen, run)
    run.add_stage("measure", t0)
    return _delivered(targets, best, fastest, corrections, problem)


def resolve_results(results: list[PrunedResult], dense: nn.Module, loss: StitchedLoss, run: ZipLMRun) -> None:
    """Re-fit the kept out projections of every delivered model on its own pruned inputs
    (:func:`~ziplm_ext.stages.resolve.resolve_sequential`, same shapes, so the measured speedups
    stand); a model keeps the re-fit only when its calibration loss drops."""
    if not run.config.calibration.resolve:
        return
    t0 = time.perf_counter()
    batches = make_batches(run.ids, None, batch_size=8)
    for r in tqdm(results, desc="re-solve", disable=not run.config.progress, leave=False):
        before = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
        resolve_sequential(r.model, dense, batches, damp=run.config.calibration.damp)
        new_loss = loss.model_loss(r.model)
        if new_loss < r.calibration_loss:
            r.calibration_loss = new_loss
        else:
            r.model.load_state_dict(before)
    run.add_stage("re-solve", t0)


def _measure_and_correct(base, dense, db, problem: SearchProblem, loss, chosen: dict, run: ZipLMRun):
    """Measure every candidate end to end; re-fit the table to all measurements so far and re-solve
    the targets that were missed (or overshot, which wastes accuracy). Per target only the most
    accurate candidate that meets it is kept (each is a full model copy).

    Returns ``(best, fastest, corrections)``: target -> (widths, loss, model, measured speedup) of
    the kept candidates, target -> the fastest speedup measured, and the table corrections made."""
    from ziplm_ext.stages.latency import build as latency  # looked up per call: tests replace the timing

    cfg = run.config
    targets = list(chosen)
    best: dict[float, tuple] = {}
    fastest = {t: 0.0 for t in targets}
    observations = []
    todo = list(targets)
    corrections = 0
    for round_ in range(cfg.measure.max_corrections + 1):
        built = {t: build_pruned_model(base, db, chosen[t][0]) for t in todo}
        speeds = latency.measure_speedups(dense, [built[t] for t in todo], run.env, rounds=cfg.measure.rounds)
        last = dict(zip(todo, speeds))
        for t, sp in last.items():
            observations.append((chosen[t][0], sp))
            fastest[t] = max(fastest[t], sp)
            if sp >= MIN_SPEEDUP_FRACTION * t and (t not in best or chosen[t][1] < best[t][1]):
                best[t] = (chosen[t][0], chosen[t][1], built[t], sp)
        del built
        todo = [t for t in todo if not (MIN_SPEEDUP_FRACTION * t <= last[t] <= MAX_OVERSHOOT * t)]
        if not todo or round_ == cfg.measure.max_corrections:
            break
        problem.set_table(latency.calibrate_table(problem.table, observations))
        corrections += 1
        for t in list(todo):
            try:
                chosen[t] = search_target(problem, t, loss, evaluations=max(20, cfg.search.spdy_evaluations // 2),
                                          seed=cfg.seed + round_ + 1, progress=cfg.progress)
            except UnreachableTargetError:
                todo.remove(t)
    return best, fastest, corrections


def _delivered(targets, best: dict, fastest: dict, corrections: int, problem: SearchProblem) -> list[PrunedResult]:
    """One result per target from the kept candidates; raises if a target was never met."""
    results, missed = [], []
    for t in targets:
        if t not in best:
            missed.append(f"{t:g}x measured {fastest[t]:.2f}x")
            continue
        widths, cal, m, sp = best.pop(t)
        results.append(PrunedResult(t, m, widths, problem.table.predict_speedup(widths), sp, cal, num_parameters(m)))
    if missed:
        raise UnreachableTargetError(f"could not meet target(s) after {corrections} table correction(s): "
                                     f"{'; '.join(missed)} (table maximum {problem.table.max_speedup():.2f}x)")
    return results


def build_baselines(model: nn.Module, db: ObsDatabase, problem: SearchProblem, loss: StitchedLoss,
                    targets: Sequence[float], run: ZipLMRun) -> dict[str, list]:
    """The baselines of ``run.config.baselines`` at every target (ZipLM paper, comparison with uniform
    structured pruning): "uniform" (one width fraction per layer kind, OBS updates) and "magnitude"
    (the same widths, L2-norm selection, no update). All are measured in one interleaved call."""
    kinds = run.config.baselines
    out: dict[str, list] = {}
    if not kinds:
        return out
    from ziplm_ext.stages.latency import build as latency  # looked up per call: tests replace the timing

    built = []
    for t in targets:
        try:
            widths = problem.to_widths(uniform_per_kind_levels(problem.grids, problem.times, problem.budget(t),
                                                               problem.kinds))
        except UnreachableTargetError:
            continue
        for kind in kinds:
            m = build_pruned_model(model, db, widths) if kind == "uniform" else build_magnitude_model(model, widths)
            cal = loss(widths) if kind == "uniform" else None
            built.append((kind, dict(target=t, widths=widths, predicted_speedup=problem.table.predict_speedup(widths),
                                     calibration_loss=cal, num_parameters=num_parameters(m), model=m)))
    speeds = (latency.measure_speedups(model, [row["model"] for _, row in built], run.env,
                                       rounds=run.config.measure.rounds)
              if run.config.measure.measure else [None] * len(built))
    for (kind, row), s in zip(built, speeds):
        row["measured_speedup"] = s
        out.setdefault(kind, []).append(row)
    return out


# ----------------------------------------------------------------------------- delivery


def finish(model: nn.Module, run: ZipLMRun, results: list[PrunedResult], baselines: dict[str, list],
           dense_loss: float, *, eval_data=None, model_name: Optional[str] = None, tokenizer=None,
           method: str = "ZipLM") -> PrunedFamily:
    """Cast the delivered models to the environment's dtype, evaluate them as deployed and gather the family."""
    # The pruning maths ran in float32; quality is measured on the models as deployed, against the
    # dense model in the same dtype.
    for m in [r.model for r in results] + [row["model"] for rows in baselines.values() for row in rows]:
        m.to(dtype=run.env.torch_dtype)
    t0 = time.perf_counter()
    dense_metrics = {}
    if eval_data is not None:
        from ziplm_ext.engines import in_env
        from ziplm_ext.eval.evaluate import evaluate_model

        deployed = in_env(model, run.env)
        dense_metrics = evaluate_model(deployed, deployed, eval_data)
        for r in results:
            r.metrics = evaluate_model(r.model, deployed, eval_data)
        for rows in baselines.values():
            for row in rows:
                row["metrics"] = evaluate_model(row.pop("model"), deployed, eval_data)
    for rows in baselines.values():
        for row in rows:
            row.pop("model", None)
    run.stages["evaluation"] = time.perf_counter() - t0
    name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return PrunedFamily(results, run.env, run.table, dense_loss, num_parameters(model), dense_metrics, baselines,
                        run.stages, name, tokenizer, method=method)
