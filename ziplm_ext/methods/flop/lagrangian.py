"""The FLOP size constraint as an augmented Lagrangian (Wang, Wohlwend, Lei, EMNLP 2020).

* **Constraint** (:class:`LagrangianController`): the loss adds ``lambda1 (s_hat - t) + lambda2 (s_hat - t)^2``;
  after each backward pass both multipliers take one plain gradient-*ascent* step,
  ``lambda1 += lr (s_hat - t)``, ``lambda2 += lr (s_hat - t)^2``.  They are not student parameters (not
  in the optimizer).  ``lambda1`` starts at 0 and ``lambda2`` at ``lambda2_init`` (30): a quadratic
  penalty from the first step, as in the textbook augmented Lagrangian (the FLOP paper starts it at 0).
  Reason: the gates are trained with Adam, which moves every ``log_alpha`` at about its learning rate
  whatever the penalty's size, so the size follows the sign of ``lambda1 + 2 lambda2 (s_hat - t)``.  With
  ``lambda2 ~ 0`` that sign is ``lambda1``'s, which only turns after the target has been passed: in the
  short budgets used here (hundreds of steps, FLOP used tens of thousands) the final density of tiny test
  models ended 0.1-0.3 away from the target, after overshooting and oscillating.  The quadratic term turns
  the sign as soon as the gap does.
* **Schedule**: over the warm-up steps (``warmup_frac`` of the training) the target ramps linearly from
  the factorised model's own size (FLOP's count at full rank, e.g. 1.6) to the final density, while the
  measure ``s_hat`` moves from FLOP's count to the exported size (``(1 - p) s_flop + p s_export``, ``p``
  the ramp's progress); then both stay.  FLOP ramps its compression rate from 0 measured against the
  factorised size, i.e. from the model as it is; ramping the exported size alone from 1 would leave the
  controller blind at the start (the exported size stays dense until a layer has lost about half its
  gates).
* **Scale** (:func:`gate_scale`): ``s_hat`` is a density (sizes over the dense total), so its derivative
  with respect to one gate's ``log_alpha`` is ``(in + out) P(1 - P) / sum in*out``, about ``1 / (number
  of gates)``: at initialisation 4e-5 on a 23k-weight test LLaMA, 1.1e-6 on MiniLM, 1.5e-7 on
  SmolLM2-135M.  The distillation gradient per gate does not shrink with the model (RMS per gate at
  initialisation: 3e-4 on random LLaMAs of 23k and 8M weights, 6e-4 on MiniLM, 5e-3 on SmolLM2), and the
  gates are trained by Adam, which follows the *ratio* of the two (6 on the test model, 500 on MiniLM,
  3e4 on SmolLM2); so with the multipliers on the density scale the constraint lost to the distillation
  on the larger models (SmolLM2 kept density 1.00 against targets 0.46 and 0.28).  The penalty is therefore multiplied by ``N = sum in*out / mean_k (in_k + out_k)`` (the dense
  size counted in gates of average size): the gradient per gate becomes
  ``(lambda1 + 2 lambda2 (s_hat - t)) (in + out) / mean(in + out) P(1 - P)``, whatever the model's size,
  while the multipliers still ascend on the density gap.  The constraint itself (``s_hat = t``) is
  unchanged; only the weight of the penalty against the distillation is made independent of the size.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ziplm_ext.config import FlopConfig
from ziplm_ext.layers import FactorizedLinear
from ziplm_ext.methods.flop.factorize import expected_density

__all__ = ["LAMBDA_LR", "LAMBDA2_INIT", "LagrangianController", "gate_scale"]

LAMBDA_LR = FlopConfig.lambda_lr        # gradient-ascent step of the multipliers (default of FlopConfig)
LAMBDA2_INIT = FlopConfig.lambda2_init  # initial quadratic multiplier (this module's docstring: Constraint)


def gate_scale(layers: Mapping[str, FactorizedLinear]) -> float:
    """``N = sum in*out / mean_k (in_k + out_k)``, the mean over every gate ``k`` of the layers: the dense
    size of the factorised layers in gates of average size (module docstring: Scale).  Multiplying the
    density penalty by ``N`` makes its mean gradient per gate ``(lambda1 + 2 lambda2 gap) mean_k P_k(1 - P_k)``
    (exactly, for equal ``P_k``) for a model of any size."""
    gates = sum(l.rank for l in layers.values())
    if gates == 0:
        raise ValueError("gate_scale: the layers have no gates")
    gate_size = sum((l.in_features + l.out_features) * l.rank for l in layers.values()) / gates
    return sum(l.dense_params for l in layers.values()) / gate_size


class LagrangianController:
    """The FLOP size constraint as an augmented Lagrangian (see the module docstring).

    ``penalty(step)`` is ``finetune``'s ``extra_loss``: ``scale (lambda1 (s_hat - t) + lambda2 (s_hat - t)^2)``
    and a dict of floats for the progress log.  ``ascend(step)`` is ``after_backward``: one
    gradient-ascent step on the multipliers with the gap of the last ``penalty`` call,
    ``lambda1 += lambda_lr (s_hat - t)``, ``lambda2 += lambda_lr (s_hat - t)^2``.  When the model is
    larger than the target (``s_hat > t``) ``lambda1`` grows and the penalty's gradient pushes every
    ``log_alpha`` down; when it is smaller ``lambda1`` shrinks (and may turn negative, which lets the
    gates reopen).

    Schedule, with ``p = min(1, step / warmup_steps)`` (``p = 1`` without warm-up):

    * target ``t = start + (target_density - start) p``, ``start`` = FLOP's expected density of the
      layers when the controller is built (full rank: ``sum (in+out) r / sum in*out``, e.g. 1.6);
    * measure ``s_hat = (1 - p) s_flop + p s_export``: FLOP's factorised count
      (:func:`expected_density` with ``exported=False``) at the start, the size the export stores
      (``exported=True``) from the end of the warm-up on (why: module docstring).

    ``lambda1`` / ``lambda2`` are the initial multipliers (``lambda2 > 0``: a quadratic penalty
    from the first step; module docstring).  ``scale``: the penalty's factor, default
    :func:`gate_scale` of the layers (module docstring: Scale); ``scale=1`` is the plain density penalty.
    """

    def __init__(self, layers: Mapping[str, FactorizedLinear], target_density: float, *, warmup_steps: int = 0,
                 lambda_lr: float = LAMBDA_LR, start_density: Optional[float] = None,
                 lambda1: float = 0.0, lambda2: float = LAMBDA2_INIT, scale: Optional[float] = None):
        if not layers:
            raise ValueError("LagrangianController needs at least one factorised layer")
        if not (0 < target_density <= 1):
            raise ValueError(f"target density must lie in (0, 1], got {target_density}")
        if warmup_steps < 0 or lambda_lr <= 0 or lambda2 < 0:
            raise ValueError(f"need warmup_steps >= 0, lambda_lr > 0 and lambda2 >= 0 "
                             f"(got {warmup_steps}, {lambda_lr}, {lambda2})")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not 0 < scale < float("inf")):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.layers = dict(layers)
        self.scale = gate_scale(self.layers) if scale is None else float(scale)
        self.target_density = float(target_density)
        self.warmup_steps = int(warmup_steps)
        self.lambda_lr = float(lambda_lr)
        if start_density is None:
            with torch.no_grad():
                start_density = float(expected_density(self.layers, exported=False))
        self.start_density = float(start_density)
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.gap = 0.0  # s_hat - t of the last penalty() call

    def progress(self, step: int) -> float:
        return 1.0 if self.warmup_steps == 0 else min(1.0, max(0, step) / self.warmup_steps)

    def target_at(self, step: int) -> float:
        return self.start_density + (self.target_density - self.start_density) * self.progress(step)

    def expected_density(self, step: Optional[int] = None) -> torch.Tensor:
        """The measure ``s_hat`` at ``step`` (default: after the warm-up, i.e. the exported size)."""
        p = 1.0 if step is None else self.progress(step)
        s = p * expected_density(self.layers, exported=True)
        if p < 1.0:
            s = s + (1.0 - p) * expected_density(self.layers, exported=False)
        return s

    def penalty(self, step: int) -> tuple[torch.Tensor, dict]:
        s_hat = self.expected_density(step)
        t = self.target_at(step)
        gap = s_hat - t
        self.gap = float(gap.detach())
        loss = self.scale * (self.lambda1 * gap + self.lambda2 * gap * gap)
        return loss, {"lagrangian": float(loss.detach()), "density": float(s_hat.detach()), "target_density": t,
                      "lambda1": self.lambda1, "lambda2": self.lambda2}

    def ascend(self, step: Optional[int] = None) -> None:
        # d penalty / d lambda1 = gap, d penalty / d lambda2 = gap^2: plain gradient ascent
        self.lambda1 += self.lambda_lr * self.gap
        self.lambda2 += self.lambda_lr * self.gap * self.gap
