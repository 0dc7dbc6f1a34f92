"""FLOP (Wang, Wohlwend, Lei, EMNLP 2020): structured pruning by low-rank factorisation with L0 gates.

    family = ziplm_ext.flop.flop_prune(model, train_ids, targets=[1.5, 2.0],
                                       env=InferenceEnv(device="cpu", batch_size=1, seq_len=128))

The method (ZIPLM.md section 7), in this module's names:

* **Factorisation** (:class:`FactorizedLinear`, :func:`factorize_model`).  Every linear layer
  inside the transformer blocks (``get_adapter(model).blocks(model)``) -- LLaMA
  ``q/k/v/o_proj`` and ``gate/up/down_proj``; GPT-2 ``attn.c_attn``, ``attn.c_proj``,
  ``mlp.c_fc``, ``mlp.c_proj``; BERT ``query/key/value``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense`` -- becomes ``W = P diag(z) Q`` with ``P = U sqrt(S)``
  (out x r) and ``Q = sqrt(S) V^T`` (r x in) from the SVD ``W = U S V^T`` of the pretrained
  weight, at full rank ``r = min(in, out)``: with every gate at 1 the layer computes exactly
  what it computed before.  Embeddings, the LM head and norms are not touched.
* **Gates** (:class:`HardConcreteGate`): hard concrete (Louizos et al.) with
  ``beta = 2/3, gamma = -0.1, zeta = 1.1``; ``log_alpha`` starts at :data:`INIT_LOG_ALPHA`
  (= 3, above ``ln 11`` so every deterministic gate is exactly 1 and ``P(z != 0) ~ 0.99``).
* **Size**: FLOP counts a layer's expected size as ``(in + out) * sum_k P(z_k != 0)`` (biases
  are not counted).  At full rank that exceeds the dense size ``in * out`` (twice for a square
  layer), and the export stores such a layer dense (below), so the size the constraint
  finally holds to is the *exported* size ``min((in + out) sum_k P(z_k != 0), in * out)``
  (gradient straight through the cap).  Densities are sizes over ``sum in * out`` of the
  factorised layers.
* **Constraint** (:class:`LagrangianController`): the loss adds
  ``lambda1 (s_hat - t) + lambda2 (s_hat - t)^2``; after each backward pass both multipliers
  take one plain gradient-*ascent* step, ``lambda1 += lr (s_hat - t)``,
  ``lambda2 += lr (s_hat - t)^2``.  They are not student parameters (not in the optimizer).
  ``lambda1`` starts at 0 and ``lambda2`` at ``lambda2_init`` (30): a quadratic penalty from the
  first step, as in the textbook augmented Lagrangian (FLOP starts it at 0).  Reason: the gates
  are trained with Adam, which moves every ``log_alpha`` at about its learning rate whatever
  the penalty's size, so the size follows the sign of ``lambda1 + 2 lambda2 (s_hat - t)``.
  With ``lambda2 ~ 0`` that sign is ``lambda1``'s, which only turns after the target has been
  passed: in the short budgets used here (hundreds of steps, FLOP used tens of thousands) the
  final density of tiny test models ended 0.1-0.3 away from the target, after overshooting
  and oscillating.  The quadratic term turns the sign as soon as the gap does.
* **Schedule**: over the warm-up steps (``warmup_frac`` of the training) the target ramps
  linearly from the factorised model's own size (FLOP's count at full rank, e.g. 1.6) to the
  final density, while the measure ``s_hat`` moves from FLOP's count to the exported size
  (``(1 - p) s_flop + p s_export``, ``p`` the ramp's progress); then both stay.  FLOP ramps its
  compression rate from 0 measured against the factorised size, i.e. from the model as it is;
  ramping the exported size alone from 1 would leave the controller blind at the start (the
  exported size stays dense until a layer has lost about half its gates).
* **Training**: :func:`ziplm_ext.distill.finetune` with the same distillation objective, data
  and steps as the other methods, plus the Lagrangian term (``extra_loss``), the multiplier
  ascent (``after_backward``) and a parameter group giving the gates' ``log_alpha`` their own,
  larger learning rate (no weight decay).  ``finetune`` keeps the student in eval mode (no
  dropout), so gate sampling is switched on explicitly (:func:`gate_sampling`), not tied to
  ``module.training``.
* **Export** (:func:`export_flop_model`, FLOP's inference rule): per layer keep
  ``k = round(sum_k P(z_k != 0))`` gates, the ones with the largest ``log_alpha``, and fold
  their means ``E[z_k]`` into ``P`` (:meth:`HardConcreteGate.mean`; the layer is linear in
  ``z``, so this is its expected output under the gate noise it was trained with; FLOP's code
  approximates ``E[z]`` by ``sigmoid(0.8 log_alpha)``).  The deterministic estimator
  ``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)`` used in eval mode is 0 for
  ``log_alpha < -ln 11`` although such a gate is non-zero up to 30% of the time, so FLOP's
  keep count would keep zero columns.  The result is a :class:`LowRankLinear` (``down``:
  k x in, ``up``: out x k, the bias on ``up``).  If ``k (in + out) >= in * out`` the thin pair
  is no smaller than the dense matrix and slower (two matmuls), so the layer is exported dense,
  ``W = P_k diag(E[z_k]) Q_k``, in the original module class (``nn.Linear``, or GPT-2's
  ``Conv1D`` with its ``(in, out)`` layout).  GPT-2 attention and MLP only ever *call* their
  ``c_attn`` / ``c_proj`` / ``c_fc`` modules (transformers 5: no reads of ``.weight`` or
  ``.nf`` in the forward path; ``GPT2PreTrainedModel._init_weights`` reads
  ``c_proj.weight``, which only matters when re-initialising, and ``load_pruned`` tolerates it),
  so a :class:`LowRankLinear` computing ``x W + b`` is a drop-in replacement.  (ZipLM's adapter
  operations that read out-projection weights -- ``get_weight``, ``slice`` -- do not apply to
  FLOP layers; ``adapter.shapes`` does, as ``LowRankLinear`` has ``in_features``.)
* **Speedup targets** (:func:`measure_speedup_curve`, :func:`density_for_speedups`): FLOP
  constrains parameters, users ask for measured speedups.  Uniform SVD-truncated variants
  (every factorised layer at the same density, exported through the same path) are timed end
  to end against the dense model with :func:`ziplm_ext.latency.measure_speedups`; the density
  for a target is read off that curve (monotone, linear in log-speedup between measured
  points).  After training, each model is measured again; one that misses ``0.97 x`` its target
  is shrunk further (no more training: every layer's exported size scaled by one factor read off
  the curve, the gates with the lowest ``log_alpha`` dropped) and re-measured, at most
  ``max_shrinks`` times.  Tiny models are dominated by framework overhead (their low-rank
  variants measure below 1x), so there every target is unreachable.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ziplm_ext.adapters import get_adapter
from ziplm_ext.adapters.base import is_conv1d
from ziplm_ext.env import InferenceEnv
from ziplm_ext.errors import UnreachableTargetError

__all__ = [
    "BETA", "GAMMA", "ZETA", "INIT_LOG_ALPHA", "DEFAULT_CURVE_DENSITIES",
    "HardConcreteGate", "FactorizedLinear", "LowRankLinear", "LagrangianController", "SpeedupCurve",
    "factorize_model", "factorized_layers", "gate_sampling", "expected_density", "factorized_density",
    "export_flop_model", "flop_ranks", "rank_for_density", "uniform_ranks", "hard_sparsity", "exported_density",
    "measure_speedup_curve", "density_for_speedups", "train_flop", "flop_prune",
]

BETA = 2.0 / 3.0   # temperature of the hard concrete distribution
GAMMA = -0.1       # stretch interval (gamma, zeta) around [0, 1]
ZETA = 1.1
INIT_LOG_ALPHA = 3.0  # > ln 11 ~ 2.40: deterministic gate exactly 1, P(z != 0) ~ 0.99 at the start

# Training defaults, chosen on tiny random LLaMAs (2 and 4 blocks, 60-300 steps, targets 0.3-0.7):
# the exported density ended within 0.02 of the target in every run with these values.
GATE_LR = 0.2        # AdamW learning rate of the gates' log_alpha (the weights use DistillConfig.lr)
LAMBDA_LR = 0.2      # gradient-ascent step of the multipliers
LAMBDA2_INIT = 30.0  # initial quadratic multiplier (module docstring: Constraint)
WARMUP_FRAC = 0.5    # fraction of the training over which the target ramps

MIN_SPEEDUP_FRACTION = 0.97  # as in the ZipLM pipeline: a model must measure >= 0.97 x its target
DEFAULT_CURVE_DENSITIES = (0.15, 0.25, 0.35, 0.5, 0.65, 0.8, 0.9)


# ----------------------------------------------------------------------------- hard concrete gate


class HardConcreteGate(nn.Module):
    """``r`` hard concrete gates ``z in [0, 1]`` (Louizos, Welling, Kingma 2018).

    Sample (stochastic mode): ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1-u) + log_alpha) / beta)``,
    ``z = clamp(s (zeta - gamma) + gamma, 0, 1)``.  Deterministic mode:
    ``z = clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``.

    ``sampling``: ``None`` (default) samples in training mode only; ``True`` / ``False`` force
    stochastic / deterministic gates whatever the module mode (:func:`gate_sampling`).
    ``log_alpha`` is kept in float32 whatever the model's dtype.
    """

    def __init__(self, n: int, init_log_alpha: float = INIT_LOG_ALPHA, *, beta: float = BETA,
                 gamma: float = GAMMA, zeta: float = ZETA, device=None):
        super().__init__()
        if not (gamma < 0 < 1 < zeta) or beta <= 0:
            raise ValueError(f"hard concrete needs gamma < 0, zeta > 1, beta > 0 (got {gamma}, {zeta}, {beta})")
        self.log_alpha = nn.Parameter(torch.full((int(n),), float(init_log_alpha), dtype=torch.float32, device=device))
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.sampling: Optional[bool] = None

    @property
    def n(self) -> int:
        return self.log_alpha.shape[0]

    def forward(self) -> torch.Tensor:
        stochastic = self.training if self.sampling is None else self.sampling
        if not stochastic:
            return self.deterministic()
        eps = 1e-6  # keeps log u and log(1-u) finite
        u = torch.rand_like(self.log_alpha).clamp_(eps, 1 - eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        return (torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def prob_nonzero(self) -> torch.Tensor:
        """``P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))`` per gate (differentiable)."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def prob_one(self) -> torch.Tensor:
        """``P(z = 1) = sigmoid(log_alpha - beta log((1 - gamma) / (zeta - 1)))`` per gate.

        Derivation: z = 1 iff the stretched s >= 1 iff s >= c = (1 - gamma)/(zeta - gamma) iff the
        logistic noise L = log u - log(1-u) >= beta logit(c) - log_alpha, and P(L >= x) = sigmoid(-x)
        with logit(c) = log((1 - gamma)/(zeta - 1)).  (P(z != 0) is the same with c = -gamma/(zeta - gamma).)
        """
        return torch.sigmoid(self.log_alpha - self.beta * math.log((1 - self.gamma) / (self.zeta - 1)))

    @torch.no_grad()
    def mean(self, points: int = 2048) -> torch.Tensor:
        """``E[z]`` per gate (float64), by the midpoint rule over ``u`` (no closed form; error ~1e-4).

        The export folds this value into the kept rank-one terms: a layer's output is linear in ``z``,
        so ``P diag(E[z]) Q x + b`` is exactly the layer's expected output under the gate noise it was
        trained with.  FLOP's code approximates it by ``sigmoid(0.8 log_alpha)``.
        """
        u = (torch.arange(points, dtype=torch.float64, device=self.log_alpha.device) + 0.5) / points
        noise = torch.log(u) - torch.log1p(-u)  # (points,)
        la = self.log_alpha.detach().to(torch.float64)
        out = torch.empty_like(la)
        for i in range(0, la.numel(), 256):  # bounded memory: 256 x points at a time
            s = torch.sigmoid((noise + la[i:i + 256, None]) / self.beta)
            out[i:i + 256] = (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0).mean(dim=1)
        return out

    def expected_open(self) -> torch.Tensor:
        """Expected number of non-zero gates (differentiable)."""
        return self.prob_nonzero().sum()

    def extra_repr(self) -> str:
        return f"n={self.n}, beta={self.beta:.4g}, gamma={self.gamma}, zeta={self.zeta}"


