"""A ZipLM-pruned GPT-2: transformers' GPT-2 classes, with every block built at its own width.

ZipLM (Kurtic et al. 2023) removes attention heads, MLP neurons and whole attention / MLP modules.  Each
block is transformers' own ``GPT2Block`` (same forward) with a ``GPT2Attention`` of the block's head count
(head size unchanged) and a ``GPT2MLP`` of its width; a removed module is a ``RemovedBranch``, which adds
exactly the removed output projection's bias to the residual stream.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2LMHeadModel, GPT2Model, GPT2PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block, GPT2MLP
from transformers.pytorch_utils import Conv1D

from .configuration_ziplm_gpt2 import ZipLMGPT2Config
from .ziplm_common import RemovedBranch


class ZipLMGPT2Attention(GPT2Attention):
    """``GPT2Attention`` (same forward) with ``num_heads`` heads of the dense head size."""

    def __init__(self, config: ZipLMGPT2Config, layer_idx: int, num_heads: int):
        # GPT-2 derives the head size from the head count, so build the dense module on the meta device
        # (no memory: all its parameters are the two projections replaced below) and narrow it.
        with torch.device("meta"):
            super().__init__(config, layer_idx=layer_idx)
        width = num_heads * self.head_dim
        self.c_attn = Conv1D(3 * width, self.embed_dim)  # fused [q | k | v], each `width` wide
        self.c_proj = Conv1D(self.embed_dim, width)
        self.num_heads, self.split_size = num_heads, width


class ZipLMGPT2Block(GPT2Block):
    """``GPT2Block`` with this block's head count and MLP width (``0``: removed)."""

    def __init__(self, config: ZipLMGPT2Config, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)  # GPT2Block.__init__ would build dense widths
        n_head, n_ffn = config.layer_widths(layer_idx)
        d = config.hidden_size
        self.ln_1 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        if n_head:
            self.attn = ZipLMGPT2Attention(config, layer_idx, n_head)
        else:
            self.attn = RemovedBranch(d, True, dropout=config.resid_pdrop, returns_tuple=True, layer_idx=layer_idx)
        self.ln_2 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(n_ffn, config) if n_ffn else RemovedBranch(d, True, dropout=config.resid_pdrop)


class ZipLMGPT2PreTrainedModel(GPT2PreTrainedModel):
    config_class = ZipLMGPT2Config
    config: ZipLMGPT2Config
    _no_split_modules = ["ZipLMGPT2Block"]


class ZipLMGPT2Model(ZipLMGPT2PreTrainedModel, GPT2Model):
    """``GPT2Model`` (same forward) whose blocks are ``ZipLMGPT2Block``."""

    def __init__(self, config: ZipLMGPT2Config):
        GPT2PreTrainedModel.__init__(self, config)
        self.embed_dim = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, self.embed_dim)
        self.wpe = nn.Embedding(config.max_position_embeddings, self.embed_dim)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([ZipLMGPT2Block(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self._attn_implementation = config._attn_implementation
        self.post_init()


class ZipLMGPT2LMHeadModel(ZipLMGPT2PreTrainedModel, GPT2LMHeadModel):
    """``GPT2LMHeadModel`` (same forward, ``generate``) over a ``ZipLMGPT2Model``."""

    def __init__(self, config: ZipLMGPT2Config):
        GPT2PreTrainedModel.__init__(self, config)
        self.transformer = ZipLMGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["ZipLMGPT2LMHeadModel", "ZipLMGPT2Model", "ZipLMGPT2PreTrainedModel"]
