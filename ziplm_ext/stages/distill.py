"""Token-level knowledge distillation from a dense teacher into a pruned student (ZipLM paper,
gradual pruning: fine-tuning with distillation from the dense model between pruning steps).

Used by gradual ZipLM pruning (fine-tune between pruning steps) and by the FLOP
baseline.  The student is a structurally pruned copy of the teacher with the
*same depth* and the same hidden size (heads / FFN channels removed), so block
``l`` of the student is distilled towards block ``l`` of the teacher.

Loss (per batch; ``R`` = the set of real tokens, i.e. ``attention_mask == 1``;
every term is computed in float32, also under autocast)::

    L = w_task * L_task + w_logit * L_logit + w_hidden * L_hidden

    L_task   = mean_{t, t+1 in R} CE(z_s[t], x[t+1])               (causal LMs only)
    L_logit  = T^2 * mean_{t in R} KL(softmax(z_t[t]/T) || softmax(z_s[t]/T))
    L_hidden = (1/L) * sum_{l=1..L}  mean_{t in R} ||h_s^l[t] - h_t^l[t]||^2
                                    / mean_{t in R} ||h_t^l[t]||^2

``z`` are the LM logits, ``h^l`` = ``hidden_states[l]`` for ``l >= 1`` (the
output of each block; the embedding output ``hidden_states[0]`` is skipped),
squared norms summed over the hidden dimension.

Design choices:

* ``L_task`` is the standard shifted next-token cross-entropy (token ``t``
  predicts ``t+1``), averaged over predicted tokens; with no padding it equals
  HF's ``model(ids, labels=ids).loss``.  It is only computed for causal LMs
  (``distill_loss(..., causal=False)`` skips it, e.g. masked LMs).
* ``L_logit`` uses the usual ``T^2`` factor (Hinton et al.) so its gradient
  scale does not depend on the temperature; it covers every real position
  (the last one included), averaged per token.
* ``L_hidden`` is normalised per layer by the teacher's mean squared norm, so
  it is invariant to the scale of the residual stream (which grows with
  depth), and **averaged** (not summed) over layers so its magnitude does not
  depend on the depth; a student identical to the teacher gives exactly 0.
* Terms whose weight is 0 are not computed and not reported.  Models without
  token logits (e.g. ``BertModel``; also logits that are not ``(B, T, V)``,
  such as sequence-classification heads) only get the hidden term; a config
  that gives all its weight to absent terms raises ``ValueError``.
* Padding (``attention_mask == 0``) is excluded from every term.
* ``finetune`` keeps the student in eval mode by default (``dropout=False``):
  distillation of an already trained network converges faster and
  deterministically without dropout.  Batches are a seeded per-epoch
  permutation of the rows, so two runs with the same seed on equal models give
  bit-identical weights on CPU.
* Learning rate: linear warm-up over ``warmup_steps`` (step ``s < warmup``
  uses ``lr * (s+1)/warmup``), then linear decay: step ``s >= warmup`` uses
  ``lr * (steps - s) / (steps - warmup)``, i.e. the lr reaches 0 right after
  the last step (every step, the last one included, has a positive lr).
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ziplm_ext.adapters import is_causal_lm
from ziplm_ext.eval.metrics import kl_terms

__all__ = ["DistillConfig", "FinetuneStats", "distill_loss", "finetune"]


@dataclass
class DistillConfig:
    """Hyper-parameters of :func:`finetune` / :func:`distill_loss` (see the module docstring)."""

    task_weight: float = 1.0      # LM next-token CE on the inputs (skipped without token logits / non-causal)
    logit_weight: float = 1.0     # T^2 * KL(teacher || student) per real token
    hidden_weight: float = 1.0    # per-layer normalised hidden-state MSE, averaged over layers
    temperature: float = 2.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    warmup_steps: int = 0         # linear warm-up, then linear decay reaching 0 right after the last step
    grad_clip: float = 1.0        # max global grad norm; <= 0 disables
    seed: int = 0
    amp: Optional[bool] = None    # None: bf16 autocast on CUDA, off on CPU; True: bf16 autocast (CPU too)
    dropout: bool = False         # False: student kept in eval mode (no dropout) while training

    def __post_init__(self):
        for name in ("task_weight", "logit_weight", "hidden_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"DistillConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.task_weight == 0 and self.logit_weight == 0 and self.hidden_weight == 0:
            raise ValueError("DistillConfig: task_weight, logit_weight and hidden_weight are all 0 (nothing to train)")
        for name in ("temperature", "lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"DistillConfig.{name} must be a finite number > 0, got {v!r}")
        v = self.weight_decay
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"DistillConfig.weight_decay must be a finite number >= 0, got {v!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"DistillConfig.batch_size must be an int >= 1, got {self.batch_size!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"DistillConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.grad_clip, (int, float)) or isinstance(self.grad_clip, bool) or math.isnan(self.grad_clip):
            raise ValueError(f"DistillConfig.grad_clip must be a number (<= 0 disables clipping), got {self.grad_clip!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"DistillConfig.seed must be an int, got {self.seed!r}")
        if self.amp is not None and not isinstance(self.amp, bool):
            raise ValueError(f"DistillConfig.amp must be None, True or False, got {self.amp!r}")


@dataclass
class FinetuneStats:
    """Result of :func:`finetune`.

    ``history[i]``: the loss terms of step ``i`` (``task``/``logit``/``hidden``
    as present, ``total`` = the full objective minimised, including
    ``extra_loss``; with ``extra_loss`` also ``distill`` = the distillation part
    alone and the extra's own entries) plus ``lr`` (group 0's lr used at that
    step).  ``final``: mean of each entry over the last ``max(1, steps // 10)``
    steps.  ``tokens``: real (non-padding) tokens fed to the student.
    """

    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    history: list = field(default_factory=list)
    final: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- loss


def _token_logits(out):
    z = getattr(out, "logits", None)
    if z is None or not torch.is_tensor(z) or z.dim() != 3:
        return None
    return z


def _real_mask(input_ids, attention_mask) -> torch.Tensor:
    """Boolean ``(B, T)`` mask of the real tokens (all of them when ``attention_mask`` is None)."""
    if attention_mask is None:
        return torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    return attention_mask.to(device=input_ids.device) != 0


def _task_term(z_s, input_ids, mask) -> torch.Tensor:
    """``L_task``: shifted next-token CE averaged over predicted real tokens."""
    if z_s.shape[:2] != input_ids.shape:
        raise ValueError(f"student logits {tuple(z_s.shape)} do not match input_ids {tuple(input_ids.shape)}")
    logits = z_s[:, :-1].float()
    labels = input_ids[:, 1:]
    valid = mask[:, :-1] & mask[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    validf = valid.reshape(-1).float()
    return (ce * validf).sum() / validf.sum().clamp_min(1.0)


def _logit_term(z_s, teacher_out, maskf, n_real, temperature: float) -> torch.Tensor:
    """``L_logit``: ``T^2`` times the mean per-real-token ``KL(teacher || student)`` at temperature ``T``."""
    z_t = _token_logits(teacher_out)
    if z_t is None:
        raise ValueError("distill_loss: the student has token logits but the teacher does not")
    if z_t.shape != z_s.shape:
        raise ValueError(f"student logits {tuple(z_s.shape)} and teacher logits {tuple(z_t.shape)} differ in shape")
    T = float(temperature)
    logp_s = F.log_softmax(z_s.float() / T, dim=-1)
    logp_t = F.log_softmax(z_t.detach().float() / T, dim=-1)
    kl = kl_terms(logp_t, logp_s).sum(-1)  # (B, T)
    return (T * T) * (kl * maskf).sum() / n_real


def _hidden_term(student_out, teacher_out, mask, maskf) -> torch.Tensor:
    """``L_hidden``: per-layer normalised hidden-state MSE, averaged over the block outputs."""
    hs = getattr(student_out, "hidden_states", None)
    ht = getattr(teacher_out, "hidden_states", None)
    if hs is None or ht is None:
        who = "student" if hs is None else "teacher"
        raise ValueError(f"distill_loss: the {who} output has no hidden_states; call the model with "
                         "output_hidden_states=True (or set hidden_weight=0)")
    if len(hs) != len(ht):
        raise ValueError(f"hidden distillation needs equal depth: the student has {len(hs)} hidden states, "
                         f"the teacher {len(ht)}")
    if len(hs) < 2:
        raise ValueError("hidden distillation needs at least one block output (hidden_states[1:] is empty)")
    acc = None
    for l in range(1, len(hs)):
        a, b = hs[l], ht[l]
        if a.shape != b.shape:
            raise ValueError(f"hidden_states[{l}] shapes differ: student {tuple(a.shape)}, teacher {tuple(b.shape)}")
        if a.shape[:2] != mask.shape:
            raise ValueError(f"hidden_states[{l}] shape {tuple(a.shape)} does not match input_ids {tuple(mask.shape)}")
        b = b.detach().float()
        num = ((a.float() - b).pow(2).sum(-1) * maskf).sum()
        den = (b.pow(2).sum(-1) * maskf).sum()
        ratio = num / den.clamp_min(torch.finfo(torch.float32).tiny)  # the 1/n_real factors cancel
        acc = ratio if acc is None else acc + ratio
    return acc / (len(hs) - 1)


def distill_loss(student_out, teacher_out, input_ids, attention_mask, cfg: DistillConfig, *,
                 causal: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted distillation loss of one batch (formulas in the module docstring).

    Args:
        student_out / teacher_out: HF model outputs (or any objects with
            ``logits`` and/or ``hidden_states`` attributes) obtained with
            ``output_hidden_states=True``.  ``teacher_out`` may be ``None``
            when only the task term has a weight.
        input_ids: ``(B, T)`` token ids (the labels of the task term).
        attention_mask: ``(B, T)``, 1 = real token, 0 = padding; ``None`` = all real.
        cfg: weights and temperature.
        causal: compute the next-token task term (set False for masked LMs).

    Returns:
        ``(loss, terms)``: the weighted total as a scalar float32 tensor (with
        grad through the student outputs), and the unweighted terms present
        plus ``"total"`` as Python floats.
    """
    mask = _real_mask(input_ids, attention_mask)
    maskf = mask.float()
    n_real = maskf.sum().clamp_min(1.0)

    z_s = _token_logits(student_out)
    use_task = cfg.task_weight > 0 and causal and z_s is not None
    use_logit = cfg.logit_weight > 0 and z_s is not None
    use_hidden = cfg.hidden_weight > 0
    if not (use_task or use_logit or use_hidden):
        why = "the student outputs no token logits (B, T, V)" if z_s is None else "the model is not a causal LM"
        raise ValueError(f"distill_loss: no loss term applies: {why}, so task/logit terms are absent, "
                         f"and hidden_weight is 0 (weights: task={cfg.task_weight}, logit={cfg.logit_weight}, "
                         f"hidden={cfg.hidden_weight})")
    if (use_logit or use_hidden) and teacher_out is None:
        raise ValueError("distill_loss: teacher_out is None but the logit/hidden terms need the teacher's outputs")

    terms: dict[str, float] = {}
    total = None

    def add(name, w, value):
        nonlocal total
        terms[name] = float(value.detach())
        total = w * value if total is None else total + w * value

    if use_task:
        add("task", cfg.task_weight, _task_term(z_s, input_ids, mask))
    if use_logit:
        add("logit", cfg.logit_weight, _logit_term(z_s, teacher_out, maskf, n_real, cfg.temperature))
    if use_hidden:
        add("hidden", cfg.hidden_weight, _hidden_term(student_out, teacher_out, mask, maskf))
    terms["total"] = float(total.detach())
    return total, terms


# ----------------------------------------------------------------------------- training


def _to_float(v) -> float:
    return float(v.detach()) if torch.is_tensor(v) else float(v)


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def check_train_data(train_data, vocab: int):
    """Validate training data (a (N, T) id tensor or an (input_ids, attention_mask) pair) for a
    model with `vocab` token embeddings; returns (ids as int64, mask as int64 or None)."""
    if isinstance(train_data, (tuple, list)):
        if len(train_data) != 2:
            raise ValueError(f"train_data must be a (N, T) LongTensor or an (input_ids, attention_mask) pair, "
                             f"got a sequence of length {len(train_data)}")
        ids, mask = train_data
    else:
        ids, mask = train_data, None
    if not torch.is_tensor(ids):
        raise ValueError(f"train_data input_ids must be a torch tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"train_data input_ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"train_data input_ids must be 2-D (N, T), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"train_data is empty (shape {tuple(ids.shape)})")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"train_data token ids out of range: they must lie in [0, {vocab}) (the student's vocab size), "
                         f"found ids in [{lo}, {hi}]")
    ids = ids.long()
    if mask is not None:
        if not torch.is_tensor(mask):
            raise ValueError(f"attention_mask must be a torch tensor, got {type(mask).__name__}")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids shape {tuple(ids.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must contain only 0 (padding) and 1 (real token)")
        mask = mask.long()
    return ids, mask


def _batch_indices(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """Row indices of each step: a fresh seeded permutation per epoch, consecutive slices."""
    if n < batch_size:
        for _ in range(steps):
            yield torch.randperm(n, generator=gen)
        return
    per_epoch = n // batch_size  # last short batch dropped
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(per_epoch):
            if done >= steps:
                return
            yield perm[i * batch_size:(i + 1) * batch_size]
            done += 1


def _adamw(param_groups, cfg: DistillConfig) -> torch.optim.AdamW:
    """AdamW; the fused kernel when every parameter allows it (~3x faster step on CPU), else the default."""
    params = [p for g in param_groups for p in g["params"]]
    if params and all(torch.is_tensor(p) and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                      for p in params):
        try:
            return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_lambda(steps: int, warmup: int):
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return max(0.0, (steps - s) / max(1, steps - warmup))

    return f


def _check_finetune(student, teacher, train_data, steps, cfg) -> tuple[DistillConfig, torch.Tensor, Optional[torch.Tensor], torch.device]:
    """Validate the arguments of :func:`finetune`; returns (cfg, ids, mask, device)."""
    cfg = DistillConfig() if cfg is None else cfg
    if not isinstance(cfg, DistillConfig):
        raise ValueError(f"cfg must be a DistillConfig, got {type(cfg).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if student is teacher:
        raise ValueError("student and teacher are the same module; distil into a copy (e.g. copy.deepcopy)")
    emb = student.get_input_embeddings()
    vocab = int(emb.weight.shape[0])
    ids_all, mask_all = check_train_data(train_data, vocab)

    device = _model_device(student)
    t_device = _model_device(teacher)
    if t_device != device:
        raise ValueError(f"teacher is on {t_device} but the student is on {device}; move both to the same device")
    return cfg, ids_all, mask_all, device


def _param_groups(student, param_groups: Optional[list]) -> list[dict]:
    """The AdamW parameter groups: the given ones (copied), or every trainable student parameter."""
    if param_groups is None:
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no parameter with requires_grad=True (and no param_groups given)")
        return [{"params": params}]
    param_groups = [dict(g) for g in param_groups]
    if not param_groups:
        raise ValueError("param_groups is empty")
    for g in param_groups:
        if "params" not in g:
            raise ValueError("each param_groups entry must have a 'params' key")
        g["params"] = list(g["params"])
    return param_groups


def _forward_kwargs(model) -> dict:
    """``use_cache=False`` for models whose forward takes it (no KV cache while training)."""
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        names = {}
    return {"use_cache": False} if "use_cache" in names else {}


@dataclass
class _Trainer:
    """What one :func:`finetune` step needs (built once per call)."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    cfg: DistillConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    desc: str
    extra_loss: Optional[Callable] = None
    after_backward: Optional[Callable] = None

    def __post_init__(self):
        self.clip_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.causal = is_causal_lm(self.student)
        self.amp = self.cfg.amp if self.cfg.amp is not None else self.device.type == "cuda"
        self.need_teacher = self.cfg.logit_weight > 0 or self.cfg.hidden_weight > 0
        self.s_kw, self.t_kw = _forward_kwargs(self.student), _forward_kwargs(self.teacher)

    def _loss(self, step: int, ids, mask) -> tuple[torch.Tensor, dict]:
        kw = {"output_hidden_states": True}
        if mask is not None:
            kw["attention_mask"] = mask
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.need_teacher:
                with torch.no_grad():
                    t_out = self.teacher(ids, **kw, **self.t_kw)
            else:
                t_out = None
            s_out = self.student(ids, **kw, **self.s_kw)
        loss, terms = distill_loss(s_out, t_out, ids, mask, self.cfg, causal=self.causal)
        if self.extra_loss is not None:
            x_loss, x_terms = self.extra_loss(step)
            loss = loss + x_loss
            terms = {"distill": terms.pop("total"), **terms, **{k: _to_float(v) for k, v in dict(x_terms or {}).items()}}
            terms["total"] = float(loss.detach())
        return loss, terms

    def step(self, step: int, ids, mask) -> dict:
        """One optimizer step on the batch; returns its loss terms and the lr used."""
        lr_now = self.optimizer.param_groups[0]["lr"]
        loss, terms = self._loss(step, ids, mask)
        if not math.isfinite(terms["total"]):
            raise FloatingPointError(f"{self.desc}: non-finite loss at step {step}: "
                                     + ", ".join(f"{k}={v:.4g}" for k, v in terms.items()))
        loss.backward()
        if self.after_backward is not None:
            self.after_backward(step)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.clip_params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        del loss
        terms["lr"] = lr_now
        return terms


def _final_means(history: list[dict], steps: int) -> dict:
    """Mean of each entry over the last ``max(1, steps // 10)`` steps."""
    tail = history[-max(1, steps // 10):]
    keys = list(dict.fromkeys(k for h in tail for k in h))
    return {k: sum(h[k] for h in tail if k in h) / sum(1 for h in tail if k in h) for k in keys}


def finetune(student, teacher, train_data, steps: int, cfg: DistillConfig = None, *, progress: bool = True,
             extra_loss: Optional[Callable] = None, after_backward: Optional[Callable] = None,
             param_groups: Optional[list] = None, desc: str = "distill") -> FinetuneStats:
    """Distil ``teacher`` into ``student`` for ``steps`` AdamW steps (in place).

    Args:
        student: the model trained (same depth and hidden size as the teacher).
        teacher: the frozen reference; run in eval mode under ``torch.no_grad()``,
            never updated (its ``requires_grad`` flags are left untouched).  Must
            be on the student's device.
        train_data: ``(N, T)`` LongTensor of token ids (causal LMs, no padding)
            or ``(input_ids, attention_mask)`` (mask 1 = real token).
        steps: optimizer steps (0: nothing is done).
        cfg: :class:`DistillConfig` (default: ``DistillConfig()``).
        progress: show a tqdm bar with the loss terms.
        extra_loss: ``extra_loss(step) -> (tensor, dict_of_floats)``, called after
            the distillation loss each step; the tensor is added to the loss,
            the dict merged into the step's history and the bar's postfix.
        after_backward: ``after_backward(step)``, called right after
            ``loss.backward()`` (before clipping and the optimizer step).
        param_groups: parameter groups for ``torch.optim.AdamW`` (default:
            every student parameter with ``requires_grad``); groups without
            ``lr`` / ``weight_decay`` get the cfg values.
        desc: the bar's label.

    Returns:
        :class:`FinetuneStats`.  Student and teacher train/eval modes are
        restored on return (also on exceptions).  A non-finite loss raises
        ``FloatingPointError`` naming the step.
    """
    cfg, ids_all, mask_all, device = _check_finetune(student, teacher, train_data, steps, cfg)
    if steps == 0:
        return FinetuneStats(steps=0, tokens=0, seconds=0.0, tokens_per_second=0.0, history=[], final={})
    optimizer = _adamw(_param_groups(student, param_groups), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps, cfg.warmup_steps))
    trainer = _Trainer(student, teacher, cfg, optimizer, scheduler, device, desc, extra_loss, after_backward)

    modes = [(m, m.training) for m in student.modules()] + [(m, m.training) for m in teacher.modules()]
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    from tqdm.auto import tqdm

    history: list[dict] = []
    tokens = 0
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    try:
        student.train(cfg.dropout)
        teacher.eval()
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for step, rows in enumerate(_batch_indices(ids_all.shape[0], cfg.batch_size, steps, gen)):
            ids = ids_all[rows].to(device)
            mask = mask_all[rows].to(device) if mask_all is not None else None
            terms = trainer.step(step, ids, mask)
            tokens += int(mask.sum()) if mask is not None else ids.numel()
            history.append(terms)
            bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()}, refresh=False)
            bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    finally:
        bar.close()
        for m, was_training in modes:
            m.training = was_training

    return FinetuneStats(steps=len(history), tokens=tokens, seconds=seconds,
                         tokens_per_second=tokens / seconds if seconds > 0 else float("inf"),
                         history=history, final=_final_means(history, steps))
