"""Sequential re-solve of a pruned model's out projections (ZipLM paper, the layer-wise
reconstruction objective, applied once the widths are chosen).

The OBS database prunes every layer on inputs of the *dense* model, so each layer is updated
as if all earlier layers were intact. Once the family's widths are fixed, a better update is
available in closed form: walking the blocks in order, each kept out projection ``W`` is re-fitted
so that, fed the inputs ``X_p`` that the already pruned earlier layers produce, it reproduces
the dense layer's output on the dense inputs ``X_d``::

    W* = argmin_W ||W X_p - W_d X_d||^2  =  W_d (X_d X_pᵀ) (X_p X_pᵀ + λI)^-1

the same least-squares maths as the OBS update (with the Hessian of the pruned inputs). A bias,
where the layer has one, is fitted jointly (a constant input column), which compensates the mean
contribution of the removed structures. The attention of a block is re-fitted before its FFN, so
the FFN sees the corrected attention output. Removed modules stay removed.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ziplm_ext.adapters import get_adapter
from ziplm_ext.adapters.base import Adapter, PrunableLayer
from ziplm_ext.stages.calibrate import CalibrationBatch, _block_inputs, _first

__all__ = ["resolve_sequential"]


class _Stats:
    """X_pᵀX_p and X_pᵀX_d of one layer (float64, constant column appended when there is a bias)."""

    def __init__(self, bias: bool):
        self.bias = bias
        self.H: Optional[torch.Tensor] = None
        self.C: Optional[torch.Tensor] = None
        self.err = 0.0  # ||W X_p - W_d X_d||^2 before the re-fit, accumulated with the stats

    def add(self, xp: torch.Tensor, xd: torch.Tensor) -> None:
        xp, xd = xp.double(), xd.double()
        if self.bias:
            one = torch.ones(xp.shape[0], 1, dtype=xp.dtype, device=xp.device)
            xp, xd = torch.cat([xp, one], 1), torch.cat([xd, one], 1)
        if self.H is None:
            self.H = xp.new_zeros(xp.shape[1], xp.shape[1])
            self.C = xp.new_zeros(xp.shape[1], xd.shape[1])
        self.H.addmm_(xp.t(), xp)
        self.C.addmm_(xp.t(), xd)


def _weight_with_bias(adapter: Adapter, model, layer: PrunableLayer) -> torch.Tensor:
    """(out, in[+1]) float64 weight of the layer's out projection, bias as the last column."""
    W = adapter.get_weight(model, layer).double()
    b = getattr(adapter.out_proj(model, layer), "bias", None)
    return W if b is None else torch.cat([W, b.detach().double().reshape(-1, 1)], 1)


def _set_weight_with_bias(adapter: Adapter, model, layer: PrunableLayer, W: torch.Tensor) -> None:
    mod = adapter.out_proj(model, layer)
    if getattr(mod, "bias", None) is not None:
        with torch.no_grad():
            mod.bias.copy_(W[:, -1].to(mod.bias))
        W = W[:, :-1]
    adapter.set_weight(model, layer, W.contiguous())


def _solve(stats: _Stats, W_dense: torch.Tensor, damp: float) -> Optional[torch.Tensor]:
    """The re-fitted (out, k[+1]) weight, or None when the damped Gram matrix is not SPD."""
    H = stats.H.clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    diag[dead] = 1.0  # a column that never fires: keep it out of the solve (its weight goes to 0)
    diag.add_(damp * float(diag.mean()))
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        return None
    rhs = stats.C @ W_dense.t()            # (k, out) = X_pᵀ X_d W_dᵀ
    return torch.cholesky_solve(rhs, L).t()


def _masked_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[mask.reshape(-1)]


class _Capture:
    """Forward pre-hook storing the (real-token) inputs of one module per batch."""

    def __init__(self, module: nn.Module):
        self.rows: list[torch.Tensor] = []
        self.mask: Optional[torch.Tensor] = None
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.rows.append(_masked_rows(args[0].detach(), self.mask))

    def remove(self) -> None:
        self.handle.remove()


def _run_block(block: nn.Module, states: list, captures: Sequence[_Capture], advance: bool) -> None:
    """Run `block` on every batch's state (hooks capture the inputs); replace the states when `advance`."""
    for st in states:
        for c in captures:
            c.mask = st[3]
        out = _first(block(st[0], *st[1], **st[2]))
        if advance:
            st[0] = out


