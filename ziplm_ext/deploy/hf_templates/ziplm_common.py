"""Pieces shared by the ZipLM modelling files of this directory.

Written by ziplm_ext's ``hf`` export (ZipLM, Kurtic et al. 2023: structured pruning that removes attention
heads / KV groups, FFN neurons and whole attention or FFN modules, with a different width in every block).
Imports only torch and transformers, so the directory loads without ziplm_ext.

Per-layer widths live in ``config.json`` as lists with one entry per block (``0``: module removed), next to
the dense scalars (``num_attention_heads``, ``intermediate_size``, ...), which keep describing the head size
and the dense model, as in heterogeneous checkpoints such as DeciLM / Nemotron-NAS (``block_configs``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache


def per_layer(config, name: str, dense: int) -> list[int]:
    """The per-layer list ``config.<name>`` (``dense`` in every block when it is absent), validated."""
    values = getattr(config, name, None)
    n = config.num_hidden_layers
    if values is None:
        return [int(dense)] * n
    ok = isinstance(values, (list, tuple)) and len(values) == n
    if not ok or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= dense for v in values):
        raise ValueError(f"config.{name} must list one int in [0, {dense}] per block ({n} blocks), got {values!r}")
    return list(values)


class WidthView:
    """The model config seen with one block's widths: HF module constructors read their sizes from it."""

    def __init__(self, config, **widths):
        self.__dict__.update(widths)
        self._config = config

    def __getattr__(self, name):
        return getattr(self.__dict__["_config"], name)


def touch_cache(args, kwargs, layer_idx: int, hidden_states: torch.Tensor) -> None:
    """Append one zero scalar per token to block ``layer_idx`` of the KV cache passed to the call.

    HF caches derive the number of processed tokens (position ids, mask sizes) from one block's stored
    keys; a removed attention stores none, so it stores a ``(batch, 1, seq, 1)`` placeholder instead.
    The cache is found by type, whatever keyword (``cache``, ``past_key_values``) the caller used.
    """
    cache = next((v for v in (*kwargs.values(), *args) if isinstance(v, Cache)), None)
    if cache is None:
        return
    cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache: its self-attention part
    dummy = hidden_states.new_zeros((hidden_states.shape[0], 1, hidden_states.shape[1], 1))
    cache.update(dummy, dummy, layer_idx)


class RemovedBranch(nn.Module):
    """A removed attention or FFN of a pre-norm block (LLaMA, GPT-2): the residual stream passes through.

    With every structure pruned, the branch adds exactly its output projection's bias (LLaMA has none,
    so nothing) to the residual stream; this module returns that constant, broadcast without a copy.

    Args:
        out_features: the hidden size.
        has_bias: the removed output projection had a bias (kept as the parameter ``bias``).
        dropout: dropout on the output in training mode, as the dense branch had.
        returns_tuple: return ``(output, None)`` like HF attention modules.
        layer_idx: block index of a removed attention, which keeps the KV cache length (see ``touch_cache``).
    """

    def __init__(self, out_features: int, has_bias: bool, *, dropout: float = 0.0, returns_tuple: bool = False,
                 layer_idx: int | None = None):
        super().__init__()
        self.out_features = int(out_features)
        if has_bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features))
        else:
            self.register_parameter("bias", None)
        self.dropout = nn.Dropout(dropout)
        self.returns_tuple = returns_tuple
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        if self.layer_idx is not None:
            touch_cache(args, kwargs, self.layer_idx, hidden_states)
        shape = (*hidden_states.shape[:-1], self.out_features)
        if self.bias is not None:
            out = self.bias.to(hidden_states.dtype).expand(shape)
        else:
            out = hidden_states.new_zeros(()).expand(shape)
        out = self.dropout(out)
        return (out, None) if self.returns_tuple else out

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, bias={self.bias is not None}, removed=True"