# ----------------------------------------------------------------------------- layers


class FactorizedLinear(nn.Module):
    """``y = ((x Q^T) * z) P^T + b``: a linear layer factorised as ``P diag(z) Q`` with gates ``z``.

    ``P``: (out, r), ``Q``: (r, in), ``bias``: (out,) or None, ``gate``: :class:`HardConcreteGate`
    of ``r`` gates.  ``conv1d`` records that the original was GPT-2's ``Conv1D`` (the computation
    ``y = x W + b`` is the same; the export writes that layout back).
    """

    def __init__(self, P: torch.Tensor, Q: torch.Tensor, bias: Optional[torch.Tensor], *,
                 init_log_alpha: float = INIT_LOG_ALPHA, conv1d: bool = False):
        super().__init__()
        if P.dim() != 2 or Q.dim() != 2 or P.shape[1] != Q.shape[0]:
            raise ValueError(f"P (out, r) and Q (r, in) do not match: {tuple(P.shape)}, {tuple(Q.shape)}")
        self.P = nn.Parameter(P.detach().contiguous())
        self.Q = nn.Parameter(Q.detach().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.gate = HardConcreteGate(P.shape[1], init_log_alpha, device=P.device)
        self.out_features, self.in_features = int(P.shape[0]), int(Q.shape[1])
        self.conv1d = bool(conv1d)

    @classmethod
    @torch.no_grad()
    def from_module(cls, module: nn.Module, init_log_alpha: float = INIT_LOG_ALPHA) -> "FactorizedLinear":
        """Full-rank SVD factorisation (in float64) of an ``nn.Linear`` or HF ``Conv1D``."""
        conv = is_conv1d(module)
        W = module.weight.detach()
        W = (W.t() if conv else W).to(torch.float64)  # (out, in)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # singular values descending
        root = S.sqrt()
        dt = module.weight.dtype
        P = (U * root).to(dt)
        Q = (root[:, None] * Vh).to(dt)
        return cls(P, Q, getattr(module, "bias", None), init_log_alpha=init_log_alpha, conv1d=conv)

    @property
    def rank(self) -> int:
        return self.P.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.Q) * self.gate().to(x.dtype)  # (..., r)
        return F.linear(h, self.P, self.bias)

    def expected_params(self, exported: bool = False) -> torch.Tensor:
        """Expected size (weights only, bias not counted), differentiable in ``log_alpha``.

        ``exported=False``: FLOP's count ``(in + out) * sum_k P(z_k != 0)``.
        ``exported=True``: the size the export will store, ``min(that, in * out)`` (a layer is stored
        dense when the thin pair would not be smaller), with the gradient of the uncapped count
        (straight through the cap, so the gates of a layer above it are still pushed down).
        """
        raw = (self.in_features + self.out_features) * self.gate.expected_open()
        if not exported:
            return raw
        capped = raw.clamp(max=float(self.dense_params))
        return raw + (capped - raw).detach()

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


