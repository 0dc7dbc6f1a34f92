"""Gradual ZipLM: prune to increasing targets, fine-tuning with distillation after each (ZipLM paper,
gradual pruning).

For each target in increasing order: fresh Hessians on the current, already pruned model → OBS
database → search → slice → measure → fine-tuning with distillation from the dense model →
checkpoint → next target. Widths stay on the dense model's grid (a layer at width w can go to any
grid width <= w), so one latency table, measured on the dense model, prices every stage.

Checkpoints live in ``workdir/gradual/target_<s>x/`` (the pruned, fine-tuned model plus
``state.json``), each written atomically; a re-run with the same workdir, data and seed loads the
finished targets and continues after the last one.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from torch import nn

from ziplm_ext.adapters import get_adapter
from ziplm_ext.config import PruneConfig, validate_targets
from ziplm_ext.env import InferenceEnv
from ziplm_ext.io.fileio import atomic_directory
from ziplm_ext.methods.ziplm_oneshot import ZipLMRun, finish, prepare, solve_targets
from ziplm_ext.results import PrunedFamily, PrunedResult, num_parameters, result_dirname
from ziplm_ext.stages.calibrate import make_batches
from ziplm_ext.stages.database import build_database
from ziplm_ext.stages.distill import DistillConfig, check_train_data, finetune
from ziplm_ext.stages.latency.table import LatencyTable
from ziplm_ext.stages.search.objective import StitchedLoss
from ziplm_ext.stages.search.problem import SearchProblem

__all__ = ["prune_gradual", "GRADUAL_DIR", "CHECKPOINT_STATE"]

GRADUAL_DIR = "gradual"
CHECKPOINT_STATE = "state.json"


def prune_gradual(model: nn.Module, calibration, targets, env: InferenceEnv, config: PruneConfig, *, train_data,
                  tokenizer=None, eval_data=None, latency_table: Optional[LatencyTable] = None,
                  model_name: Optional[str] = None) -> PrunedFamily:
    """Gradual ZipLM (see the module docstring and :func:`ziplm_ext.prune`); `train_data`: token ids
    (N, T) or ``(input_ids, attention_mask)`` for the fine-tuning."""
    targets = validate_targets(targets)
    get_adapter(model)  # unsupported architectures fail before the training data is checked
    check_train_data(train_data, model.get_input_embeddings().weight.shape[0])
    run = prepare(model, calibration, targets, env, config, tokenizer=tokenizer, latency_table=latency_table)
    results, dense_loss = _gradual(model, targets, run, train_data)
    return finish(model, run, results, {}, dense_loss, eval_data=eval_data, model_name=model_name,
                  tokenizer=tokenizer, method="ZipLM gradual")


def _gradual(dense: nn.Module, targets: list[float], run: ZipLMRun, train_data) -> tuple[list[PrunedResult], float]:
    """Every stage in turn; returns the results and the dense model's calibration loss."""
    adapter = get_adapter(dense)
    grid = {l.name: sorted(set(run.grid_fn(l)) | {0, l.num_structures}) for l in adapter.prunable_layers(dense)}
    workdir = run.config.workdir
    root = Path(workdir) / GRADUAL_DIR if workdir is not None else None
    current = dense
    results: list[PrunedResult] = []
    dense_loss = 0.0
    for i, t in enumerate(targets):
        ck = root / result_dirname(t) if root is not None else None
        if ck is not None and (ck / CHECKPOINT_STATE).is_file():
            res, dense_loss = _load_checkpoint(ck, i, t, run.config)
            results.append(res)
            current = res.model
            continue
        res, loss0 = _prune_stage(current, dense, i, t, run, grid, root / f"stage_{i}" if root is not None else None)
        if i == 0:
            dense_loss = loss0
        _finetune_stage(res, dense, train_data, i, run)
        if ck is not None:
            _write_checkpoint(ck, res, dict(seed=run.config.seed, steps=run.config.train.steps_per_target, stage=i,
                                            dense_calibration_loss=dense_loss))
        results.append(res)
        current = res.model
    return results, dense_loss


def _prune_stage(current: nn.Module, dense: nn.Module, i: int, target: float, run: ZipLMRun, grid: dict,
                 stage_dir: Optional[Path]) -> tuple[PrunedResult, Optional[float]]:
    """Prune `current` to `target` with fresh Hessians, the loss measured against `dense`. Returns the
    result and, for the first stage, the dense model's calibration loss (else None)."""
    t0 = time.perf_counter()

    def stage_grid(layer):  # the dense grid below the layer's current width
        return [c for c in grid[layer.name] if c <= layer.num_structures]

    cfg = run.config
    db = build_database(current, make_batches(run.ids, None, batch_size=8), damp=cfg.calibration.damp,
                        workdir=stage_dir, progress=cfg.progress, grid_fn=stage_grid)
    run.add_stage("database", t0)
    adapter = get_adapter(current)
    fixed = {l.name: 0 for l in adapter.prunable_layers(current) if adapter.is_removed(current, l)}
    loss = StitchedLoss(current, db, run.ids[:cfg.calibration.loss_blocks], reference=dense)
    dense_loss = loss({n: db[n].layer.num_structures for n in db.names()}) if i == 0 else None
    problem = SearchProblem(db, run.table, fixed=fixed)
    (res,) = solve_targets(current, dense, db, problem, loss, [target], run)
    run.table = problem.table  # keep corrections for the next stage
    return res, dense_loss


def _finetune_stage(res: PrunedResult, dense: nn.Module, train_data, i: int, run: ZipLMRun) -> None:
    """Distil `dense` into the pruned model of stage `i` (in place); statistics go to ``res.training``."""
    t0 = time.perf_counter()
    cfg = run.config.train.distill or DistillConfig()
    stats = finetune(res.model, dense, train_data, run.config.train.steps_per_target, replace(cfg, seed=cfg.seed + i),
                     progress=run.config.progress, desc=f"distill {res.target:g}x")
    res.model.eval()
    res.training = dict(steps=stats.steps, tokens=stats.tokens, seconds=stats.seconds,
                        tokens_per_second=stats.tokens_per_second, final=stats.final)
    run.add_stage("finetune", t0)


def _load_checkpoint(ck: Path, i: int, target: float, config: PruneConfig) -> tuple[PrunedResult, float]:
    """The finished stage `i` from its checkpoint, and the dense calibration loss recorded with it."""
    from ziplm_ext.io.export import load_pruned

    state = json.loads((ck / CHECKPOINT_STATE).read_text())
    if (state.get("seed") != config.seed or state.get("steps") != config.train.steps_per_target
            or state.get("stage") != i):
        raise ValueError(f"checkpoint {ck} was written with other settings (seed/steps/targets); use a fresh workdir")
    model = load_pruned(ck / "model")
    widths = state["widths"] if "widths" in state else state["levels"]  # "levels": checkpoints of 0.1.0
    res = PrunedResult(target, model, widths, state["predicted_speedup"],
                       state["measured_speedup"], state["calibration_loss"], num_parameters(model),
                       training=state["training"])
    return res, state["dense_calibration_loss"]


def _write_checkpoint(ck: Path, res: PrunedResult, extra: dict) -> None:
    """``ck/model`` and ``ck/state.json``, replacing an older checkpoint atomically."""
    from ziplm_ext.io.export import save_pruned

    with atomic_directory(ck, overwrite=True) as tmp:
        save_pruned(res.model, tmp / "model")
        state = dict(res.summary(), **extra)
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1, default=float))
