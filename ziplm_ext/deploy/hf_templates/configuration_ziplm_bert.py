"""Configuration of a ZipLM-pruned BERT encoder with per-block widths.

``num_attention_heads`` / ``intermediate_size`` describe the dense model (the head size stays
``hidden_size / num_attention_heads``); ``num_attention_heads_per_layer`` and ``intermediate_size_per_layer``
give every block's kept heads and FFN width (``0``: the attention / FFN was removed).
``add_pooling_layer`` says whether the checkpoint has BERT's pooler.
"""

from __future__ import annotations

from transformers import BertConfig

from .ziplm_common import per_layer


class ZipLMBertConfig(BertConfig):
    model_type = "ziplm_bert"

    num_attention_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None
    add_pooling_layer: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.add_cross_attention:
            raise ValueError("ZipLM BERT checkpoints have no cross-attention (add_cross_attention must be false)")
        self.layer_widths(0)  # validates every list

    def layer_widths(self, layer_idx: int) -> tuple[int, int]:
        """``(heads, FFN width)`` of block ``layer_idx``."""
        return (per_layer(self, "num_attention_heads_per_layer", self.num_attention_heads)[layer_idx],
                per_layer(self, "intermediate_size_per_layer", self.intermediate_size)[layer_idx])
