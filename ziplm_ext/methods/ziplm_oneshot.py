"""One-shot ZipLM end to end: calibrate → OBS database → latency table → search → slice/export.

    family = ziplm_ext.prune(model, calibration, targets=[1.5, 2.0],
                             env=ziplm_ext.InferenceEnv(device="cpu", batch_size=1, seq_len=128))
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ziplm_ext.adapters import get_adapter
from ziplm_ext.stages.calibrate import make_batches
from ziplm_ext.stages.database import ObsDatabase, build_database, default_levels
from ziplm_ext.env import InferenceEnv
from ziplm_ext.stages.latency.build import (add_module_overheads, build_environment_table,  # noqa: F401
                                             check_table_for_model, table_levels_fn)
from ziplm_ext.stages.latency.table import LatencyTable
from ziplm_ext.stages.search.dp import UnreachableTargetError, spdy_search, uniform_levels, uniform_per_kind_levels

MIN_SPEEDUP_FRACTION = 0.97  # a delivered model must measure at least this fraction of its target
MAX_OVERSHOOT = 1.10         # beyond this the model was pruned more than needed: re-fit and re-solve


@dataclass
class PrunedResult:
    target: float
    model: nn.Module
    levels: dict[str, int]                 # kept structures per layer name
    predicted_speedup: float
    measured_speedup: Optional[float]
    calibration_loss: float
    num_parameters: int
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict = field(default_factory=dict)   # fine-tuning statistics (gradual mode, FLOP)

    def summary(self) -> dict:
        return dict(target=self.target, levels=self.levels, predicted_speedup=self.predicted_speedup,
                    measured_speedup=self.measured_speedup, calibration_loss=self.calibration_loss,
                    num_parameters=self.num_parameters, metrics=self.metrics, training=self.training)


@dataclass
class PrunedFamily:
    results: list[PrunedResult]
    env: InferenceEnv
    latency_table: Optional[LatencyTable]   # None for methods that do not search over a table (FLOP)
    dense_calibration_loss: float
    dense_num_parameters: int
    dense_metrics: dict[str, float]
    baselines: dict[str, list[dict]]
    stage_seconds: dict[str, float]
    model_name: str
    tokenizer: object = None
    method: str = "ZipLM"   # label of the results in reports: "ZipLM", "ZipLM gradual", "FLOP"

    def __iter__(self):
        return iter(self.results)

    def __len__(self):
        return len(self.results)

    def __getitem__(self, i) -> PrunedResult:
        return self.results[i]

    def summary(self) -> dict:
        dense_time = self.latency_table.dense_time if self.latency_table is not None else None
        return dict(model_name=self.model_name, method=self.method, env=self.env.to_dict(), dense_time=dense_time,
                    dense_calibration_loss=self.dense_calibration_loss, dense_num_parameters=self.dense_num_parameters,
                    dense_metrics=self.dense_metrics, results=[r.summary() for r in self.results],
                    baselines=self.baselines, stage_seconds=self.stage_seconds)

    def save(self, directory) -> Path:
        """Write ``target_<s>x/`` (one pruned model per target), ``latency_table.json`` and
        ``family.json`` into `directory`, atomically: nothing is left behind on failure."""
        from ziplm_ext.io.export import save_pruned

        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise OSError(f"output directory {target} exists and is not empty")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        except OSError as exc:
            raise OSError(f"cannot write output directory {target}: {exc.strerror or exc}") from None
        try:
            for r in self.results:
                path = save_pruned(r.model, tmp / result_dirname(r.target), extra=r.summary())
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(path)
            if self.latency_table is not None:
                self.latency_table.save(tmp / "latency_table.json")
            (tmp / "family.json").write_text(json.dumps(self.summary(), indent=2, default=float))
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def result_dirname(target: float) -> str:
    return f"target_{target:g}x"


# ----------------------------------------------------------------------------- validation


def _validate_targets(targets) -> list[float]:
    if isinstance(targets, (int, float)):
        targets = [targets]
    targets = [float(t) for t in targets]
    if not targets:
        raise ValueError("no speedup targets given")
    for t in targets:
        if not math.isfinite(t) or t <= 1.0:
            raise ValueError(f"speedup target must be > 1, got {t:g}")
    return sorted(set(targets))


def _calibration_tensor(calibration, tokenizer, env: InferenceEnv, num_blocks: int, seed: int, model) -> torch.Tensor:
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


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------- stitched loss


def is_causal_lm(model) -> bool:
    return model.get_output_embeddings() is not None


class StitchedLoss:
    """Calibration loss of the model stitched from database levels, on cached inputs.

    Causal LMs: mean token KL(dense ‖ stitched). Encoders: ‖h_s − h_d‖² / ‖h_d‖² of the last hidden
    states over real tokens. The stitched model is one working copy whose out projections get the
    database weights of each level (removed columns zero), which computes exactly what the sliced
    model computes.
    """

    def __init__(self, dense: nn.Module, db: ObsDatabase, input_ids: torch.Tensor, batch_size: int = 8,
                 reference: Optional[nn.Module] = None):
        # `dense` is the model the database was built on; `reference` (default: that model) gives
        # the target outputs, e.g. the dense teacher when pruning an already pruned model further.
        self.db = db
        self.adapter = get_adapter(dense)
        self.work = copy.deepcopy(dense).eval()
        self.layers = {l.name: l for l in self.adapter.prunable_layers(self.work)}
        self.ids = input_ids
        self.bs = batch_size
        self.causal = is_causal_lm(dense)
        self.current: dict[str, int] = {}
        with torch.no_grad():
            self.reference = [self._forward(reference if reference is not None else dense, b)
                              for b in self._batches()]

    def _batches(self):
        return [self.ids[i:i + self.bs] for i in range(0, self.ids.shape[0], self.bs)]

    def _forward(self, model, ids):
        out = model(input_ids=ids)
        if self.causal:
            return torch.log_softmax(out.logits.float(), dim=-1)
        return out.last_hidden_state.float()

    def set_levels(self, levels: dict[str, int]) -> None:
        for name, count in levels.items():
            if name not in self.db.entries:
                continue  # outside the search (an already removed module)
            if self.current.get(name) != count:
                self.adapter.set_weight(self.work, self.layers[name], self.db.weights(name, count))
                self.current[name] = count

    @torch.no_grad()
    def __call__(self, levels: dict[str, int]) -> float:
        self.set_levels(levels)
        total, n = 0.0, 0
        for ids, ref in zip(self._batches(), self.reference):
            out = self._forward(self.work, ids)
            if self.causal:
                total += float(torch.sum(ref.exp() * (ref - out)))
                n += ref.shape[0] * ref.shape[1]
            else:
                total += float(((out - ref) ** 2).sum() / (ref**2).sum()) * ids.shape[0]
                n += ids.shape[0]
        return total / n


# ----------------------------------------------------------------------------- building models


def _shrink(dense: nn.Module, levels: dict[str, int], apply) -> nn.Module:
    """A copy of `dense` where `apply(model, adapter, layer, count)` prunes every layer below full width."""
    model = copy.deepcopy(dense).eval()
    adapter = get_adapter(model)
    for layer in adapter.prunable_layers(model):
        current = adapter.current_count(model, layer)
        count = levels.get(layer.name, current)
        if count > current:
            raise ValueError(f"{layer.name}: cannot keep {count} structures, the model has {current}")
        if count != current:
            apply(model, adapter, replace(layer, num_structures=current), count)
    return model


def build_pruned_model(dense: nn.Module, db: ObsDatabase, levels: dict[str, int]) -> nn.Module:
    """A physically smaller copy of `dense` with the OBS-updated weights of each chosen level."""
    def apply(model, adapter, layer, count):
        adapter.set_weight(model, layer, db.weights(layer.name, count))
        adapter.slice(model, layer, db[layer.name].kept(count))

    return _shrink(dense, levels, apply)


def build_magnitude_model(dense: nn.Module, levels: dict[str, int]) -> nn.Module:
    """Baseline: keep the structures whose out-projection columns have the largest L2 norm, no update."""
    def apply(model, adapter, layer, count):
        W = adapter.get_weight(model, layer).float()
        norms = W.reshape(W.shape[0], layer.num_structures, layer.group_size).pow(2).sum(dim=(0, 2))
        adapter.slice(model, layer, sorted(torch.topk(norms, count).indices.tolist()) if count else [])

    return _shrink(dense, levels, apply)


# ----------------------------------------------------------------------------- search


class _Problem:
    """Per-layer candidate levels with their times and errors, for one latency table."""

    def __init__(self, db: ObsDatabase, table: LatencyTable, fixed: Optional[dict[str, int]] = None):
        self.fixed = dict(fixed or {})  # layers outside the search (already removed modules): their count
        self.names = db.names()
        self.counts = [db[n].levels for n in self.names]
        self.errors = [np.asarray(db[n].errors) for n in self.names]
        self.kinds = [db[n].layer.kind for n in self.names]
        self.set_table(table)

    def set_table(self, table: LatencyTable) -> None:
        self.table = table
        self.times = [np.asarray([table.layer_time(n, c) for c in cs]) for n, cs in zip(self.names, self.counts)]

    def to_levels(self, idx: Sequence[int]) -> dict[str, int]:
        return {**self.fixed, **{n: int(cs[i]) for n, cs, i in zip(self.names, self.counts, idx)}}

    def budget(self, target: float) -> float:
        fixed_time = sum(self.table.layer_time(n, c) for n, c in self.fixed.items())
        return self.table.budget(target) - fixed_time


def search_target(problem: _Problem, target: float, loss: StitchedLoss, *, evaluations: int, seed: int,
                  progress: bool) -> tuple[dict[str, int], float, dict]:
    budget = problem.budget(target)
    uniform = uniform_levels(problem.counts, problem.times, budget, problem.kinds)
    bar = tqdm(total=evaluations, desc=f"SPDY {target:g}x", disable=not progress, leave=False)

    def evaluate(idx):
        return loss(problem.to_levels(idx))

    def tick(i, total, best):
        bar.total = total
        bar.n = i
        bar.set_postfix(best=f"{best:.4g}")
        bar.refresh()

    n_random = max(1, evaluations // 5)
    res = spdy_search(problem.errors, problem.times, budget, evaluate, num_random=n_random,
                      num_mutation_rounds=max(0, evaluations - n_random - 1), seed=seed,
                      init_weights=[np.ones(len(problem.names))], seed_solutions=[uniform],
                      buckets=2000, progress=tick)
    bar.close()
    info = dict(evaluations=res.num_evaluations, proposals=res.num_proposals, from_uniform_seed=res.from_seed,
                uniform_loss=res.history[0] if res.history else None)
    return problem.to_levels(res.levels), res.loss, info


# ----------------------------------------------------------------------------- main entry


def prune(model: nn.Module, calibration, targets, env: Optional[InferenceEnv] = None, *, tokenizer=None,
          mode: str = "oneshot", train_data=None, steps_per_target: int = 100, distill=None,
          num_calibration_blocks: int = 32, loss_blocks: int = 4, method: str = "ziplm", damp: float = 0.01,
          spdy_evaluations: int = 60, workdir=None, seed: int = 0, progress: bool = True,
          baselines: Sequence[str] = (), eval_data=None, latency_table: Optional[LatencyTable] = None,
          latency_reps: int = 30, measure_rounds: int = 15, max_corrections: int = 2,
          model_name: Optional[str] = None, ffn_multiple: int = 1, measure: bool = True,
          flop_options: Optional[dict] = None) -> PrunedFamily:
    """Produce one physically smaller model per speedup target, each measured in `env`.

    calibration: LongTensor (N, seq) of token ids, or a list of texts with ``tokenizer=``.
    targets: speedups over the dense model (> 1), measured end to end in `env`.
    mode: "oneshot" (prune every target from the dense model, no training) or "gradual"
    (targets in increasing order: fresh Hessians on the current, already pruned model → ZipLM
    pruning → fine-tuning with distillation from the dense model for `steps_per_target` steps on
    `train_data` → checkpoint in `workdir` → next target; a re-run with the same workdir resumes
    after the last finished target). `distill`: a :class:`ziplm_ext.distill.DistillConfig`.
    method: "ziplm", or "flop" (low-rank factorisation with hard-concrete gates, trained on
    `train_data` for `steps_per_target` steps per target; see :mod:`ziplm_ext.flop`; extra
    keyword arguments of :func:`ziplm_ext.flop.flop_prune` go in `flop_options`).
    baselines: any of "uniform" (one width fraction for all attention layers and one for all FFNs,
    chosen to meet the target as tightly as possible; OBS updates) and "magnitude" (same widths,
    L2-norm selection, no updates), built and measured like the ZipLM models.
    ffn_multiple: round FFN widths of the level grid to multiples of this (8, 16, 32: hardware-friendly).
    eval_data: held-out data for metrics: a LongTensor of token ids (perplexity, causal LMs) or a
    tuple (input_ids, attention_mask) of sentences (embedding cosine to the dense model, encoders).
    measure: time every model end to end and correct the table until targets are met (default);
    False skips the measurements (``measured_speedup`` is None; for tests and dry runs).
    """
    if method not in ("ziplm", "flop"):
        raise ValueError(f"unknown method {method!r} (choose ziplm or flop)")
    if mode not in ("oneshot", "gradual"):
        raise ValueError(f"unknown mode {mode!r} (choose oneshot or gradual)")
    env = env or InferenceEnv()
    targets = _validate_targets(targets)
    if method == "flop":
        if baselines:
            raise ValueError("baselines are built by method='ziplm' runs only")
        from ziplm_ext.methods.flop.train import flop_prune

        if train_data is None:
            raise ValueError("method='flop' trains: give train_data= (token ids or (ids, mask))")
        return flop_prune(model, train_data, targets, env, steps=steps_per_target, distill=distill,
                          eval_data=eval_data, progress=progress, seed=seed, measure_rounds=measure_rounds,
                          model_name=model_name, tokenizer=tokenizer, **(flop_options or {}))
    for b in baselines:
        if b not in ("uniform", "magnitude"):
            raise ValueError(f"unknown baseline {b!r} (choose from uniform, magnitude)")
    if ffn_multiple < 1:
        raise ValueError(f"ffn_multiple must be >= 1, got {ffn_multiple}")
    if mode == "gradual":
        if train_data is None:
            raise ValueError("mode='gradual' fine-tunes after each target: give train_data= (token ids or (ids, mask))")
        if steps_per_target < 0:
            raise ValueError(f"steps_per_target must be >= 0, got {steps_per_target}")
        if baselines:
            raise ValueError("baselines are built in mode='oneshot' only")
    adapter = get_adapter(model)  # unsupported architectures fail here, before any work
    if mode == "gradual":
        from ziplm_ext.stages.distill import check_train_data

        check_train_data(train_data, model.get_input_embeddings().weight.shape[0])
    model.eval()
    ids = _calibration_tensor(calibration, tokenizer, env, num_calibration_blocks, seed, model)
    if ids.shape[0] < 2:
        raise ValueError(f"calibration data too small: {ids.shape[0]} sequence(s), need at least 2")
    torch.manual_seed(seed)
    stages: dict[str, float] = {}
    levels_fn = functools.partial(default_levels, ffn_multiple=ffn_multiple)  # one grid for table and database

    t0 = time.perf_counter()
    if latency_table is None:
        latency_table = build_environment_table(model, env, ffn_multiple=ffn_multiple, reps=latency_reps,
                                                rounds=measure_rounds, progress=progress)
    else:
        check_table_for_model(latency_table, model, env)
        levels_fn = table_levels_fn(latency_table)  # a given table fixes the level grid
    stages["latency"] = time.perf_counter() - t0
    max_s = latency_table.max_speedup()
    unreachable = [t for t in targets if t > max_s]
    if unreachable:
        raise UnreachableTargetError(
            f"target(s) {', '.join(f'{t:g}x' for t in unreachable)} unreachable: the most this model can gain in "
            f"this environment is {max_s:.2f}x (every prunable module removed)")
    opts = dict(env=env, seed=seed, progress=progress, spdy_evaluations=spdy_evaluations, damp=damp,
                measure_rounds=measure_rounds, max_corrections=max_corrections, measure=measure,
                loss_blocks=loss_blocks)
    if mode == "gradual":
        results, table, dense_loss = _gradual(model, ids, targets, latency_table, levels_fn, stages, train_data,
                                              steps_per_target, distill, workdir, opts)
        base = {}
    else:
        t0 = time.perf_counter()
        batches = make_batches(ids, None, batch_size=8)
        db = build_database(model, batches, damp=damp, workdir=workdir, progress=progress, levels_fn=levels_fn)
        stages["database"] = time.perf_counter() - t0
        loss = StitchedLoss(model, db, ids[:loss_blocks])
        problem = _Problem(db, latency_table)
        dense_loss = loss({n: db[n].layer.num_structures for n in db.names()})
        results = _solve_targets(model, model, db, problem, loss, targets, stages, opts)
        table = problem.table
        t0 = time.perf_counter()
        base = _baselines(model, db, problem, loss, targets, baselines, env, measure_rounds, measure)
        stages["baselines"] = time.perf_counter() - t0

    # Delivered models are in the environment's dtype (the pruning maths ran in float32), and
    # quality is measured on them as deployed, against the dense model in the same dtype.
    for m in [r.model for r in results] + [row["model"] for rows in base.values() for row in rows]:
        m.to(dtype=env.torch_dtype)
    t0 = time.perf_counter()
    dense_metrics = {}
    if eval_data is not None:
        from ziplm_ext.eval.evaluate import evaluate_model
        from ziplm_ext.stages.latency.build import in_env

        deployed = in_env(model, env)
        dense_metrics = evaluate_model(deployed, deployed, eval_data)
        for r in results:
            r.metrics = evaluate_model(r.model, deployed, eval_data)
        for rows in base.values():
            for row in rows:
                row["metrics"] = evaluate_model(row.pop("model"), deployed, eval_data)
    for rows in base.values():
        for row in rows:
            row.pop("model", None)
    stages["evaluation"] = time.perf_counter() - t0
    name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return PrunedFamily(results, env, table, dense_loss, num_parameters(model), dense_metrics, base, stages,
                        name, tokenizer, method="ZipLM gradual" if mode == "gradual" else "ZipLM")


def _add_stage(stages: dict, key: str, t0: float) -> None:
    stages[key] = stages.get(key, 0.0) + time.perf_counter() - t0


def _solve_targets(base: nn.Module, dense: nn.Module, db: ObsDatabase, problem: _Problem, loss: StitchedLoss,
                   targets: Sequence[float], stages: dict, opts: dict) -> list[PrunedResult]:
    """Search every target, build the models from `base`, measure them against `dense` end to end
    and re-solve missed or overshot targets on a re-fitted table. Returns one result per target."""
    t0 = time.perf_counter()
    chosen: dict[float, tuple] = {}
    for t in targets:
        chosen[t] = search_target(problem, t, loss, evaluations=opts["spdy_evaluations"], seed=opts["seed"],
                                  progress=opts["progress"])
    _add_stage(stages, "search", t0)

    t0 = time.perf_counter()
    if not opts["measure"]:
        results = []
        for t, (lv, cal, _) in chosen.items():
            m = build_pruned_model(base, db, lv)
            results.append(PrunedResult(t, m, lv, problem.table.predict_speedup(lv), None, cal, num_parameters(m)))
        _add_stage(stages, "build", t0)
        return results
    from ziplm_ext.stages.latency.build import calibrate_table, measure_speedups

    # Every candidate is measured end to end; the table is re-fitted to all measurements so far and
    # targets that were missed (or overshot, which wastes accuracy) are re-solved.
    # Per target only the most accurate candidate that meets it is kept (each is a full model copy).
    env, rounds, max_corrections = opts["env"], opts["measure_rounds"], opts["max_corrections"]
    best: dict[float, tuple] = {}  # (levels, loss, model, measured)
    fastest = {t: 0.0 for t in targets}
    observations = []
    todo = list(targets)
    corrections = 0
    for round_ in range(max_corrections + 1):
        built = {t: build_pruned_model(base, db, chosen[t][0]) for t in todo}
        speeds = measure_speedups(dense, [built[t] for t in todo], env, rounds=rounds)
        last = dict(zip(todo, speeds))
        for t, sp in last.items():
            observations.append((chosen[t][0], sp))
            fastest[t] = max(fastest[t], sp)
            if sp >= MIN_SPEEDUP_FRACTION * t and (t not in best or chosen[t][1] < best[t][1]):
                best[t] = (chosen[t][0], chosen[t][1], built[t], sp)
        del built
        todo = [t for t in todo if not (MIN_SPEEDUP_FRACTION * t <= last[t] <= MAX_OVERSHOOT * t)]
        if not todo or round_ == max_corrections:
            break
        problem.set_table(calibrate_table(problem.table, observations))
        corrections += 1
        for t in list(todo):
            try:
                chosen[t] = search_target(problem, t, loss, evaluations=max(20, opts["spdy_evaluations"] // 2),
                                          seed=opts["seed"] + round_ + 1, progress=opts["progress"])
            except UnreachableTargetError:
                todo.remove(t)
    _add_stage(stages, "measure", t0)

    results, missed = [], []
    for t in targets:
        if t not in best:
            missed.append(f"{t:g}x measured {fastest[t]:.2f}x")
            continue
        levels, cal, m, sp = best.pop(t)
        results.append(PrunedResult(t, m, levels, problem.table.predict_speedup(levels), sp, cal, num_parameters(m)))
    if missed:
        raise UnreachableTargetError(f"could not meet target(s) after {corrections} table correction(s): "
                                     f"{'; '.join(missed)} (table maximum {problem.table.max_speedup():.2f}x)")
    return results


# ----------------------------------------------------------------------------- gradual mode

GRADUAL_DIR = "gradual"
CHECKPOINT_STATE = "state.json"


def _gradual(dense: nn.Module, ids: torch.Tensor, targets: Sequence[float], table: LatencyTable, levels_fn,
             stages: dict, train_data, steps: int, distill, workdir, opts: dict):
    """Gradual ZipLM (ZIPLM.md §6): for increasing targets, prune the current model with fresh
    Hessians, fine-tune it with distillation from the dense model, checkpoint, continue.

    Levels stay on the dense model's grid (a layer at width w can go to any grid width <= w), so
    one latency table, measured on the dense model, prices every stage. Checkpoints live in
    ``workdir/gradual/target_<s>x/`` (the pruned, fine-tuned model plus ``state.json``), each
    written atomically; a re-run with the same workdir, data and seed loads the finished targets
    and continues after the last one."""
    from ziplm_ext.stages.distill import DistillConfig, finetune
    from ziplm_ext.io.export import load_pruned, save_pruned

    adapter = get_adapter(dense)
    grid = {l.name: sorted(set(levels_fn(l)) | {0, l.num_structures}) for l in adapter.prunable_layers(dense)}
    cfg = distill or DistillConfig()
    root = Path(workdir) / GRADUAL_DIR if workdir is not None else None
    current = dense
    results: list[PrunedResult] = []
    dense_loss = 0.0
    for i, t in enumerate(targets):
        ck = root / result_dirname(t) if root is not None else None
        if ck is not None and (ck / CHECKPOINT_STATE).is_file():
            state = json.loads((ck / CHECKPOINT_STATE).read_text())
            if state.get("seed") != opts["seed"] or state.get("steps") != steps or state.get("stage") != i:
                raise ValueError(f"checkpoint {ck} was written with other settings (seed/steps/targets); "
                                 "use a fresh workdir")
            current = load_pruned(ck / "model")
            results.append(PrunedResult(t, current, state["levels"], state["predicted_speedup"],
                                        state["measured_speedup"], state["calibration_loss"],
                                        num_parameters(current), training=state["training"]))
            dense_loss = state["dense_calibration_loss"]
            continue

        t0 = time.perf_counter()
        stage_dir = root / f"stage_{i}" if root is not None else None

        def stage_levels(layer, _grid=grid):  # the dense grid below the layer's current width
            return [c for c in _grid[layer.name] if c <= layer.num_structures]

        db = build_database(current, make_batches(ids, None, batch_size=8), damp=opts["damp"], workdir=stage_dir,
                            progress=opts["progress"], levels_fn=stage_levels)
        _add_stage(stages, "database", t0)
        fixed = {l.name: 0 for l in adapter.prunable_layers(current) if adapter.is_removed(current, l)}
        loss = StitchedLoss(current, db, ids[:opts["loss_blocks"]], reference=dense)
        if i == 0:
            dense_loss = loss({n: db[n].layer.num_structures for n in db.names()})
        problem = _Problem(db, table, fixed=fixed)
        (res,) = _solve_targets(current, dense, db, problem, loss, [t], stages, opts)
        table = problem.table  # keep corrections for the next stage

        t0 = time.perf_counter()
        stats = finetune(res.model, dense, train_data, steps, replace(cfg, seed=cfg.seed + i),
                         progress=opts["progress"], desc=f"distill {t:g}x")
        res.model.eval()
        res.training = dict(steps=stats.steps, tokens=stats.tokens, seconds=stats.seconds,
                            tokens_per_second=stats.tokens_per_second, final=stats.final)
        _add_stage(stages, "finetune", t0)
        if ck is not None:
            _write_checkpoint(ck, res, dict(seed=opts["seed"], steps=steps, stage=i, dense_calibration_loss=dense_loss),
                              save_pruned)
        results.append(res)
        current = res.model
    return results, table, dense_loss


def _write_checkpoint(ck: Path, res: PrunedResult, extra: dict, save_pruned) -> None:
    ck.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ck.name}.", dir=ck.parent))
    try:
        save_pruned(res.model, tmp / "model")
        state = dict(res.summary(), **extra)
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1, default=float))
        if ck.exists():
            shutil.rmtree(ck)
        os.replace(tmp, ck)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _baselines(model, db, problem: _Problem, loss: StitchedLoss, targets, kinds, env, rounds,
               measure: bool = True) -> dict[str, list]:
    out: dict[str, list] = {}
    if not kinds:
        return out
    from ziplm_ext.stages.latency.build import measure_speedups

    built = []
    for t in targets:
        try:
            levels = problem.to_levels(uniform_per_kind_levels(problem.counts, problem.times, problem.budget(t),
                                                               problem.kinds))
        except UnreachableTargetError:
            continue
        for kind in kinds:
            m = build_pruned_model(model, db, levels) if kind == "uniform" else build_magnitude_model(model, levels)
            cal = loss(levels) if kind == "uniform" else None
            built.append((kind, dict(target=t, levels=levels, predicted_speedup=problem.table.predict_speedup(levels),
                                     calibration_loss=cal, num_parameters=num_parameters(m), model=m)))
    speeds = (measure_speedups(model, [row["model"] for _, row in built], env, rounds=rounds) if measure
              else [None] * len(built))
    for (kind, row), s in zip(built, speeds):
        row["measured_speedup"] = s
        out.setdefault(kind, []).append(row)
    return out
