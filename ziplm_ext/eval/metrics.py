"""Quality metrics for pruned models: causal-LM perplexity, distillation KL, sentence-embedding cosine."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def _nll_sum(model, input_ids: torch.Tensor, batch_size: int) -> tuple[float, int]:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (N, T), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError("need at least 2 tokens per row to score next-token prediction")
    dev = _device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, input_ids.shape[0], max(1, int(batch_size))):
            ids = input_ids[i:i + batch_size].to(dev)
            logits = _logits(model(input_ids=ids, use_cache=False)).float()
            # token t predicts t+1; same shift as HF's causal-LM loss
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return total, count


def lm_loss(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats) over all ``N * (T-1)`` predicted tokens."""
    total, count = _nll_sum(model, input_ids, batch_size)
    return total / count


def perplexity(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """Causal-LM perplexity ``exp(mean token NLL)`` on ``input_ids`` ``(N, T)``; no grad, on the model's device."""
    return math.exp(lm_loss(model, input_ids, batch_size))


def kl_terms(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Elementwise terms of ``KL(ref || model)``: ``exp(ref) * (ref - logprobs)`` on log-probabilities.

    The one KL of the package (calibration loss of the search, ``kl_to_teacher``, the distillation
    logit term); callers sum over the vocabulary dimension (or everything) themselves, so each keeps
    its own reduction order.  No shape checks: broadcasting follows torch.
    """
    return ref_logprobs.exp() * (ref_logprobs - logprobs)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token ``KL(teacher || student)`` over the last (vocab) dim; differentiable w.r.t. the student.

    ``mask`` (same leading shape as the logits, 1 = count) restricts the mean to some tokens.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = kl_terms(t, s).sum(-1)
    if mask is not None:
        m = mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp_min(1)
    return kl.mean()


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def sentence_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``(N, H)`` float32 CPU tensor: mean of ``last_hidden_state`` over non-padding tokens, L2-normalised
    (the all-MiniLM-L6-v2 / sentence-transformers recipe)."""
    dev = _device(model)
    was_training = model.training
    model.eval()
    outs = []
    try:
        for i in range(0, input_ids.shape[0], max(1, int(batch_size))):
            ids = input_ids[i:i + batch_size].to(dev)
            am = attention_mask[i:i + batch_size].to(dev)
            out = model(input_ids=ids, attention_mask=am)
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            outs.append(F.normalize(mean_pool(h.float(), am), p=2, dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs, 0)


def embedding_cosine(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 32) -> float:
    """Mean cosine similarity between student and teacher sentence embeddings of the same inputs."""
    a = sentence_embeddings(student, input_ids, attention_mask, batch_size)
    b = sentence_embeddings(teacher, input_ids, attention_mask, batch_size)
    return float((a * b).sum(-1).mean())
