"""Adapter for GPT-2 (``GPT2Model``, ``GPT2LMHeadModel`` and other GPT-2 head models).

GPT-2 uses HF ``Conv1D`` layers: ``weight`` has shape ``(in, out)`` and ``y = x W + b``.
Layout per block (``model.base_model.h[i]``)::

    attn.c_attn   fused QKV, (d, 3*d_cur): head h of q/k/v is columns
                  [h*hd:(h+1)*hd] + {0, d_cur, 2*d_cur}   (d_cur = current heads * hd)
    attn.c_proj   out projection, (d_cur, d): rows sliced per head
    mlp.c_fc      (d, ffn): columns sliced per neuron
    mlp.c_proj    FFN out projection, (ffn, d): rows sliced per neuron

``GPT2Attention.forward`` splits the fused QKV output with ``split_size`` and reshapes
with ``-1`` heads of ``head_dim``; the adapter updates ``split_size`` and ``num_heads``.
(``embed_dim`` is the residual width and stays.)

Removed modules: GPT-2 is pre-LN, so a sub-block only adds its output to the residual
stream.  With all weights zeroed it contributes exactly its ``c_proj`` bias; a removed
attention / MLP is replaced by :class:`~ziplm_ext.adapters.base.ConstantOutput` that
returns the bias broadcast (attention: ``(bias, None)`` tuple, and it keeps a KV cache's
length consistent).  Its parameter is named ``attn.bias`` / ``mlp.bias``.

Cross-attention modules (``add_cross_attention``) are not pruned.
"""

from __future__ import annotations

import copy

from ziplm_ext.adapters.base import Adapter, ConstantOutput, RemovedModule, expand_groups, slice_inputs, slice_outputs


class GPT2Adapter(Adapter):
    family = "gpt2"

    @staticmethod
    def matches(model) -> bool:
        cfg = getattr(model, "config", None)
        if getattr(cfg, "model_type", None) != "gpt2":
            return False
        return hasattr(getattr(model, "base_model", None), "h")

    def blocks(self, model):
        return list(model.base_model.h)

    def _dense_counts(self, config):
        nh = config.n_head
        d = config.n_embd
        inner = config.n_inner if config.n_inner is not None else 4 * d
        return nh, d // nh, inner

    def _out_proj_of(self, block, kind):
        mod = block.attn if kind == "attn" else block.mlp
        return mod if isinstance(mod, RemovedModule) else mod.c_proj

    def _slice_attn(self, model, block, keep, group_size):
        attn = block.attn
        hd = attn.head_dim
        assert hd == group_size
        d_cur = attn.split_size
        cols = expand_groups(keep, hd)
        qkv_cols = cols + [c + d_cur for c in cols] + [c + 2 * d_cur for c in cols]
        slice_outputs(attn.c_attn, qkv_cols)
        slice_inputs(attn.c_proj, cols)
        attn.num_heads = len(keep)
        attn.split_size = len(keep) * hd

    def _slice_ffn(self, model, block, keep):
        slice_outputs(block.mlp.c_fc, keep)
        slice_inputs(block.mlp.c_proj, keep)

    def _remove_attn(self, model, block, block_idx):
        attn = block.attn
        block.attn = ConstantOutput(
            attn.c_proj.nf,
            attn.c_proj.bias,
            dropout=attn.resid_dropout.p,
            returns_tuple=True,
            touches_cache=True,
            layer_idx=attn.layer_idx if attn.layer_idx is not None else block_idx,
        )

    def _remove_ffn(self, model, block, block_idx):
        mlp = block.mlp
        block.mlp = ConstantOutput(mlp.c_proj.nf, mlp.c_proj.bias, dropout=mlp.dropout.p)

    def hf_config_for_shapes(self, config, shapes):
        """GPT-2 derives ``head_dim = n_embd // n_head``; fewer heads cannot be expressed without
        changing the head size, so attention pruning is not HF-loadable.  Uniform MLP widths
        are expressed by ``n_inner``."""
        n_attn, _, _ = self._dense_counts(config)
        attn = {v for k, v in shapes.items() if k.endswith(".attn")}
        ffn = {v for k, v in shapes.items() if k.endswith(".ffn")}
        if attn != {n_attn}:
            return None, "GPT-2 configs cannot express pruned attention heads (head_dim = n_embd / n_head)"
        if len(ffn) != 1 or 0 in ffn:
            return None, "MLP widths are not uniform across blocks or an MLP module was removed"
        d = copy.deepcopy(config.to_dict())
        d["n_inner"] = ffn.pop()
        return d, ""
