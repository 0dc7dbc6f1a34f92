"""The grid of candidate widths of each prunable layer: the kept structure counts that the OBS
database stores, the latency table times and the search chooses from (ZipLM paper: every layer is
pruned to one of a set of candidate levels; attention heads at every count, FFN widths on a grid).

* attention: every kept count ``0, 1, ..., n`` (n = heads or KV groups);
* FFN: a geometric grid :func:`ffn_grid` of kept widths, plus the full width and ``0`` (removed).

The grid is sorted ascending; ``0`` (the module removed) and the full width are always in it.
"""
from __future__ import annotations

from ziplm_ext.adapters import get_adapter
from ziplm_ext.adapters.base import PrunableLayer

__all__ = ["ffn_grid", "layer_grid", "model_grid"]


def ffn_grid(d_ff: int, ratio: float = 0.9, min_frac: float = 0.01, multiple: int = 1) -> list[int]:
    """Geometric grid of kept FFN widths: ``round(d_ff * ratio**i)`` for every ``i`` with
    ``ratio**i >= min_frac``, plus the full width ``d_ff`` and ``0`` (removed).

    With ``multiple > 1`` the non-zero widths are rounded to the nearest multiple of
    ``multiple`` (at least ``multiple``); the full width is always kept as is.
    Returns sorted, unique kept counts.
    """
    d_ff, multiple = int(d_ff), int(multiple)
    if d_ff < 1:
        raise ValueError(f"d_ff must be >= 1, got {d_ff}")
    if not (0 < ratio < 1):
        raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
    if not (0 < min_frac <= 1):
        raise ValueError(f"min_frac must lie in (0, 1], got {min_frac}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    out = {0, d_ff}
    frac = 1.0
    while frac >= min_frac * (1 - 1e-12):
        k = d_ff * frac
        k = max(multiple, int(round(k / multiple)) * multiple) if multiple > 1 else max(1, int(round(k)))
        out.add(min(k, d_ff))
        frac *= ratio
    return sorted(out)


def layer_grid(layer: PrunableLayer, *, ffn_multiple: int = 1, ffn_ratio: float = 0.9,
               ffn_min_frac: float = 0.01) -> list[int]:
    """The candidate widths of `layer` (at its ``num_structures``): every head / KV-group count for
    attention, :func:`ffn_grid` for the FFN (widths rounded to `ffn_multiple`). Sorted ascending."""
    if layer.kind == "attn":
        return list(range(layer.num_structures + 1))
    return ffn_grid(layer.num_structures, ratio=ffn_ratio, min_frac=ffn_min_frac, multiple=ffn_multiple)


def model_grid(model, ffn_multiple: int = 1) -> dict[str, list[int]]:
    """Layer name -> :func:`layer_grid` for every prunable layer of `model` (at its dense widths)."""
    return {layer.name: layer_grid(layer, ffn_multiple=ffn_multiple)
            for layer in get_adapter(model).prunable_layers(model)}