class LowRankLinear(nn.Module):
    """Exported FLOP layer: ``y = up(down(x))`` with ``down``: k x in (no bias), ``up``: out x k (+ bias).

    ``rank == 0`` outputs the bias (zeros without bias) for every token, with no matmul.
    Construct on any device (``meta`` included) with the shapes only; weights are set by the export
    or loaded from a state dict.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        with warnings.catch_warnings():  # rank 0: torch warns that initialising empty tensors is a no-op
            warnings.simplefilter("ignore", UserWarning)
            self.down = nn.Linear(self.in_features, self.rank, bias=False, dtype=dtype, device=device)
            self.up = nn.Linear(self.rank, self.out_features, bias=bias, dtype=dtype, device=device)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            shape = (*x.shape[:-1], self.out_features)
            if self.up.bias is None:
                return x.new_zeros(shape)
            return self.up.bias.to(x.dtype).expand(shape).contiguous()
        return self.up(self.down(x))

    def num_params(self) -> int:
        """Weight parameters ``rank * (in + out)`` (bias not counted)."""
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.up.bias is not None}")


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def _block_linears(model) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every linear-like layer in the transformer blocks: ``nn.Linear``, ``Conv1D``,
    :class:`FactorizedLinear` and :class:`LowRankLinear` (whose inner ``down``/``up`` are not listed)."""
    names = {id(m): n for n, m in model.named_modules()}

    def walk(module, prefix):
        for name, child in module.named_children():
            path = f"{prefix}.{name}"
            if isinstance(child, (FactorizedLinear, LowRankLinear)) or _is_linear(child):
                yield path, child
            else:
                yield from walk(child, path)

    for block in get_adapter(model).blocks(model):
        yield from walk(block, names[id(block)])


