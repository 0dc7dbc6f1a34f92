"""Configuration of a ZipLM-pruned GPT-2 with per-block widths.

``n_head`` / ``n_inner`` describe the dense model (the head size stays ``n_embd / n_head``);
``num_attention_heads_per_layer`` and ``intermediate_size_per_layer`` give every block's kept heads and MLP
width (``0``: the attention / MLP was removed).
"""

from __future__ import annotations

from transformers import GPT2Config

from .ziplm_common import per_layer


class ZipLMGPT2Config(GPT2Config):
    model_type = "ziplm_gpt2"

    num_attention_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.add_cross_attention:
            raise ValueError("ZipLM GPT-2 checkpoints have no cross-attention (add_cross_attention must be false)")
        self.layer_widths(0)  # validates every list

    def layer_widths(self, layer_idx: int) -> tuple[int, int]:
        """``(heads, MLP width)`` of block ``layer_idx``."""
        dense_ffn = self.n_inner if self.n_inner is not None else 4 * self.n_embd
        return (per_layer(self, "num_attention_heads_per_layer", self.n_head)[layer_idx],
                per_layer(self, "intermediate_size_per_layer", dense_ffn)[layer_idx])
