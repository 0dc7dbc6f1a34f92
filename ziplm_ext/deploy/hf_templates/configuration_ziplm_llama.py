"""Configuration of a ZipLM-pruned LLaMA-family decoder with per-block widths.

``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` and ``intermediate_size`` describe the dense
model; ``num_attention_heads_per_layer``, ``num_key_value_heads_per_layer`` and
``intermediate_size_per_layer`` give every block's kept widths (``0``: the attention / MLP was removed).
ZipLM prunes whole key/value groups, so a block keeps ``num_attention_heads / num_key_value_heads`` query
heads per KV head.
"""

from __future__ import annotations

from transformers import LlamaConfig

from .ziplm_common import per_layer


class ZipLMLlamaConfig(LlamaConfig):
    model_type = "ziplm_llama"

    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.layer_widths(0)  # validates every list
        n_rep = self.num_attention_heads // self.num_key_value_heads
        for i, (q, kv) in enumerate(zip(per_layer(self, "num_attention_heads_per_layer", self.num_attention_heads),
                                        per_layer(self, "num_key_value_heads_per_layer", self.num_key_value_heads))):
            if q != kv * n_rep:
                raise ValueError(f"block {i}: {q} query heads for {kv} KV heads; ZipLM keeps {n_rep} per KV head")

    def layer_widths(self, layer_idx: int) -> tuple[int, int, int]:
        """``(query heads, KV heads, MLP width)`` of block ``layer_idx``."""
        return (per_layer(self, "num_attention_heads_per_layer", self.num_attention_heads)[layer_idx],
                per_layer(self, "num_key_value_heads_per_layer", self.num_key_value_heads)[layer_idx],
                per_layer(self, "intermediate_size_per_layer", self.intermediate_size)[layer_idx])