def _set_module(model, path: str, module: nn.Module) -> None:
    owner, _, attr = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, module)


def factorized_layers(model) -> dict[str, FactorizedLinear]:
    """Every :class:`FactorizedLinear` in the model's blocks, by module path."""
    return {p: m for p, m in _block_linears(model) if isinstance(m, FactorizedLinear)}


def factorize_model(model, init_log_alpha: float = INIT_LOG_ALPHA) -> dict[str, FactorizedLinear]:
    """Replace every linear layer inside the transformer blocks by a full-rank :class:`FactorizedLinear`
    (in place; the model computes the same function with deterministic gates).  Returns ``{path: layer}``.

    Raises ``ValueError`` for an already factorised / exported model, or one without block linears.
    """
    found = list(_block_linears(model))
    if any(isinstance(m, (FactorizedLinear, LowRankLinear)) for _, m in found):
        raise ValueError("model is already FLOP-factorised or exported; factorise the dense model")
    out = {}
    for path, mod in found:
        w = mod.weight
        if w.numel() == 0:
            continue  # a zero-width layer (e.g. sliced to nothing) has nothing to factorise
        fl = FactorizedLinear.from_module(mod, init_log_alpha).to(device=w.device)
        fl.train(mod.training)
        _set_module(model, path, fl)
        out[path] = fl
    if not out:
        raise ValueError(f"{type(model).__name__}: no linear layers found in the transformer blocks")
    return out


@contextlib.contextmanager
def gate_sampling(model, enabled: bool = True):
    """Force stochastic (``True``) or deterministic (``False``) gates in every factorised layer of
    ``model`` for the duration of the block, whatever the modules' train/eval mode."""
    gates = [m for m in model.modules() if isinstance(m, HardConcreteGate)]
    before = [g.sampling for g in gates]
    try:
        for g in gates:
            g.sampling = enabled
        yield
    finally:
        for g, b in zip(gates, before):
            g.sampling = b


def _dense_total(layers: Mapping[str, FactorizedLinear]) -> int:
    return sum(l.dense_params for l in layers.values())


def expected_density(layers: Mapping[str, FactorizedLinear], exported: bool = True) -> torch.Tensor:
    """``s_hat = sum expected_params / sum in*out`` over the factorised layers (differentiable);
    ``exported``: sizes as the export stores them (see :meth:`FactorizedLinear.expected_params`)."""
    return sum(l.expected_params(exported) for l in layers.values()) / _dense_total(layers)


def factorized_density(layers: Mapping[str, FactorizedLinear]) -> float:
    """Size of the factorised layers at full rank over their dense size: ``sum (in+out) r / sum in*out``
    (> 1: e.g. 2 for square layers)."""
    return sum((l.in_features + l.out_features) * l.rank for l in layers.values()) / _dense_total(layers)


# ----------------------------------------------------------------------------- Lagrangian


class LagrangianController:
    """The FLOP size constraint as an augmented Lagrangian (see the module docstring).

    ``penalty(step)`` is ``finetune``'s ``extra_loss``: ``lambda1 (s_hat - t) + lambda2 (s_hat - t)^2``
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
    from the first step; module docstring).
    """

    def __init__(self, layers: Mapping[str, FactorizedLinear], target_density: float, *, warmup_steps: int = 0,
                 lambda_lr: float = LAMBDA_LR, start_density: Optional[float] = None,
                 lambda1: float = 0.0, lambda2: float = LAMBDA2_INIT):
        if not layers:
            raise ValueError("LagrangianController needs at least one factorised layer")
        if not (0 < target_density <= 1):
            raise ValueError(f"target density must lie in (0, 1], got {target_density}")
        if warmup_steps < 0 or lambda_lr <= 0 or lambda2 < 0:
            raise ValueError(f"need warmup_steps >= 0, lambda_lr > 0 and lambda2 >= 0 "
                             f"(got {warmup_steps}, {lambda_lr}, {lambda2})")
        self.layers = dict(layers)
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
        loss = self.lambda1 * gap + self.lambda2 * gap * gap
        return loss, {"lagrangian": float(loss.detach()), "density": float(s_hat.detach()), "target_density": t,
                      "lambda1": self.lambda1, "lambda2": self.lambda2}

    def ascend(self, step: Optional[int] = None) -> None:
        # d penalty / d lambda1 = gap, d penalty / d lambda2 = gap^2: plain gradient ascent
        self.lambda1 += self.lambda_lr * self.gap
        self.lambda2 += self.lambda_lr * self.gap * self.gap


