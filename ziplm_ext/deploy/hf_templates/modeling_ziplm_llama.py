"""A ZipLM-pruned LLaMA-family decoder: transformers' LLaMA classes, with every block built at its own width.

ZipLM (Kurtic et al. 2023) removes whole key/value groups (a KV head with its query heads), MLP neurons
and, at high compression, whole attention or MLP modules.  Each block is transformers' own
``LlamaDecoderLayer`` (same forward), whose ``LlamaAttention`` / ``LlamaMLP`` are built from the block's
widths in ``config.json``; a removed module is a ``RemovedBranch`` (the residual stream passes through).
Cached generation uses transformers' ``DynamicCache``: a removed attention keeps the cache length right.
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_ziplm_llama import ZipLMLlamaConfig
from .ziplm_common import RemovedBranch, WidthView


class ZipLMLlamaDecoderLayer(LlamaDecoderLayer):
    """``LlamaDecoderLayer`` with this block's head counts and MLP width (``0``: removed)."""

    def __init__(self, config: ZipLMLlamaConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)  # LlamaDecoderLayer.__init__ would build dense widths
        n_q, n_kv, n_ffn = config.layer_widths(layer_idx)
        self.hidden_size = config.hidden_size
        if n_kv:
            self.self_attn = LlamaAttention(WidthView(config, num_attention_heads=n_q, num_key_value_heads=n_kv),
                                            layer_idx)
            self.self_attn.config = config  # the live config: attention implementation chosen at load time
        else:
            self.self_attn = RemovedBranch(config.hidden_size, config.attention_bias, returns_tuple=True,
                                           layer_idx=layer_idx)
        if n_ffn:
            self.mlp = LlamaMLP(WidthView(config, intermediate_size=n_ffn))
            self.mlp.config = config
        else:
            self.mlp = RemovedBranch(config.hidden_size, config.mlp_bias)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class ZipLMLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = ZipLMLlamaConfig
    config: ZipLMLlamaConfig
    _no_split_modules = ["ZipLMLlamaDecoderLayer"]


class ZipLMLlamaModel(ZipLMLlamaPreTrainedModel, LlamaModel):
    """``LlamaModel`` (same forward) whose blocks are ``ZipLMLlamaDecoderLayer``."""

    def __init__(self, config: ZipLMLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([ZipLMLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class ZipLMLlamaForCausalLM(ZipLMLlamaPreTrainedModel, LlamaForCausalLM):
    """``LlamaForCausalLM`` (same forward, ``generate``) over a ``ZipLMLlamaModel``."""

    def __init__(self, config: ZipLMLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = ZipLMLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["ZipLMLlamaForCausalLM", "ZipLMLlamaModel", "ZipLMLlamaPreTrainedModel"]
