"""The nn.Modules of FLOP models (Wang, Wohlwend, Lei, EMNLP 2020), kept low in the package so that
serialisation (:mod:`ziplm_ext.io.export`) can build and recognise them without importing the method.

* :class:`HardConcreteGate`: ``r`` hard concrete gates (Louizos, Welling, Kingma, ICLR 2018) with
  ``beta = 2/3, gamma = -0.1, zeta = 1.1``; ``log_alpha`` starts at :data:`INIT_LOG_ALPHA`.
* :class:`FactorizedLinear`: a linear layer in training, ``W = P diag(z) Q`` from the SVD of the
  pretrained weight (the FLOP paper's factorised parameterisation).
* :class:`LowRankLinear`: an exported layer, ``up(down(x))`` with the kept rank.

The method itself (factorisation of a model, the Lagrangian, export, speedup targets) is
:mod:`ziplm_ext.methods.flop`.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ziplm_ext.adapters.base import is_conv1d

__all__ = ["BETA", "GAMMA", "ZETA", "INIT_LOG_ALPHA", "HardConcreteGate", "FactorizedLinear", "LowRankLinear"]

BETA = 2.0 / 3.0   # temperature of the hard concrete distribution
GAMMA = -0.1       # stretch interval (gamma, zeta) around [0, 1]
ZETA = 1.1
INIT_LOG_ALPHA = 3.0  # > ln 11 ~ 2.40: deterministic gate exactly 1, P(z != 0) ~ 0.99 at the start


# ----------------------------------------------------------------------------- hard concrete gate


class HardConcreteGate(nn.Module):
    """``r`` hard concrete gates ``z in [0, 1]`` (Louizos, Welling, Kingma 2018).

    Sample (stochastic mode): ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1-u) + log_alpha) / beta)``,
    ``z = clamp(s (zeta - gamma) + gamma, 0, 1)``.  Deterministic mode:
    ``z = clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``.

    ``sampling``: ``None`` (default) samples in training mode only; ``True`` / ``False`` force
    stochastic / deterministic gates whatever the module mode
    (:func:`ziplm_ext.methods.flop.factorize.gate_sampling`).
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