# ----------------------------------------------------------------------------- export


def flop_ranks(model) -> dict[str, int]:
    """FLOP's inference rule: ``round(sum_k P(z_k != 0))`` gates per factorised layer."""
    with torch.no_grad():
        return {p: int(round(float(l.gate.expected_open()))) for p, l in factorized_layers(model).items()}


def rank_for_density(in_features: int, out_features: int, density: float) -> int:
    """Rank whose thin pair has ``density * in * out`` weights: ``round(d in out / (in + out))``,
    capped at full rank."""
    r = min(in_features, out_features)
    return max(0, min(r, int(round(density * in_features * out_features / (in_features + out_features)))))


def uniform_ranks(model, density: float) -> dict[str, int]:
    """The same density in every factorised layer (with untrained gates and
    ``export_flop_model(..., gate_value="deterministic")``: a truncated SVD)."""
    return {p: rank_for_density(l.in_features, l.out_features, density) for p, l in factorized_layers(model).items()}


@torch.no_grad()
def _export_layer(layer: FactorizedLinear, k: int, gate_value: str = "mean") -> nn.Module:
    # Stable sort: ties (e.g. untrained gates) keep the SVD order, largest singular values first.
    order = torch.sort(layer.gate.log_alpha.detach(), descending=True, stable=True).indices[:k]
    if gate_value == "mean":
        z = layer.gate.mean()[order]  # > 0 for every finite log_alpha
    else:
        z = layer.gate.deterministic().detach()[order].to(torch.float64)
    n_in, n_out = layer.in_features, layer.out_features
    P = layer.P.detach()[:, order].to(torch.float64) * z  # (out, k), gates folded in
    Q = layer.Q.detach()[order].to(torch.float64)         # (k, in)
    dt, dev = layer.P.dtype, layer.P.device
    bias = layer.bias
    if k * (n_in + n_out) >= n_in * n_out:  # thin pair no smaller (and slower): export dense
        W = P @ Q  # (out, in)
        if layer.conv1d:
            from transformers.pytorch_utils import Conv1D

            mod = Conv1D(n_out, n_in).to(device=dev, dtype=dt)
            mod.weight.copy_(W.t())
            if bias is None:
                mod.bias = None
        else:
            mod = nn.Linear(n_in, n_out, bias=bias is not None, device=dev, dtype=dt)
            mod.weight.copy_(W)
        if bias is not None:
            mod.bias.copy_(bias)
        mod.flop_folded = True  # marks a FLOP layer exported dense (for save_pruned / hard_sparsity)
        mod.flop_rank = k
        return mod
    mod = LowRankLinear(n_in, n_out, k, bias=bias is not None, dtype=dt, device=dev)
    mod.down.weight.copy_(Q)
    mod.up.weight.copy_(P)
    if bias is not None:
        mod.up.bias.copy_(bias)
    return mod


def export_flop_model(model, ranks: Optional[Mapping[str, int]] = None, *, gate_value: str = "mean") -> nn.Module:
    """A deep copy of the factorised ``model`` with each :class:`FactorizedLinear` replaced by its
    exported form (:class:`LowRankLinear`, or a dense layer when that is smaller; module docstring).

    ``ranks``: gates kept per layer path (default :func:`flop_ranks`, FLOP's rule; a layer not named
    keeps all its gates); the kept gates are those with the largest ``log_alpha`` (ties: larger
    singular value first).  ``gate_value``: the value folded into each kept rank-one term,
    ``"mean"`` (``E[z]``, for trained gates) or ``"deterministic"`` (the eval-mode value; 1 for
    untrained gates, so the export is an exact SVD truncation).  Returns the copy in eval mode.
    """
    if gate_value not in ("mean", "deterministic"):
        raise ValueError(f"gate_value must be 'mean' or 'deterministic', got {gate_value!r}")
    layers = factorized_layers(model)
    if not layers:
        raise ValueError("export_flop_model: the model has no FactorizedLinear layers (call factorize_model first)")
    ranks = dict(flop_ranks(model) if ranks is None else ranks)
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        raise KeyError(f"ranks name unknown layer(s): {', '.join(unknown)}")
    out = copy.deepcopy(model)
    for path, layer in factorized_layers(out).items():
        k = max(0, min(layer.rank, int(ranks.get(path, layer.rank))))
        _set_module(out, path, _export_layer(layer, k, gate_value))
    return out.eval()


def _layer_sizes(model) -> tuple[int, int]:
    """(exported weight params, dense params) over the FLOP layers (factorised or exported) of the blocks."""
    kept = dense = 0
    for _, m in _block_linears(model):
        if isinstance(m, LowRankLinear):
            kept += m.num_params()
            dense += m.in_features * m.out_features
        elif isinstance(m, FactorizedLinear):
            raise ValueError("model is not exported (FactorizedLinear found): call export_flop_model first")
        else:  # a dense layer: a FLOP layer folded back, or never factorised
            kept += m.weight.numel()
            dense += m.weight.numel()
    return kept, dense


def exported_density(model) -> float:
    """Weights of the block linears after export over their dense size (biases not counted)."""
    kept, dense = _layer_sizes(model)
    return kept / dense


