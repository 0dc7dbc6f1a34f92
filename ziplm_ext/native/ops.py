"""Typed wrappers around the native ops (``torch.ops.ziplm.*``).

Each op dispatches on the device of its tensors (CPU kernels always, CUDA kernels when built).
``ziplm_ext.native.reference`` holds a pure-PyTorch oracle with the same signature for every op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ziplm_ext.native import _native

try:  # loading registers torch.ops.ziplm.* and their fake kernels (for callers that use the ops directly)
    _native()
except RuntimeError:  # pragma: no cover - exercised only on a broken install; _native() raises on use
    pass


def hessian_accumulate(H: torch.Tensor, X: torch.Tensor, mask: Optional[torch.Tensor] = None) -> int:
    """In place ``H += Xᵀ X`` over calibration rows; returns the number of rows added.

    H: (c, c) float32/float64, contiguous (float64 recommended). X: (tokens, c) or (batch, seq, c),
    converted to H's dtype. mask: bool/int with X's shape minus the feature dim; rows where it is
    false (padding) are skipped.
    """
    return int(_native().hessian_accumulate(H, X, mask))


def damped_inverse(H: torch.Tensor, damp: float = 0.01, max_tries: int = 8):
    """Cholesky inverse of ``H + damp·mean(diag H)·I`` for one (c, c) or a batch (B, g, g) of SPD matrices.

    A matrix whose factorisation fails is retried with damping ×10 (from at least 1e-6) up to
    ``max_tries`` times; a matrix that still fails raises ValueError. Dead inputs (zero diagonal)
    get ``H_ii = 1`` as in OBS practice.

    Returns (Hinv with H's shape, damp_used (B,) float64 — larger than ``damp`` where escalation was
    needed —, dead (B, g) bool).
    """
    return _native().damped_inverse(H, float(damp), int(max_tries))


@dataclass
class GreedyOBSResult:
    """The full greedy removal history of one layer in compact form.

    order: (S,) structure indices in removal order. losses: (S,) cumulative loss after each removal,
    ``tr(ΔW H ΔWᵀ)`` with the damped H that was used. U: (rows, S·g), R: (S·g, cols) rank-g factors
    of each step, so that ``W_k = W0 - U[:, :k g] R[:k g]`` with removed columns zero. W0: (rows, cols)
    the starting weights (dead inputs zeroed). damp: the relative damping actually used.
    """

    order: torch.Tensor
    losses: torch.Tensor
    U: torch.Tensor
    R: torch.Tensor
    W0: torch.Tensor
    group_size: int
    damp: float

    @property
    def num_structures(self) -> int:
        return int(self.order.numel())

    def removed(self, k: int) -> torch.Tensor:
        """Indices of the first k removed structures."""
        return self.order[:k]

    def kept(self, k_removed: int) -> torch.Tensor:
        """Sorted indices of the structures still present after k removals."""
        mask = torch.ones(self.num_structures, dtype=torch.bool, device=self.order.device)
        mask[self.order[:k_removed]] = False
        return mask.nonzero().squeeze(1)

    def loss(self, k: int) -> float:
        return 0.0 if k == 0 else float(self.losses[k - 1])

    def weights(self, k: int) -> torch.Tensor:
        """The (rows, cols) weights after k removals, rebuilt from the compact factors."""
        if not 0 <= k <= self.num_structures:
            raise ValueError(f"k must be in [0, {self.num_structures}], got {k}")
        g = self.group_size
        W = self.W0 - self.U[:, : k * g] @ self.R[: k * g]
        if k:
            cols = (self.order[:k, None] * g + torch.arange(g, device=W.device)).reshape(-1)
            W[:, cols] = 0
        return W

    def nbytes(self) -> int:
        """Bytes held by the compact representation (order, losses, U, R, W0)."""
        return sum(t.numel() * t.element_size() for t in (self.order, self.losses, self.U, self.R, self.W0))


def greedy_obs(W: torch.Tensor, H: torch.Tensor, group_size: int = 1, damp: float = 0.01,
               block_size: int = 128, *, generic: bool = False) -> GreedyOBSResult:
    """Greedy structured OBS: remove groups of ``group_size`` consecutive columns of W one at a time.

    W: (rows, cols) float32/float64. H: (cols, cols) Hessian ``XᵀX`` (any float dtype; inverted in W's
    precision after relative damping ``damp``). group_size = head_dim for heads, 1 for FFN neurons.
    block_size: pending columns batched into one matrix-matrix downdate (speed only, not results).
    generic: force the device-generic ATen loop (the CUDA code path) instead of the fused CPU kernel.
    """
    op = _native().greedy_obs_generic if generic else _native().greedy_obs
    order, losses, U, R, W0, damp_used = op(W, H, int(group_size), float(damp), int(block_size))
    return GreedyOBSResult(order, losses, U, R, W0, int(group_size), float(damp_used))
