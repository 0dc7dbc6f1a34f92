"""FLOP factorisation of a model (Wang, Wohlwend, Lei, EMNLP 2020) and the sizes it is measured by.

* **Factorisation** (:func:`factorize_model`).  Every linear layer inside the transformer blocks
  (``get_adapter(model).blocks(model)``) -- LLaMA ``q/k/v/o_proj`` and ``gate/up/down_proj``; GPT-2
  ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``; BERT ``query/key/value``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense`` -- becomes a
  :class:`~ziplm_ext.layers.FactorizedLinear` ``W = P diag(z) Q`` with ``P = U sqrt(S)`` (out x r) and
  ``Q = sqrt(S) V^T`` (r x in) from the SVD ``W = U S V^T`` of the pretrained weight, at full rank
  ``r = min(in, out)``: with every gate at 1 the layer computes exactly what it computed before.
  Embeddings, the LM head and norms are not touched.
* **Gates** (:class:`~ziplm_ext.layers.HardConcreteGate`): hard concrete (Louizos et al.) with
  ``beta = 2/3, gamma = -0.1, zeta = 1.1``; ``log_alpha`` starts at
  :data:`~ziplm_ext.layers.INIT_LOG_ALPHA` (= 3, above ``ln 11`` so every deterministic gate is
  exactly 1 and ``P(z != 0) ~ 0.99``).
* **Size**: FLOP counts a layer's expected size as ``(in + out) * sum_k P(z_k != 0)`` (biases are
  not counted).  At full rank that exceeds the dense size ``in * out`` (twice for a square layer),
  and the export stores such a layer dense (:mod:`ziplm_ext.methods.flop.export`), so the size the
  constraint finally holds to is the *exported* size ``min((in + out) sum_k P(z_k != 0), in * out)``
  (gradient straight through the cap).  Densities are sizes over ``sum in * out`` of the factorised
  layers.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn

from ziplm_ext.adapters import get_adapter
from ziplm_ext.adapters.base import is_conv1d
from ziplm_ext.layers import INIT_LOG_ALPHA, FactorizedLinear, HardConcreteGate, LowRankLinear

__all__ = ["block_linears", "set_module", "factorized_layers", "factorize_model", "gate_sampling",
           "expected_density", "factorized_density"]


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def block_linears(model) -> Iterator[tuple[str, nn.Module]]:
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


def set_module(model, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``model`` (replacing what is there)."""
    owner, _, attr = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, module)


def factorized_layers(model) -> dict[str, FactorizedLinear]:
    """Every :class:`FactorizedLinear` in the model's blocks, by module path."""
    return {p: m for p, m in block_linears(model) if isinstance(m, FactorizedLinear)}


def factorize_model(model, init_log_alpha: float = INIT_LOG_ALPHA) -> dict[str, FactorizedLinear]:
    """Replace every linear layer inside the transformer blocks by a full-rank :class:`FactorizedLinear`
    (in place; the model computes the same function with deterministic gates).  Returns ``{path: layer}``.

    Raises ``ValueError`` for an already factorised / exported model, or one without block linears.
    """
    found = list(block_linears(model))
    if any(isinstance(m, (FactorizedLinear, LowRankLinear)) for _, m in found):
        raise ValueError("model is already FLOP-factorised or exported; factorise the dense model")
    out = {}
    for path, mod in found:
        w = mod.weight
        if w.numel() == 0:
            continue  # a zero-width layer (e.g. sliced to nothing) has nothing to factorise
        fl = FactorizedLinear.from_module(mod, init_log_alpha).to(device=w.device)
        fl.train(mod.training)
        set_module(model, path, fl)
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