def hard_sparsity(model) -> float:
    """``1 - exported params / dense params`` over the linear layers of the transformer blocks
    (thin pairs count ``k (in + out)``, dense layers ``in * out``; biases not counted).
    0 for a dense model.  Works on models loaded with ``load_pruned``."""
    return 1.0 - exported_density(model)


# ----------------------------------------------------------------------------- speedup <-> density


@dataclass
class SpeedupCurve:
    """Measured end-to-end speedups of uniform SVD-truncated variants against their density.

    ``densities`` / ``speedups``: the variants as measured (exported densities, ascending).  The
    dense model is the anchor (density 1, speedup 1).  Predictions use the running maximum from
    the dense side (more pruning is never predicted to be slower), with ``log(speedup)`` linear
    in the density between points.
    """

    densities: list[float]
    speedups: list[float]

    def __post_init__(self):
        if len(self.densities) != len(self.speedups) or not self.densities:
            raise ValueError("SpeedupCurve needs equally many (>= 1) densities and speedups")
        order = np.argsort(self.densities)
        self.densities = [float(self.densities[i]) for i in order]
        self.speedups = [float(self.speedups[i]) for i in order]

    def _points(self) -> tuple[np.ndarray, np.ndarray]:
        d = np.asarray(self.densities + [1.0])
        s = np.asarray(self.speedups + [1.0])
        return d, np.maximum.accumulate(s[::-1])[::-1]  # non-increasing in the density

    @property
    def max_speedup(self) -> float:
        return float(self._points()[1].max())

    def speedup_at(self, density: float) -> float:
        d, s = self._points()
        return float(np.exp(np.interp(density, d, np.log(s))))

    def density_for(self, target: float) -> float:
        """The largest density whose predicted speedup reaches ``target``."""
        d, s = self._points()
        if target > s.max():
            i = int(np.argmax(self.speedups))
            raise UnreachableTargetError(
                f"target {target:g}x unreachable: the fastest uniform low-rank variant measured "
                f"{self.speedups[i]:.2f}x (density {self.densities[i]:.2f}) in this environment")
        for hi in range(len(d) - 1, 0, -1):  # from the dense end towards lower densities
            lo = hi - 1
            if s[hi] >= target:
                return float(d[hi])
            if s[lo] >= target:
                frac = (math.log(target) - math.log(s[hi])) / (math.log(s[lo]) - math.log(s[hi]))
                return float(d[hi] + (d[lo] - d[hi]) * frac)
        return float(d[0])

    def to_dict(self) -> dict:
        return dict(densities=self.densities, speedups=self.speedups)


def measure_speedup_curve(model, env: InferenceEnv, densities: Sequence[float] = DEFAULT_CURVE_DENSITIES, *,
                          rounds: int = 15, factorized=None) -> SpeedupCurve:
    """Time uniform SVD-truncated variants of ``model`` (one per density, every factorised layer at
    :func:`rank_for_density`) against ``model`` end to end, interleaved
    (:func:`ziplm_ext.latency.measure_speedups`), and return the :class:`SpeedupCurve`.

    ``factorized``: an already factorised copy of ``model`` with untrained gates (saves the SVDs).
    """
    from ziplm_ext.stages.latency import build as latency

    densities = sorted({float(d) for d in densities})
    if not densities or any(not 0 < d < 1 for d in densities):
        raise ValueError(f"curve densities must lie in (0, 1), got {densities}")
    if factorized is None:
        factorized = copy.deepcopy(model)
        factorize_model(factorized)
    variants = [export_flop_model(factorized, uniform_ranks(factorized, d), gate_value="deterministic")
                for d in densities]
    speeds = latency.measure_speedups(model, variants, env, rounds=rounds)
    measured = [exported_density(v) for v in variants]  # rounding moves each a little off its nominal value
    del variants
    return SpeedupCurve(measured, list(speeds))


def density_for_speedups(model, env: InferenceEnv, targets: Sequence[float], *,
                         densities: Sequence[float] = DEFAULT_CURVE_DENSITIES, rounds: int = 15,
                         curve: Optional[SpeedupCurve] = None) -> dict[float, float]:
    """The density of the FLOP layers needed for each speedup target in ``env``.

    FLOP constrains parameters, so a speedup target is mapped to a density through measurement:
    uniform SVD-truncated variants (:func:`measure_speedup_curve`) are timed end to end against the
    dense model; the density for a target is interpolated on that curve (made monotone, log-speedup
    linear in density, anchored at the dense model = density 1, speedup 1).  A target beyond the
    fastest variant raises :class:`~ziplm_ext.search.UnreachableTargetError` naming that maximum.
    """
    curve = curve or measure_speedup_curve(model, env, densities, rounds=rounds)
    return {float(t): curve.density_for(float(t)) for t in targets}


# ----------------------------------------------------------------------------- training


