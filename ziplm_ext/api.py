"""``ziplm_ext.prune``: check the request, then hand it to the method (ZipLM one-shot or gradual, FLOP).

    family = ziplm_ext.prune(model, calibration, targets=[1.5, 2.0],
                             env=ziplm_ext.InferenceEnv(device="cpu", batch_size=1, seq_len=128),
                             config=ziplm_ext.PruneConfig(search=ziplm_ext.SearchConfig(spdy_evaluations=100)))
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Optional

from torch import nn

from ziplm_ext.config import PruneConfig, validate_targets
from ziplm_ext.env import InferenceEnv
from ziplm_ext.methods.ziplm_gradual import prune_gradual
from ziplm_ext.methods.ziplm_oneshot import prune_oneshot
from ziplm_ext.results import PrunedFamily
from ziplm_ext.stages.latency.table import LatencyTable

__all__ = ["prune", "LEGACY_KEYWORDS"]

# The keyword arguments of prune() before PruneConfig (deprecated, removed in the next release), and
# the PruneConfig field each one sets.
LEGACY_KEYWORDS = {
    "method": "method", "mode": "mode", "baselines": "baselines", "workdir": "workdir", "seed": "seed",
    "progress": "progress",
    "num_calibration_blocks": "calibration.num_blocks", "loss_blocks": "calibration.loss_blocks",
    "damp": "calibration.damp", "ffn_multiple": "calibration.ffn_multiple",
    "spdy_evaluations": "search.spdy_evaluations",
    "measure": "measure.measure", "measure_rounds": "measure.rounds", "latency_reps": "measure.latency_reps",
    "max_corrections": "measure.max_corrections",
    "steps_per_target": "train.steps_per_target", "distill": "train.distill",
    "flop_options": "flop",
}


def prune(model: nn.Module, calibration, targets, env: Optional[InferenceEnv] = None,
          config: Optional[PruneConfig] = None, *, tokenizer=None, train_data=None, eval_data=None,
          latency_table: Optional[LatencyTable] = None, model_name: Optional[str] = None,
          **legacy) -> PrunedFamily:
    """Produce one physically smaller model per speedup target, each measured in `env`.

    calibration: LongTensor (N, seq) of token ids, or a list of texts with ``tokenizer=``
    (ignored by FLOP, which trains on `train_data`).
    targets: speedups over the dense model (> 1), measured end to end in `env` (default: CPU).
    config: a :class:`~ziplm_ext.config.PruneConfig` (default: its defaults). Its ``method`` is
    "ziplm" or "flop" (low-rank factorisation with hard-concrete gates, trained on `train_data`
    for ``train.steps_per_target`` steps per target; :mod:`ziplm_ext.methods.flop`); its ``mode``
    "oneshot" (prune every target from the dense model, no training) or "gradual" (targets in
    increasing order: fresh Hessians on the current, already pruned model → ZipLM pruning →
    fine-tuning with distillation from the dense model on `train_data` → checkpoint in
    ``workdir`` → next target; a re-run with the same workdir resumes after the last finished
    target). ``baselines``: any of "uniform" (one width fraction for all attention layers and one
    for all FFNs, chosen to meet the target as tightly as possible; OBS updates) and "magnitude"
    (same widths, L2-norm selection, no updates), built and measured like the ZipLM models.
    train_data: token ids (N, T) (causal LMs) or ``(input_ids, attention_mask)`` (encoders) for
    gradual mode and FLOP.
    eval_data: held-out data for metrics: a LongTensor of token ids (perplexity, causal LMs) or a
    tuple (input_ids, attention_mask) of sentences (embedding cosine to the dense model, encoders).
    latency_table: a table built before for this model and `env` (``ziplm latency``); its grid of
    widths is then used.
    model_name: the name reports show (default: the model's ``_name_or_path``).

    The keyword form of version 0.1 (``num_calibration_blocks=``, ``damp=``, ``measure=``, ...: see
    :data:`LEGACY_KEYWORDS`) still works for one release, with a DeprecationWarning naming the
    PruneConfig field to set instead; other keywords raise TypeError.
    """
    config, curve = _resolve_config(config, legacy)
    if env is not None and not isinstance(env, InferenceEnv):
        raise TypeError(f"env must be an InferenceEnv, got {type(env).__name__} (a PruneConfig goes in config=)")
    env = env or InferenceEnv()
    targets = validate_targets(targets)
    if config.method == "flop":
        if train_data is None:
            raise ValueError("method='flop' trains: give train_data= (token ids or (ids, mask))")
        from ziplm_ext.methods.flop.prune import flop_prune  # looked up per call (tests replace it)

        return flop_prune(model, train_data, targets, env, config.flop_config(), distill=config.train.distill,
                          eval_data=eval_data, tokenizer=tokenizer, model_name=model_name, curve=curve)
    if config.mode == "gradual":
        if train_data is None:
            raise ValueError("mode='gradual' fine-tunes after each target: give train_data= (token ids or (ids, mask))")
        return prune_gradual(model, calibration, targets, env, config, train_data=train_data, tokenizer=tokenizer,
                             eval_data=eval_data, latency_table=latency_table, model_name=model_name)
    return prune_oneshot(model, calibration, targets, env, config, tokenizer=tokenizer, eval_data=eval_data,
                         latency_table=latency_table, model_name=model_name)


def _resolve_config(config: Optional[PruneConfig], legacy: dict):
    """`config` (default ``PruneConfig()``) with the deprecated keyword arguments applied on top.
    Returns ``(config, curve)``: ``curve`` is the FLOP speedup curve an old ``flop_options`` gave."""
    if config is not None and not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
    config = config or PruneConfig()
    unknown = sorted(set(legacy) - set(LEGACY_KEYWORDS))
    if unknown:
        raise TypeError(f"prune() got unexpected keyword argument(s): {', '.join(unknown)}")
    curve = None
    top: dict = {}
    sections: dict[str, dict] = {}
    for name, value in legacy.items():
        path = LEGACY_KEYWORDS[name]
        warnings.warn(f"prune({name}=...) is deprecated: set PruneConfig.{path} and pass config=",
                      DeprecationWarning, stacklevel=3)
        if name == "flop_options":
            options = dict(value or {})
            curve = options.pop("curve", None)
            top["flop"] = replace(config.flop, **options) if options else config.flop
        elif "." in path:
            section, field_name = path.split(".")
            sections.setdefault(section, {})[field_name] = value
        else:
            top[path] = value
    if not top and not sections:
        return config, curve
    parts = {section: replace(getattr(config, section), **values) for section, values in sections.items()}
    return replace(config, **top, **parts), curve

