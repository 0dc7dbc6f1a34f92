"""Adapter for LLaMA-layout decoders (``LlamaModel`` / ``LlamaForCausalLM``; also Mistral and Qwen2).

Layout per block (``model.base_model.layers[i]``)::

    self_attn.{q,k,v}_proj   rows sliced per KV group
    self_attn.o_proj         out projection, columns sliced per KV group
    mlp.{gate,up}_proj       rows sliced per neuron
    mlp.down_proj            FFN out projection, columns sliced per neuron

Attention structure = one key/value group.  With grouped-query attention (GQA) every KV
head ``j`` is shared by the ``n_rep = num_heads / num_kv_heads`` consecutive query heads
``j*n_rep ... (j+1)*n_rep-1`` (that is what ``repeat_kv`` does).  A structure is therefore
the k and v head ``j`` together with all its ``n_rep`` query heads, and its
``group_size = n_rep * head_dim`` consecutive input columns of ``o_proj``.  Removing whole
groups keeps ``repeat_kv`` valid without touching ``num_key_value_groups`` (every remaining
KV head still serves exactly ``n_rep`` query heads).  Removing individual query heads would
leave groups with different numbers of query heads, which ``repeat_kv`` (one ``n_rep`` per
module) cannot express; it would need equal q-head counts per group.  Without GQA
(``num_kv_heads == num_heads``) a structure is a single head.

``LlamaAttention`` reshapes with ``-1`` heads of ``head_dim`` and keeps no head counts;
count attributes that some variants keep (``num_heads``, ``num_key_value_heads``, ...) are
updated when present.

Removed modules: LLaMA is pre-norm, so a removed attention / MLP contributes exactly its
out-projection bias -- zeros for LLaMA, which has no bias (``attention_bias`` /
``mlp_bias`` false).  It is replaced by :class:`~ziplm_ext.adapters.base.ConstantOutput`
(attention: ``(zeros, None)`` tuple; the KV cache length is kept consistent).

Limitations: static / pre-allocated KV caches (``StaticCache``) size every layer from the
config and therefore do not work with pruned attention; the default ``DynamicCache`` does.
"""

from __future__ import annotations

import copy

from ziplm_ext.adapters.base import Adapter, ConstantOutput, RemovedModule, expand_groups, slice_inputs, slice_outputs

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _num_kv(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


class LlamaAdapter(Adapter):
    family = "llama"

    @staticmethod
    def matches(model) -> bool:
        cfg = getattr(model, "config", None)
        if getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            return False
        layers = getattr(getattr(model, "base_model", None), "layers", None)
        if not layers:
            return False
        for blk in layers:  # every block: LLaMA layout, or a module removed by this adapter
            attn, mlp = getattr(blk, "self_attn", None), getattr(blk, "mlp", None)
            if not isinstance(attn, RemovedModule) and not all(
                hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
            ):
                return False
            if not isinstance(mlp, RemovedModule) and not all(
                hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")
            ):
                return False
        return True

    def blocks(self, model):
        return list(model.base_model.layers)

    def _dense_counts(self, config):
        nh, nkv, hd = config.num_attention_heads, _num_kv(config), _head_dim(config)
        if nh % nkv:
            raise ValueError(f"num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
        return nkv, (nh // nkv) * hd, config.intermediate_size

    def _out_proj_of(self, block, kind):
        mod = block.self_attn if kind == "attn" else block.mlp
        if isinstance(mod, RemovedModule):
            return mod
        return mod.o_proj if kind == "attn" else mod.down_proj

    def _slice_attn(self, model, block, keep, group_size):
        attn = block.self_attn
        hd = attn.head_dim
        n_rep = attn.num_key_value_groups
        assert n_rep * hd == group_size
        q_cols = expand_groups(keep, n_rep * hd)
        kv_rows = expand_groups(keep, hd)
        slice_outputs(attn.q_proj, q_cols)
        slice_outputs(attn.k_proj, kv_rows)
        slice_outputs(attn.v_proj, kv_rows)
        slice_inputs(attn.o_proj, q_cols)
        for name, value in (
            ("num_heads", len(keep) * n_rep),
            ("num_attention_heads", len(keep) * n_rep),
            ("num_key_value_heads", len(keep)),
            ("num_kv_heads", len(keep)),
        ):
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, value)

    def _slice_ffn(self, model, block, keep):
        slice_outputs(block.mlp.gate_proj, keep)
        slice_outputs(block.mlp.up_proj, keep)
        slice_inputs(block.mlp.down_proj, keep)

    def _remove_attn(self, model, block, block_idx):
        attn = block.self_attn
        block.self_attn = ConstantOutput(
            attn.o_proj.out_features,
            attn.o_proj.bias,
            returns_tuple=True,
            touches_cache=True,
            layer_idx=getattr(attn, "layer_idx", block_idx),
        )

    def _remove_ffn(self, model, block, block_idx):
        mlp = block.mlp
        block.mlp = ConstantOutput(mlp.down_proj.out_features, mlp.down_proj.bias)

    def hf_config_for_shapes(self, config, shapes):
        """Uniform widths are expressed with ``num_key_value_heads = kept groups``,
        ``num_attention_heads = kept groups * n_rep``, an explicit ``head_dim`` (so the head
        size does not change) and ``intermediate_size``.  Non-uniform widths or removed
        modules cannot be expressed by the HF config."""
        nkv, gsize, _ = self._dense_counts(config)
        hd = _head_dim(config)
        n_rep = gsize // hd
        attn = {v for k, v in shapes.items() if k.endswith(".attn")}
        ffn = {v for k, v in shapes.items() if k.endswith(".ffn")}
        if len(attn) != 1 or 0 in attn:
            return None, "attention widths are not uniform across blocks or an attention module was removed"
        if len(ffn) != 1 or 0 in ffn:
            return None, "MLP widths are not uniform across blocks or an MLP module was removed"
        k = attn.pop()
        d = copy.deepcopy(config.to_dict())
        d["num_key_value_heads"] = k
        d["num_attention_heads"] = k * n_rep
        d["head_dim"] = hd
        d["intermediate_size"] = ffn.pop()
        return d, ""