def train_flop(student, teacher, train_data, target_density: float, steps: int, distill=None, *,
               lambda_lr: float = LAMBDA_LR, gate_lr: float = GATE_LR, warmup_frac: float = WARMUP_FRAC,
               lambda2_init: float = LAMBDA2_INIT, progress: bool = True, desc: str = "flop"):
    """Train a factorised ``student`` towards ``target_density`` with distillation from ``teacher``
    (``finetune`` + the Lagrangian).  Returns ``(FinetuneStats, LagrangianController)``.

    The gates' ``log_alpha`` get ``gate_lr`` (no weight decay), every other student parameter the
    config's ``lr``; the target ramps over ``round(warmup_frac * steps)`` steps.
    """
    from ziplm_ext.stages.distill import DistillConfig, finetune

    cfg = distill or DistillConfig()
    layers = factorized_layers(student)
    if not layers:
        raise ValueError("train_flop: the student has no FactorizedLinear layers (call factorize_model first)")
    if not 0 <= warmup_frac <= 1:
        raise ValueError(f"warmup_frac must lie in [0, 1], got {warmup_frac}")
    ctl = LagrangianController(layers, target_density, warmup_steps=int(round(warmup_frac * steps)),
                               lambda_lr=lambda_lr, lambda2=lambda2_init)
    gates = {id(l.gate.log_alpha) for l in layers.values()}
    gate_params = [l.gate.log_alpha for l in layers.values()]
    rest = [p for p in student.parameters() if p.requires_grad and id(p) not in gates]
    groups = [{"params": rest}, {"params": gate_params, "lr": gate_lr, "weight_decay": 0.0}]
    with gate_sampling(student, True):
        stats = finetune(student, teacher, train_data, steps, cfg, progress=progress, extra_loss=ctl.penalty,
                         after_backward=ctl.ascend, param_groups=groups, desc=desc)
    return stats, ctl


# ----------------------------------------------------------------------------- end to end


def _shrunk_ranks(layers: Mapping[str, FactorizedLinear], ranks: Mapping[str, int], factor: float) -> dict[str, int]:
    """Ranks whose exported sizes are ``factor`` times the current ones in every layer.

    A layer's exported size is ``min(k (in + out), in * out)`` (a layer stored dense counts as dense),
    so a dense layer goes to :func:`rank_for_density` of ``factor`` and a thin pair to ``k * factor``;
    rounded down and at least one gate fewer where possible.  The export then keeps the gates with
    the largest ``log_alpha``, i.e. drops the lowest first.
    """
    out = {}
    for p, k in ranks.items():
        l = layers[p]
        size = min(k * (l.in_features + l.out_features), l.dense_params) * factor
        nk = int(math.floor(size / (l.in_features + l.out_features)))
        out[p] = max(0, min(nk, k - 1)) if k > 0 else 0
    return out


def _shrink_factor(curve: SpeedupCurve, target: float, measured: float, density: float) -> float:
    """Density factor expected to lift a model from ``measured`` to ``target``.

    Assumes the model's speedup follows the curve's shape, off by the ratio seen at its current
    density: it needs the density at which the curve reaches ``aim * curve(density) / measured``,
    aiming half the tolerance above the target (``aim = target * 1.015``) so that timing noise
    does not put the shrunk model just below ``0.97 x target``.
    """
    aim = target * (1 + (1 - MIN_SPEEDUP_FRACTION) / 2)
    want = aim * curve.speedup_at(density) / max(measured, 1e-9)
    d_new = curve.density_for(min(want, curve.max_speedup))
    return min(0.95, max(0.2, d_new / max(density, 1e-9)))


def _model_ranks(model) -> dict[str, int]:
    """Kept rank per FLOP layer path of an exported model."""
    out = {}
    for p, m in _block_linears(model):
        if isinstance(m, LowRankLinear):
            out[p] = m.rank
        elif getattr(m, "flop_folded", False):
            out[p] = int(m.flop_rank)
    return out


