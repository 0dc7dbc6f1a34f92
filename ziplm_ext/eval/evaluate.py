"""Quality metrics of a pruned model on held-out data, against its dense teacher."""
from __future__ import annotations

import torch

from ziplm_ext.eval.metrics import embedding_cosine, perplexity


def evaluate_model(model, dense, eval_data) -> dict[str, float]:
    """Held-out perplexity for a LongTensor of token ids (causal LMs); mean sentence-embedding cosine
    to the dense model for an (input_ids, attention_mask) tuple (encoders)."""
    if isinstance(eval_data, torch.Tensor):
        return {"perplexity": perplexity(model, eval_data)}
    if isinstance(eval_data, (tuple, list)) and len(eval_data) == 2:
        ids, mask = eval_data
        return {"embedding_cosine": embedding_cosine(model, dense, ids, mask)}
    raise ValueError("eval_data must be a LongTensor of token ids or an (input_ids, attention_mask) tuple")
