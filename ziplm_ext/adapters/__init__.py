"""Architecture adapters: all per-family knowledge of ZipLM pruning lives here.

``get_adapter(model)`` returns the adapter of a supported model or raises
:class:`UnsupportedArchitectureError`.
"""

from __future__ import annotations

from ziplm_ext.adapters.base import Adapter, PrunableLayer, RemovedModule, UnsupportedArchitectureError
from ziplm_ext.adapters.bert import BertAdapter
from ziplm_ext.adapters.gpt2 import GPT2Adapter
from ziplm_ext.adapters.llama import LlamaAdapter
from ziplm_ext.adapters.shapes import ModelShapes, has_lm_head, is_causal_lm, model_shapes

ADAPTERS: tuple[type[Adapter], ...] = (BertAdapter, GPT2Adapter, LlamaAdapter)

SUPPORTED_FAMILIES = "bert (BertModel, BertFor*), gpt2 (GPT2Model, GPT2LMHeadModel, ...), llama (Llama/Mistral/Qwen2 Model and ForCausalLM)"


def get_adapter(model) -> Adapter:
    """The adapter for ``model``; raises :class:`UnsupportedArchitectureError` if none matches."""
    for cls in ADAPTERS:
        try:
            ok = cls.matches(model)
        except Exception:  # a matcher must never crash on foreign models
            ok = False
        if ok:
            return cls()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    what = type(model).__name__ + (f" (model_type={model_type!r})" if model_type else "")
    raise UnsupportedArchitectureError(f"ziplm_ext: unsupported architecture {what}; supported families: {SUPPORTED_FAMILIES}")


__all__ = [
    "Adapter",
    "PrunableLayer",
    "RemovedModule",
    "UnsupportedArchitectureError",
    "BertAdapter",
    "GPT2Adapter",
    "LlamaAdapter",
    "ADAPTERS",
    "get_adapter",
    "ModelShapes",
    "model_shapes",
    "is_causal_lm",
    "has_lm_head",
]