def flop_prune(model: nn.Module, train_data, targets, env: Optional[InferenceEnv] = None, *, steps: int = 200,
               distill=None, lambda_lr: float = LAMBDA_LR, gate_lr: float = GATE_LR,
               warmup_frac: float = WARMUP_FRAC, lambda2_init: float = LAMBDA2_INIT,
               eval_data=None, progress: bool = True, seed: int = 0, measure_rounds: int = 15,
               model_name: Optional[str] = None, tokenizer=None,
               curve_densities: Sequence[float] = DEFAULT_CURVE_DENSITIES, curve: Optional[SpeedupCurve] = None,
               max_shrinks: int = 2):
    """FLOP, one independently trained model per speedup target, each measured in ``env``.

    Per target: the speedup is mapped to a density of the factorised layers
    (:func:`measure_speedup_curve`, before any training; unreachable targets fail here), a deep
    copy of ``model`` is factorised and distilled from ``model`` for ``steps`` steps with the
    Lagrangian constraint (:func:`train_flop`), and exported (:func:`export_flop_model`).  All
    targets' models are then timed together against the dense model; a model below
    ``0.97 x`` its target is shrunk (no more training) and re-timed, at most ``max_shrinks``
    times, else :class:`~ziplm_ext.search.UnreachableTargetError`.

    Args:
        train_data: ``(N, T)`` LongTensor (causal LMs) or ``(input_ids, attention_mask)`` (encoders).
        targets: speedups (> 1) over the dense model.
        distill: :class:`ziplm_ext.distill.DistillConfig` (default: its defaults with ``seed``); the
            same objective and budget as the other methods' fine-tuning.
        lambda_lr: gradient-ascent step of the Lagrange multipliers.
        gate_lr: AdamW learning rate of the gates' ``log_alpha`` (the weights use ``distill.lr``).
        warmup_frac: fraction of the steps over which the target density ramps.
        lambda2_init: initial quadratic multiplier (module docstring: Constraint).
        measure_rounds: interleaved rounds of every end-to-end timing (curve and final models).
        curve_densities: densities of the uniform SVD-truncated variants timed for the curve.
        curve: a :class:`SpeedupCurve` measured before for this model and ``env`` (e.g. by an
            earlier call: ``family.speedup_curve``); skips the curve's timing.
        max_shrinks: re-export / re-measure rounds for models that miss their target.
        eval_data: held-out data for :func:`ziplm_ext.evaluate.evaluate_model`.

    Returns a :class:`~ziplm_ext.pipeline.PrunedFamily` (``latency_table=None``; the curve is
    attached as the extra attribute ``speedup_curve``).  Each result's
    ``levels`` maps layer paths to kept ranks; ``predicted_speedup`` is the curve's value at the
    model's exported density; ``calibration_loss`` is the final distillation loss (mean of the last
    10% of steps, the Lagrangian excluded); ``metrics`` holds the evaluation metrics plus
    ``flop_target_density``, ``flop_expected_density`` (end of training), ``flop_hard_sparsity``,
    ``flop_shrink_rounds``, ``train_tokens_per_second`` and ``train_seconds``.
    """
    from ziplm_ext.stages.distill import DistillConfig, check_train_data
    from ziplm_ext.methods.ziplm_oneshot import PrunedFamily, PrunedResult, _validate_targets, num_parameters

    env = env or InferenceEnv()
    targets = _validate_targets(targets)
    get_adapter(model)  # unsupported architectures fail here (UnsupportedArchitectureError is a ValueError)
    check_train_data(train_data, model.get_input_embeddings().weight.shape[0])
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if max_shrinks < 0:
        raise ValueError(f"max_shrinks must be >= 0, got {max_shrinks}")
    cfg = distill or DistillConfig(seed=seed)
    model.eval()
    torch.manual_seed(seed)
    stages: dict[str, float] = {}

    t0 = time.perf_counter()
    base = copy.deepcopy(model)
    factorize_model(base)  # one SVD per layer, shared by the curve and every target
    if curve is None:
        curve = measure_speedup_curve(model, env, curve_densities, rounds=measure_rounds, factorized=base)
    densities = {t: curve.density_for(t) for t in targets}  # raises for unreachable targets
    stages["calibrate_speed"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    trained = {}
    for t in targets:
        student = copy.deepcopy(base)
        stats, ctl = train_flop(student, model, train_data, densities[t], steps, cfg, lambda_lr=lambda_lr,
                                gate_lr=gate_lr, warmup_frac=warmup_frac, lambda2_init=lambda2_init,
                                progress=progress, desc=f"FLOP {t:g}x")
        with torch.no_grad():
            s_hat = float(ctl.expected_density())
        trained[t] = dict(student=student, stats=stats, ranks=flop_ranks(student), expected=s_hat)
    del base
    stages["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from ziplm_ext.stages.latency import build as latency

    built = {t: export_flop_model(trained[t]["student"], trained[t]["ranks"]) for t in targets}
    measured = dict(zip(targets, latency.measure_speedups(model, [built[t] for t in targets], env,
                                                           rounds=measure_rounds)))
    shrinks = {t: 0 for t in targets}
    for _ in range(max_shrinks):
        todo = [t for t in targets if measured[t] < MIN_SPEEDUP_FRACTION * t]
        if not todo:
            break
        for t in todo:
            factor = _shrink_factor(curve, t, measured[t], exported_density(built[t]))
            trained[t]["ranks"] = _shrunk_ranks(factorized_layers(trained[t]["student"]), trained[t]["ranks"], factor)
            built[t] = export_flop_model(trained[t]["student"], trained[t]["ranks"])
            shrinks[t] += 1
        measured.update(zip(todo, latency.measure_speedups(model, [built[t] for t in todo], env,
                                                           rounds=measure_rounds)))
    missed = [t for t in targets if measured[t] < MIN_SPEEDUP_FRACTION * t]
    if missed:
        raise UnreachableTargetError(
            f"FLOP could not meet target(s) after {max_shrinks} shrink round(s): "
            + "; ".join(f"{t:g}x measured {measured[t]:.2f}x" for t in missed)
            + f" (fastest uniform low-rank variant {curve.max_speedup:.2f}x)")
    stages["measure"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dense_metrics = {}
    deployed = latency.in_env(model, env)  # quality as deployed: both models in the environment's dtype
    if eval_data is not None:
        from ziplm_ext.eval.evaluate import evaluate_model

        dense_metrics = evaluate_model(deployed, deployed, eval_data)
    results = []
    for t in targets:
        m, info = built.pop(t).to(dtype=env.torch_dtype), trained.pop(t)
        stats = info["stats"]
        metrics = evaluate_model(m, deployed, eval_data) if eval_data is not None else {}
        density = exported_density(m)
        metrics.update(flop_target_density=densities[t], flop_expected_density=info["expected"],
                       flop_hard_sparsity=1.0 - density, flop_shrink_rounds=float(shrinks[t]),
                       train_tokens_per_second=stats.tokens_per_second, train_seconds=stats.seconds)
        cal = stats.final.get("distill", stats.final.get("total", float("nan")))
        results.append(PrunedResult(t, m, _model_ranks(m), curve.speedup_at(density), measured[t], float(cal),
                                    num_parameters(m), metrics))
        del info
    stages["evaluation"] = time.perf_counter() - t0
    name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    family = PrunedFamily(results, env, None, 0.0, num_parameters(model), dense_metrics, {}, stages, name, tokenizer,
                          method="FLOP")
    family.speedup_curve = curve  # not part of PrunedFamily's fields (nor of family.json)
    return family
