"""Pure-PyTorch oracles, one per native op, with the same signatures as ``ziplm_ext.ops``.

They are written for clarity, not speed: the greedy OBS oracle is the naive loop that pays a full
pass over H⁻¹ and W for every removed structure.
"""
from __future__ import annotations

from typing import Optional

import torch

from ziplm_ext.native.ops import GreedyOBSResult


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"ziplm: {name} must be float32 or float64, got {t.dtype}")


def hessian_accumulate(H: torch.Tensor, X: torch.Tensor, mask: Optional[torch.Tensor] = None) -> int:
    _check_float(H, "H")
    _check_float(X, "X")
    X = X.reshape(-1, X.shape[-1])
    if mask is not None:
        X = X[mask.reshape(-1).bool()]
    if not torch.isfinite(X).all():
        raise ValueError("ziplm: X contains NaN or Inf")
    X = X.to(H.dtype)
    H += X.T @ X
    return X.shape[0]


def damped_inverse(H: torch.Tensor, damp: float = 0.01, max_tries: int = 8):
    _check_float(H, "H")
    g = H.shape[-1]
    Hb = H.reshape(-1, g, g).clone()
    dead = torch.diagonal(Hb, dim1=-2, dim2=-1) == 0
    out = torch.empty_like(Hb)
    used = torch.empty(Hb.shape[0], dtype=torch.float64)
    for i in range(Hb.shape[0]):
        A = Hb[i]
        A.diagonal()[dead[i]] = 1.0
        mean = A.diagonal().mean()
        used_prev = -1.0
        for t in range(max_tries):
            d = damp if t == 0 else min(1.0, max(damp, 1e-6) * 10.0**t)
            if t > 0 and d <= used_prev:
                continue
            used_prev = d
            L, info = torch.linalg.cholesky_ex(A + d * mean * torch.eye(g, dtype=A.dtype, device=A.device))
            if info == 0:
                out[i] = torch.cholesky_inverse(L)
                used[i] = d
                break
        else:
            raise ValueError(f"ziplm: Hessian block {i} is not positive definite even with damping")
    return out.reshape(H.shape), used, dead


def greedy_obs(W: torch.Tensor, H: torch.Tensor, group_size: int = 1, damp: float = 0.01,
               block_size: int = 128, *, max_steps: Optional[int] = None) -> GreedyOBSResult:
    """Naive greedy structured OBS: full rank-g updates of W and H⁻¹ after every removal.

    max_steps stops early (benchmarks time a prefix of the loop, whose per-step cost is constant);
    the result then holds only that many steps.
    """
    _check_float(W, "W")
    rows, cols = W.shape
    g = group_size
    if g < 1 or cols % g:
        raise ValueError(f"ziplm: group_size {g} does not divide the {cols} columns of W")
    S = cols // g
    Hinv, used, dead = damped_inverse(H.to(W.dtype), damp)
    W = W.clone()
    W[:, dead.reshape(-1)] = 0
    W0 = W.clone()
    removed = torch.zeros(S, dtype=torch.bool)
    order = torch.empty(S, dtype=torch.long)
    step_loss = torch.empty(S, dtype=W.dtype)
    U = torch.empty(rows, S * g, dtype=W.dtype)
    R = torch.zeros(S * g, cols, dtype=W.dtype)
    eye = torch.eye(g, dtype=W.dtype)
    steps = S if max_steps is None else min(S, max_steps)
    for s in range(steps):
        # rho_M = tr(W_M B_M^-1 W_M^T) for every remaining group.
        Wg = W.reshape(rows, S, g).permute(1, 0, 2)                                   # (S, rows, g)
        B = torch.diagonal(Hinv.reshape(S, g, S, g), dim1=0, dim2=2).permute(2, 0, 1)  # (S, g, g)
        B = torch.where(removed[:, None, None], eye, B)
        rho = torch.einsum("srg,sgh,srh->s", Wg, torch.linalg.inv(B), Wg)
        rho[removed] = float("inf")
        k = int(rho.argmin())
        M = torch.arange(k * g, (k + 1) * g)
        L = torch.linalg.cholesky(Hinv[M][:, M])
        Gn = torch.linalg.solve_triangular(L, Hinv[M], upper=False).T   # (cols, g) = H^-1[:, M] L^-T
        Un = torch.linalg.solve_triangular(L, W[:, M].T, upper=False).T  # (rows, g) = W_M L^-T
        Gn[removed.repeat_interleave(g)] = 0
        W -= Un @ Gn.T
        Hinv -= Gn @ Gn.T
        W[:, M] = 0
        removed[k] = True
        Gn[M] = 0  # stored history: rows of removed columns are irrelevant (weights() zeroes them)
        order[s] = k
        step_loss[s] = (Un**2).sum()
        U[:, s * g:(s + 1) * g] = Un
        R[s * g:(s + 1) * g] = Gn.T
    k = steps * g
    return GreedyOBSResult(order[:steps], step_loss[:steps].cumsum(0), U[:, :k], R[:k], W0, g, float(used.max()))


# Slice-timing oracles: name of the native op -> (timing oracle, block-output oracle) in
# ziplm_ext.timing; both take the op's arguments (the block oracle all but warmup and reps).
_TIMING_ORACLES = {
    "time_attention": ("reference_time_attention", "attention_block_reference"),
    "time_attention_decode": ("reference_time_attention_decode", "attention_decode_block_reference"),
    "time_ffn": ("reference_time_ffn", "ffn_block_reference"),
}


def _timing_oracle_with_output(op: str):
    """Oracle for ``torch.ops.ziplm.<op>_with_output``: ``(per-rep seconds, block output)``."""
    from ziplm_ext.native import timing

    time_name, block_name = _TIMING_ORACLES[op]

    def oracle(*args):
        *block_args, _warmup, _reps = args
        times = getattr(timing, time_name)(*args)
        return times, getattr(timing, block_name)(*block_args)

    oracle.__name__ = op + "_with_output"
    return oracle


def __getattr__(name):
    # The slice-timing oracles live next to their wrappers in ziplm_ext.timing.
    if name in _TIMING_ORACLES:
        from ziplm_ext.native import timing

        return getattr(timing, _TIMING_ORACLES[name][0])
    if name.endswith("_with_output") and name[: -len("_with_output")] in _TIMING_ORACLES:
        return _timing_oracle_with_output(name[: -len("_with_output")])
    raise AttributeError(name)
