"""What a model is, read from the model or its Hugging Face config: block shapes and whether it is a
causal language model.

* :func:`model_shapes` -- the one place that reads block shapes (hidden size, heads, KV groups,
  FFN width, gated FFN, causal attention) from a dense HF config (BERT, GPT-2, LLaMA family).
  The latency table times blocks of exactly these shapes (ZipLM paper: per-layer latency table of
  the inference environment).
* :func:`is_causal_lm` -- the one check whether a model (or a saved config) is a causal language
  model: a decoder whose head predicts the next token.  It decides perplexity vs. sentence
  embeddings in evaluation, the next-token term of distillation and which Auto class loads a
  checkpoint.
* :func:`has_lm_head` -- whether a model outputs token logits at all (causal *or* masked LM head);
  the calibration loss compares logits when it does, last hidden states otherwise.

Causal *attention* (:attr:`ModelShapes.causal`) is a property of the blocks, not of the head: a
headless ``GPT2Model`` has causal attention but is no causal LM.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ModelShapes", "model_shapes", "is_causal_lm", "has_lm_head"]

_GATED_TYPES = ("llama", "mistral", "qwen2")
_ENCODER_TYPES = ("bert", "roberta", "distilbert", "xlm-roberta", "electra")
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # HF class names of next-token heads


@dataclass(frozen=True)
class ModelShapes:
    """Block shapes of a dense transformer, read from its HF config by :func:`model_shapes`.

    One attention *structure* is one KV group: ``q_per_structure`` query heads sharing
    one key/value head (BERT / GPT-2: 1 and 1).
    """

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    gated: bool  # LLaMA-family SiLU-gated FFN
    causal: bool  # decoder (causal attention) vs encoder

    @property
    def q_per_structure(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_attn_structures(self) -> int:
        return self.num_kv_heads


def config_value(config, *names, default=None):
    """The first of the config attributes `names` that is set (not None), else `default`."""
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def model_shapes(config) -> ModelShapes:
    """The one place that reads block shapes from a dense HF config (BERT, GPT-2, LLaMA family)."""
    model_type = str(getattr(config, "model_type", "") or "")
    hidden = config_value(config, "hidden_size", "n_embd", "d_model")
    heads = config_value(config, "num_attention_heads", "n_head")
    if hidden is None or heads is None:
        raise ValueError(f"cannot read hidden size / head count from config of model_type={model_type!r}")
    hidden, heads = int(hidden), int(heads)
    kv = int(config_value(config, "num_key_value_heads", default=heads))
    head_dim = int(config_value(config, "head_dim", default=hidden // heads))
    d_ff = config_value(config, "intermediate_size", "n_inner")
    d_ff = int(d_ff) if d_ff is not None else 4 * hidden
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    causal = model_type not in _ENCODER_TYPES or bool(getattr(config, "is_decoder", False))
    return ModelShapes(hidden, heads, kv, head_dim, d_ff, model_type in _GATED_TYPES, causal)


def has_lm_head(model: nn.Module) -> bool:
    """Whether `model` outputs token logits (it has output embeddings: a causal or masked LM head)."""
    return model.get_output_embeddings() is not None


def is_causal_lm(model_or_config) -> bool:
    """Whether a model, or the HF config of a saved one, is a causal language model.

    A model is one when its class is a HF next-token head (``*ForCausalLM``, ``*LMHeadModel``), or
    when its config is a decoder's (``is_decoder``) and it has an LM head.  A config is one when
    its ``architectures`` name such a class; a config without ``architectures`` when its type has a
    causal-LM class in transformers and it is neither an encoder-decoder nor an encoder family.
    """
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
        if type(model).__name__.endswith(_CAUSAL_LM_SUFFIXES):
            return True
        config = getattr(model, "config", None)
        return bool(getattr(config, "is_decoder", False)) and has_lm_head(model)
    return _is_causal_lm_config(model_or_config)


def _is_causal_lm_config(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(_CAUSAL_LM_SUFFIXES) for a in archs):
        return True
    try:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        return (not archs and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
                and not getattr(config, "is_encoder_decoder", False) and config.model_type not in _ENCODER_TYPES)
    except Exception:  # pragma: no cover
        return False
