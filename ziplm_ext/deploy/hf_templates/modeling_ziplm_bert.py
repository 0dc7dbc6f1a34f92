"""A ZipLM-pruned BERT encoder: transformers' BERT classes, with every block built at its own width.

ZipLM (Kurtic et al. 2023) removes attention heads, FFN neurons and whole attention / FFN modules.  Each
block is transformers' own ``BertLayer`` (same forward) with attention of the block's head count (head size
unchanged) and an FFN of its width.  BERT normalises *after* the residual addition, so a removed sub-layer
does not vanish: with all its weights zero the dense block computes ``LayerNorm(x + bias)``, which is what
``BiasLayerNorm`` computes (no matmul).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertModel, BertPreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertEmbeddings,
    BertEncoder,
    BertIntermediate,
    BertLayer,
    BertOutput,
    BertPooler,
    BertSelfAttention,
    BertSelfOutput,
)

from .configuration_ziplm_bert import ZipLMBertConfig
from .ziplm_common import WidthView, touch_cache


class ZipLMBertSelfAttention(BertSelfAttention):
    """``BertSelfAttention`` (same forward) with ``num_heads`` heads of the dense head size."""

    def __init__(self, config: ZipLMBertConfig, layer_idx: int, num_heads: int):
        # BERT derives the head size from the head count, so build the dense module on the meta device
        # (no memory: all its parameters are the projections replaced below) and narrow it.
        with torch.device("meta"):
            super().__init__(config, is_causal=config.is_decoder, layer_idx=layer_idx)
        width = num_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, width)
        self.key = nn.Linear(config.hidden_size, width)
        self.value = nn.Linear(config.hidden_size, width)
        self.num_attention_heads, self.all_head_size = num_heads, width


class ZipLMBertSelfOutput(BertSelfOutput):
    """``BertSelfOutput`` (same forward) reading ``width`` attention features."""

    def __init__(self, config: ZipLMBertConfig, width: int):
        nn.Module.__init__(self)  # BertSelfOutput.__init__ would build a dense-width projection
        self.dense = nn.Linear(width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class ZipLMBertAttention(BertAttention):
    """``BertAttention`` (same forward) with ``num_heads`` heads."""

    def __init__(self, config: ZipLMBertConfig, layer_idx: int, num_heads: int):
        nn.Module.__init__(self)
        self.is_cross_attention = False
        self.self = ZipLMBertSelfAttention(config, layer_idx, num_heads)
        self.output = ZipLMBertSelfOutput(config, self.self.all_head_size)


class BiasLayerNorm(nn.Module):
    """``LayerNorm(input_tensor + dropout(bias))``: a post-LN sub-layer whose weights are all zero."""

    def __init__(self, config: ZipLMBertConfig):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(config.hidden_size))
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):  # hidden_states: the removed sub-layer's input, unused
        return self.LayerNorm(input_tensor + self.dropout(self.bias.to(input_tensor.dtype)))


class RemovedBertAttention(nn.Module):
    """Stands in for a removed ``BertAttention``: returns ``(LayerNorm(x + bias), None)``."""

    def __init__(self, config: ZipLMBertConfig, layer_idx: int):
        super().__init__()
        self.output = BiasLayerNorm(config)
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        touch_cache(args, kwargs, self.layer_idx, hidden_states)
        return self.output(None, hidden_states), None


class PassThrough(nn.Module):
    """Stands in for the ``BertIntermediate`` of a removed FFN (``BiasLayerNorm`` ignores its result)."""

    def forward(self, hidden_states):
        return hidden_states


class ZipLMBertLayer(BertLayer):
    """``BertLayer`` with this block's head count and FFN width (``0``: removed)."""

    def __init__(self, config: ZipLMBertConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)  # BertLayer.__init__ would build dense widths
        n_head, n_ffn = config.layer_widths(layer_idx)
        self.chunk_size_feed_forward = config.chunk_size_feed_forward
        self.seq_len_dim = 1
        self.is_decoder = config.is_decoder
        self.add_cross_attention = False
        if n_head:
            self.attention = ZipLMBertAttention(config, layer_idx, n_head)
        else:
            self.attention = RemovedBertAttention(config, layer_idx)
        if n_ffn:
            view = WidthView(config, intermediate_size=n_ffn)
            self.intermediate, self.output = BertIntermediate(view), BertOutput(view)
        else:
            self.intermediate, self.output = PassThrough(), BiasLayerNorm(config)


class ZipLMBertEncoder(BertEncoder):
    """``BertEncoder`` (same forward) whose blocks are ``ZipLMBertLayer``."""

    def __init__(self, config: ZipLMBertConfig):
        nn.Module.__init__(self)
        self.config = config
        self.layer = nn.ModuleList([ZipLMBertLayer(config, layer_idx=i) for i in range(config.num_hidden_layers)])


class ZipLMBertPreTrainedModel(BertPreTrainedModel):
    config_class = ZipLMBertConfig
    config: ZipLMBertConfig


class ZipLMBertModel(ZipLMBertPreTrainedModel, BertModel):
    """``BertModel`` (same forward) over a ``ZipLMBertEncoder``; the pooler as ``config.add_pooling_layer``."""

    _no_split_modules = ["BertEmbeddings", "ZipLMBertLayer"]

    def __init__(self, config: ZipLMBertConfig, add_pooling_layer: bool | None = None):
        BertPreTrainedModel.__init__(self, config)
        self.config = config
        self.gradient_checkpointing = False
        self.embeddings = BertEmbeddings(config)
        self.encoder = ZipLMBertEncoder(config)
        pool = config.add_pooling_layer if add_pooling_layer is None else add_pooling_layer
        self.pooler = BertPooler(config) if pool else None
        self.post_init()


__all__ = ["ZipLMBertModel", "ZipLMBertPreTrainedModel"]
