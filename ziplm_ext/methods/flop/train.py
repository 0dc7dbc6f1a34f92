"""Training a factorised model to a density (Wang, Wohlwend, Lei, EMNLP 2020).

**Training**: :func:`ziplm_ext.stages.distill.finetune` with the same distillation objective, data and
steps as the other methods, plus the Lagrangian term (``extra_loss``,
:class:`~ziplm_ext.methods.flop.lagrangian.LagrangianController`), the multiplier ascent
(``after_backward``) and a parameter group giving the gates' ``log_alpha`` their own, larger learning rate
(no weight decay).  ``finetune`` keeps the student in eval mode (no dropout), so gate sampling is switched
on explicitly (:func:`~ziplm_ext.methods.flop.factorize.gate_sampling`), not tied to ``module.training``.

**Gate gradients and clipping**: the penalty is scaled to a size-free force per gate
(:mod:`~ziplm_ext.methods.flop.lagrangian`, Scale), so on a large model the gates' gradient vector (one entry
per gate, ~1e5 on a 135M model) would carry most of the global norm that ``finetune`` clips, and each step's
clipping would shrink the weights' distillation update by a factor that changes from step to step.  The
gates' gradient (distillation and penalty together) is therefore multiplied by ``1 / sqrt(number of gates)``
before clipping.  Adam divides each parameter's step by its own gradient's running RMS, so a constant
factor does not change the gates' steps (the factor keeps the gradients far above Adam's ``eps``).
"""

from __future__ import annotations

import math
from typing import Optional

from ziplm_ext.config import FlopConfig
from ziplm_ext.methods.flop.factorize import factorized_layers, gate_sampling
from ziplm_ext.methods.flop.lagrangian import LagrangianController
from ziplm_ext.stages.distill import DistillConfig, finetune

__all__ = ["train_flop"]


def train_flop(student, teacher, train_data, target_density: float, config: Optional[FlopConfig] = None,
               distill: Optional[DistillConfig] = None, *, desc: str = "flop"):
    """Train a factorised ``student`` towards ``target_density`` with distillation from ``teacher``
    (``finetune`` + the Lagrangian).  Returns ``(FinetuneStats, LagrangianController)``.

    ``config``: a :class:`~ziplm_ext.config.FlopConfig` (default: its defaults); its ``steps``,
    ``lambda_lr``, ``gate_lr``, ``warmup_frac``, ``lambda2_init`` and ``progress`` are used.  The gates' ``log_alpha``
    get ``gate_lr`` (no weight decay), every other student parameter the distillation config's ``lr``
    (``distill``, default :class:`~ziplm_ext.stages.distill.DistillConfig`); the target ramps over
    ``round(warmup_frac * steps)`` steps.
    """
    cfg = distill or DistillConfig()
    config = config or FlopConfig()
    steps, warmup_frac = config.steps, config.warmup_frac
    layers = factorized_layers(student)
    if not layers:
        raise ValueError("train_flop: the student has no FactorizedLinear layers (call factorize_model first)")
    if not 0 <= warmup_frac <= 1:
        raise ValueError(f"warmup_frac must lie in [0, 1], got {warmup_frac}")
    ctl = LagrangianController(layers, target_density, warmup_steps=int(round(warmup_frac * steps)),
                               lambda_lr=config.lambda_lr, lambda2=config.lambda2_init)
    gates = {id(l.gate.log_alpha) for l in layers.values()}
    gate_params = [l.gate.log_alpha for l in layers.values()]
    rest = [p for p in student.parameters() if p.requires_grad and id(p) not in gates]
    groups = [{"params": rest}, {"params": gate_params, "lr": config.gate_lr, "weight_decay": 0.0}]
    factor = 1.0 / math.sqrt(sum(p.numel() for p in gate_params))  # module docstring: gate gradients
    handles = [p.register_hook(lambda g: g * factor) for p in gate_params]
    try:
        with gate_sampling(student, True):
            stats = finetune(student, teacher, train_data, steps, cfg, progress=config.progress,
                             extra_loss=ctl.penalty, after_backward=ctl.ascend, param_groups=groups, desc=desc)
    finally:
        for h in handles:
            h.remove()
    return stats, ctl