def _initial_states(model: nn.Module, adapter: Adapter, batches: Sequence[CalibrationBatch]) -> list:
    states = []
    for b in batches:
        args, kwargs = _block_inputs(model, adapter, b)
        mask = (b.attention_mask.bool() if b.attention_mask is not None
                else torch.ones_like(b.input_ids, dtype=torch.bool))
        states.append([args[0] if args else kwargs.pop("hidden_states"), args[1:], kwargs, mask])
    return states


def _refit_layer(pruned, dense, adapter: Adapter, layer: PrunableLayer, xd_rows: list, p_states: list,
                 p_block: nn.Module, damp: float) -> tuple[float, float]:
    """Re-fit one layer of `pruned` from its captured inputs; returns (error before, error after)."""
    cap = _Capture(adapter.out_proj(pruned, layer))
    try:
        _run_block(p_block, p_states, [cap], advance=False)
    finally:
        cap.remove()
    W_dense = _weight_with_bias(adapter, dense, layer)
    W_old = _weight_with_bias(adapter, pruned, layer)
    stats = _Stats(bias=getattr(adapter.out_proj(dense, layer), "bias", None) is not None)
    for xp, xd in zip(cap.rows, xd_rows):
        stats.add(xp, xd)
    W_new = _solve(stats, W_dense, damp)
    G = W_dense @ stats.C.t()  # W_d X_d X_pᵀ, shared by both errors below
    before = _residual(W_old, W_dense, stats, G, xd_rows)
    if W_new is None:
        return before, before
    after = _residual(W_new, W_dense, stats, G, xd_rows)
    if after < before:
        _set_weight_with_bias(adapter, pruned, layer, W_new.to(W_old.dtype))
        return before, after
    return before, before


def _residual(W: torch.Tensor, W_dense: torch.Tensor, stats: _Stats, G: torch.Tensor, xd_rows: list) -> float:
    """||W X_p - W_d X_d||^2 from the accumulated statistics (no second pass over the data)."""
    dd = 0.0
    for xd in xd_rows:  # ||W_d X_d||^2
        y = xd.double() @ W_dense[:, :xd.shape[1]].t()
        if stats.bias:
            y = y + W_dense[:, -1]
        dd += float((y * y).sum())
    return float((W @ stats.H * W).sum()) - 2.0 * float((W * G).sum()) + dd


@torch.no_grad()
def resolve_sequential(pruned: nn.Module, dense: nn.Module, batches: Sequence[CalibrationBatch], *,
                       damp: float = 0.01, target: str = "stream",
                       progress: Optional[Callable[[int], None]] = None) -> dict[str, tuple]:
    """Re-fit every kept out projection of `pruned` (in place) on inputs from its own pruned earlier
    layers, against the outputs of `dense` (the model it was pruned from, same architecture).

    A layer keeps its old weights when the re-fit would not lower its reconstruction error.
    `target`: ``"stream"`` -- the dense block's output on the pruned model's own hidden states (each
    layer is re-fitted for the inputs it now sees, upstream errors are left alone, as in sequential
    GPTQ / SparseGPT); ``"dense"`` -- the dense model's output on its own hidden states (each layer
    also tries to undo the errors of the layers before it).
    Returns ``{layer name: (error before, error after)}`` (squared, summed over real tokens).
    """
    if target not in ("stream", "dense"):
        raise ValueError(f"resolve_sequential: target must be 'stream' or 'dense', got {target!r}")
    if not batches:
        raise ValueError("resolve_sequential: no calibration batches")
    adapter = get_adapter(pruned)
    if type(get_adapter(dense)) is not type(adapter):
        raise ValueError("resolve_sequential: the pruned and dense models are different architectures")
    pruned.eval()
    dense.eval()
    d_states, p_states = _initial_states(dense, adapter, batches), _initial_states(pruned, adapter, batches)
    layers = adapter.prunable_layers(pruned)
    report: dict[str, tuple] = {}
    for i, (d_block, p_block) in enumerate(zip(adapter.blocks(dense), adapter.blocks(pruned))):
        mine = [l for l in layers if l.block == i and not adapter.is_removed(pruned, l)]
        mine.sort(key=lambda l: 0 if l.kind == "attn" else 1)  # the FFN sees the re-fitted attention
        caps = {l.name: _Capture(adapter.out_proj(dense, l)) for l in mine}
        try:
            _run_block(d_block, d_states if target == "dense" else p_states, list(caps.values()),
                       advance=target == "dense")
        finally:
            for c in caps.values():
                c.remove()
        for layer in mine:
            report[layer.name] = _refit_layer(pruned, dense, adapter, layer, caps[layer.name].rows, p_states,
                                              p_block, damp)
        _run_block(p_block, p_states, [], advance=True)
        if progress is not None:
            progress(i)
    return report
