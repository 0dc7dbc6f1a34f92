"""Physically smaller models: slice every prunable layer down to its chosen width.

:func:`build_pruned_model` keeps the structures the OBS database chose for each width and gives
the out projections the database's updated weights (ZipLM paper: the pruned structures are
removed and the remaining weights updated to compensate). :func:`build_magnitude_model` is the
magnitude baseline: same widths, the structures with the largest out-projection column norms,
no update.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from ziplm_ext.adapters import get_adapter
from ziplm_ext.stages.database import ObsDatabase

__all__ = ["build_pruned_model", "build_magnitude_model"]


def _shrink(dense: nn.Module, widths: dict[str, int], apply) -> nn.Module:
    """A copy of `dense` where `apply(model, adapter, layer, count)` prunes every layer below full width."""
    model = copy.deepcopy(dense).eval()
    adapter = get_adapter(model)
    for layer in adapter.prunable_layers(model):
        current = adapter.current_count(model, layer)
        count = widths.get(layer.name, current)
        if count > current:
            raise ValueError(f"{layer.name}: cannot keep {count} structures, the model has {current}")
        if count != current:
            apply(model, adapter, replace(layer, num_structures=current), count)
    return model


def build_pruned_model(dense: nn.Module, db: ObsDatabase, widths: dict[str, int]) -> nn.Module:
    """A physically smaller copy of `dense` with the OBS-updated weights of each chosen width."""
    def apply(model, adapter, layer, count):
        adapter.set_weight(model, layer, db.weights(layer.name, count))
        adapter.slice(model, layer, db[layer.name].kept(count))

    return _shrink(dense, widths, apply)


def build_magnitude_model(dense: nn.Module, widths: dict[str, int]) -> nn.Module:
    """Baseline: keep the structures whose out-projection columns have the largest L2 norm, no update."""
    def apply(model, adapter, layer, count):
        W = adapter.get_weight(model, layer).float()
        norms = W.reshape(W.shape[0], layer.num_structures, layer.group_size).pow(2).sum(dim=(0, 2))
        adapter.slice(model, layer, sorted(torch.topk(norms, count).indices.tolist()) if count else [])

    return _shrink(dense, widths, apply)
