"""Export of a trained FLOP model (Wang, Wohlwend, Lei, EMNLP 2020): the inference rule and the sizes.

**Export** (:func:`export_flop_model`, FLOP's inference rule): per layer keep ``k = round(sum_k P(z_k != 0))``
gates, the ones with the largest ``log_alpha``, and fold their means ``E[z_k]`` into ``P``
(:meth:`~ziplm_ext.layers.HardConcreteGate.mean`; the layer is linear in ``z``, so this is its expected
output under the gate noise it was trained with; FLOP's code approximates ``E[z]`` by
``sigmoid(0.8 log_alpha)``).  The deterministic estimator ``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma,
0, 1)`` used in eval mode is 0 for ``log_alpha < -ln 11`` although such a gate is non-zero up to 30% of the
time, so FLOP's keep count would keep zero columns.  The result is a :class:`~ziplm_ext.layers.LowRankLinear`
(``down``: k x in, ``up``: out x k, the bias on ``up``).  If ``k (in + out) >= in * out`` the thin pair is
no smaller than the dense matrix and slower (two matmuls), so the layer is exported dense,
``W = P_k diag(E[z_k]) Q_k``, in the original module class (``nn.Linear``, or GPT-2's ``Conv1D`` with its
``(in, out)`` layout).  GPT-2 attention and MLP only ever *call* their ``c_attn`` / ``c_proj`` / ``c_fc``
modules (transformers 5: no reads of ``.weight`` or ``.nf`` in the forward path;
``GPT2PreTrainedModel._init_weights`` reads ``c_proj.weight``, which only matters when re-initialising,
and ``load_pruned`` tolerates it), so a :class:`~ziplm_ext.layers.LowRankLinear` computing ``x W + b`` is
a drop-in replacement.  (ZipLM's adapter operations that read out-projection weights -- ``get_weight``,
``slice`` -- do not apply to FLOP layers; ``adapter.shapes`` does, as ``LowRankLinear`` has
``in_features``.)
"""

from __future__ import annotations

import copy
import math
from typing import Mapping, Optional

import torch
from torch import nn

from ziplm_ext.layers import FactorizedLinear, LowRankLinear
from ziplm_ext.methods.flop.factorize import block_linears, factorized_layers, set_module

__all__ = ["flop_ranks", "rank_for_density", "uniform_ranks", "export_layer", "export_flop_model",
           "exported_density", "hard_sparsity", "model_ranks", "shrunk_ranks"]


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
def export_layer(layer: FactorizedLinear, k: int, gate_value: str = "mean") -> nn.Module:
    """One factorised layer with its ``k`` gates of largest ``log_alpha`` kept and their values
    (``gate_value``: see :func:`export_flop_model`) folded in: a :class:`LowRankLinear`, or the
    original dense module class (marked ``flop_folded``, ``flop_rank``) when that is no larger."""
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
        set_module(out, path, export_layer(layer, k, gate_value))
    return out.eval()


def _layer_sizes(model) -> tuple[int, int]:
    """(exported weight params, dense params) over the FLOP layers (factorised or exported) of the blocks."""
    kept = dense = 0
    for _, m in block_linears(model):
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


def shrunk_ranks(layers: Mapping[str, FactorizedLinear], ranks: Mapping[str, int], factor: float) -> dict[str, int]:
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


def model_ranks(model) -> dict[str, int]:
    """Kept rank per FLOP layer path of an exported model."""
    out = {}
    for p, m in block_linears(model):
        if isinstance(m, LowRankLinear):
            out[p] = m.rank
        elif getattr(m, "flop_folded", False):
            out[p] = int(m.flop_rank)
    return out
