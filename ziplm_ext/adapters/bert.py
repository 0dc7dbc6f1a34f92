"""Adapter for BERT encoders (``BertModel`` and every ``BertFor*`` head model).

Layout per block (``model.base_model.encoder.layer[i]``)::

    attention.self.{query,key,value}   -> rows sliced per head (head_dim rows each)
    attention.output.dense             -> out projection, columns sliced per head
    attention.output.LayerNorm         -> LN(residual + dense(ctx))      (post-LN)
    intermediate.dense                 -> rows sliced per neuron
    output.dense                       -> FFN out projection, columns sliced per neuron
    output.LayerNorm                   -> LN(residual + dense(act))      (post-LN)

The HF self-attention module reshapes with ``-1`` heads of ``attention_head_size``; the
adapter also updates ``num_attention_heads`` / ``all_head_size`` so that the module stays
self-consistent.

Removed modules (post-LayerNorm choice): BERT applies the LayerNorm *after* the residual
addition, so a fully pruned sub-layer cannot simply vanish.  With all head (or neuron)
weights zeroed the dense model computes ``LayerNorm(input + out_bias)``: the context /
activations contribute nothing while the dense bias and the LayerNorm remain.  The
removed attention (or FFN) is therefore replaced by :class:`BiasLayerNorm`, which computes
exactly that (one broadcast add and one LayerNorm, no matmul).  The removed attention keeps
the parameter names ``attention.output.bias`` and ``attention.output.LayerNorm.*``; the
removed FFN ``output.bias`` and ``output.LayerNorm.*`` (``intermediate`` becomes a
parameter-free pass-through).

Cross-attention modules of BERT decoders (``add_cross_attention``) are not pruned.
"""

from __future__ import annotations

import copy

from torch import nn

from ziplm_ext.adapters.base import Adapter, RemovedModule, expand_groups, find_kv_cache, slice_inputs, slice_outputs, touch_kv_cache


class BiasLayerNorm(RemovedModule):
    """``LayerNorm(input_tensor + dropout(bias))`` -- a post-LN sub-layer whose weights are all zero."""

    def __init__(self, dense: nn.Linear, layer_norm: nn.LayerNorm, dropout: nn.Dropout):
        super().__init__()
        self.out_features = int(dense.out_features)
        self.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=dense.bias.requires_grad)
        self.LayerNorm = layer_norm
        self.dropout = dropout

    def forward(self, hidden_states, input_tensor):  # hidden_states is ignored
        return self.LayerNorm(input_tensor + self.dropout(self.bias.to(input_tensor.dtype)))

    def extra_repr(self) -> str:
        return self._extra_repr_base()


class _RemovedBertAttention(nn.Module):
    """Stands in for ``BertAttention``: returns ``(LayerNorm(x + bias), None)``."""

    def __init__(self, output: BiasLayerNorm, layer_idx: int | None):
        super().__init__()
        self.output = output
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        # the cache arrives as ``cache=`` or ``past_key_values=`` depending on the transformers release
        touch_kv_cache(find_kv_cache(args, kwargs), self.layer_idx, hidden_states)
        return self.output(None, hidden_states), None


class _PassThrough(nn.Module):
    """Stands in for ``BertIntermediate`` of a removed FFN (its result is ignored)."""

    def forward(self, hidden_states):
        return hidden_states


class BertAdapter(Adapter):
    family = "bert"

    @staticmethod
    def matches(model) -> bool:
        cfg = getattr(model, "config", None)
        if getattr(cfg, "model_type", None) != "bert":
            return False
        base = getattr(model, "base_model", None)
        return hasattr(getattr(base, "encoder", None), "layer")

    def blocks(self, model):
        return list(model.base_model.encoder.layer)

    def _dense_counts(self, config):
        nh = config.num_attention_heads
        return nh, config.hidden_size // nh, config.intermediate_size

    def _out_proj_of(self, block, kind):
        if kind == "attn":
            out = block.attention.output
        else:
            out = block.output
        return out if isinstance(out, RemovedModule) else out.dense

    def _slice_attn(self, model, block, keep, group_size):
        sa = block.attention.self
        hd = sa.attention_head_size
        assert hd == group_size
        rows = expand_groups(keep, hd)
        for lin in (sa.query, sa.key, sa.value):
            slice_outputs(lin, rows)
        slice_inputs(block.attention.output.dense, rows)
        sa.num_attention_heads = len(keep)
        sa.all_head_size = len(keep) * hd

    def _slice_ffn(self, model, block, keep):
        slice_outputs(block.intermediate.dense, keep)
        slice_inputs(block.output.dense, keep)

    def _remove_attn(self, model, block, block_idx):
        out = block.attention.output
        repl = BiasLayerNorm(out.dense, out.LayerNorm, out.dropout)
        block.attention = _RemovedBertAttention(repl, getattr(block.attention.self, "layer_idx", block_idx))

    def _remove_ffn(self, model, block, block_idx):
        out = block.output
        block.output = BiasLayerNorm(out.dense, out.LayerNorm, out.dropout)
        block.intermediate = _PassThrough()

    def hf_config_for_shapes(self, config, shapes):
        """BERT derives the head size as ``hidden_size // num_attention_heads``, so a config can
        express fewer heads only by changing the head size: attention pruning (any block) is
        not HF-loadable.  Uniform FFN widths are expressed by ``intermediate_size``."""
        n_attn, _, _ = self._dense_counts(config)
        attn = {v for k, v in shapes.items() if k.endswith(".attn")}
        ffn = {v for k, v in shapes.items() if k.endswith(".ffn")}
        if attn != {n_attn}:
            return None, "BERT configs cannot express pruned attention heads (head size = hidden_size / num_attention_heads)"
        if len(ffn) != 1 or 0 in ffn:
            return None, "FFN widths are not uniform across blocks or an FFN module was removed"
        d = copy.deepcopy(config.to_dict())
        d["intermediate_size"] = ffn.pop()
        return d, ""
