"""Tests of ziplm_ext.distill: the distillation loss terms and the finetune loop (tiny random models)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from ziplm_ext.stages.distill import DistillConfig, FinetuneStats, distill_loss, finetune  # noqa: E402

VOCAB = 64


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def perturb(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g) * p.abs().mean().clamp_min(1e-3))
    return model


def ids(n=4, t=12, seed=3):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def only(**w):
    base = dict(task_weight=0.0, logit_weight=0.0, hidden_weight=0.0)
    base.update(w)
    return DistillConfig(**base)


def outs(student, teacher, x, mask=None):
    with torch.no_grad():
        t = teacher(x, attention_mask=mask, output_hidden_states=True)
    s = student(x, attention_mask=mask, output_hidden_states=True)
    return s, t


# ----------------------------------------------------------------------------- distill_loss


@pytest.mark.parametrize("make", [llama, gpt2])
@pytest.mark.parametrize("term", ["logit", "hidden"])
def test_term_zero_for_copy_and_has_grads(make, term):
    teacher = make()
    x = ids()
    cfg = only(**{f"{term}_weight": 1.0})
    s, t = outs(copy.deepcopy(teacher), teacher, x)
    loss, terms = distill_loss(s, t, x, None, cfg)
    assert set(terms) == {term, "total"}
    assert abs(terms[term]) < 1e-8 and abs(loss.item()) < 1e-8

    student = perturb(copy.deepcopy(teacher))
    s, t = outs(student, teacher, x)
    loss, terms = distill_loss(s, t, x, None, cfg)
    assert terms[term] > 1e-6
    assert loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("make", [llama, gpt2])
def test_task_term_equals_hf_loss(make):
    model = make()
    x = ids()
    with torch.no_grad():
        ref = model(x, labels=x).loss.item()
        out = model(x, output_hidden_states=True)
    loss, terms = distill_loss(out, None, x, None, only(task_weight=2.0))
    assert terms["task"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx(2.0 * ref, rel=1e-5)


def test_all_terms_weighted_sum():
    teacher = llama()
    student = perturb(copy.deepcopy(teacher))
    x = ids()
    s, t = outs(student, teacher, x)
    cfg = DistillConfig(task_weight=0.5, logit_weight=2.0, hidden_weight=3.0)
    loss, terms = distill_loss(s, t, x, None, cfg)
    assert set(terms) == {"task", "logit", "hidden", "total"}
    assert loss.item() == pytest.approx(0.5 * terms["task"] + 2 * terms["logit"] + 3 * terms["hidden"], rel=1e-5)
    assert terms["total"] == pytest.approx(loss.item())


def _hidden_outs(seed, b=2, t=5, d=8, layers=3):
    g = torch.Generator().manual_seed(seed)
    hs = tuple(torch.randn(b, t, d, generator=g) for _ in range(layers + 1))
    ht = tuple(torch.randn(b, t, d, generator=g) for _ in range(layers + 1))
    return hs, ht


def test_hidden_normalisation_scale_invariant_and_by_hand():
    hs, ht = _hidden_outs(0)
    x = torch.zeros(2, 5, dtype=torch.long)
    cfg = only(hidden_weight=1.0)
    _, a = distill_loss(SimpleNamespace(hidden_states=hs), SimpleNamespace(hidden_states=ht), x, None, cfg)
    c = 37.5
    _, b = distill_loss(SimpleNamespace(hidden_states=tuple(c * h for h in hs)),
                        SimpleNamespace(hidden_states=tuple(c * h for h in ht)), x, None, cfg)
    assert b["hidden"] == pytest.approx(a["hidden"], rel=1e-5)
    # by hand: mean over layers 1.. of mean_tok ||hs-ht||^2 / mean_tok ||ht||^2 (layer 0 ignored)
    want = sum(((s - t) ** 2).sum(-1).mean() / (t ** 2).sum(-1).mean() for s, t in zip(hs[1:], ht[1:])) / 3
    assert a["hidden"] == pytest.approx(float(want), rel=1e-5)
    hs0 = (hs[0] + 100.0,) + hs[1:]
    _, d = distill_loss(SimpleNamespace(hidden_states=hs0), SimpleNamespace(hidden_states=ht), x, None, cfg)
    assert d["hidden"] == pytest.approx(a["hidden"], rel=1e-6)


def test_padding_excluded_from_hidden_and_logit():
    hs, ht = _hidden_outs(1)
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    x = torch.zeros(2, 5, dtype=torch.long)
    cfg = only(hidden_weight=1.0, logit_weight=1.0)
    teacher = SimpleNamespace(logits=zt, hidden_states=ht)
    _, a = distill_loss(SimpleNamespace(logits=zs, hidden_states=hs), teacher, x, mask, cfg)
    hs2 = tuple(h.clone() for h in hs)
    zs2 = zs.clone()
    for h in hs2:
        h[0, 4] += 50.0
        h[1, 3:] -= 20.0
    zs2[0, 4] += 30.0
    zs2[1, 3] *= -5.0
    _, b = distill_loss(SimpleNamespace(logits=zs2, hidden_states=hs2), teacher, x, mask, cfg)
    assert b["hidden"] == pytest.approx(a["hidden"], rel=1e-6)
    assert b["logit"] == pytest.approx(a["logit"], rel=1e-6)
    # and a change at a real position does change it
    hs2[1][0, 0] += 1.0
    _, c = distill_loss(SimpleNamespace(logits=zs2, hidden_states=hs2), teacher, x, mask, cfg)
    assert c["hidden"] != pytest.approx(a["hidden"], rel=1e-6)


def test_task_term_padding_excluded():
    model = llama()
    x = ids(2, 8)
    mask = torch.ones_like(x)
    mask[0, 6:] = 0
    with torch.no_grad():
        out = model(x, attention_mask=mask)
    _, terms = distill_loss(out, None, x, mask, only(task_weight=1.0))
    labels = x.clone()
    labels[mask == 0] = -100
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert terms["task"] == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.5])
def test_logit_term_temperature_by_hand(T):
    g = torch.Generator().manual_seed(5)
    zs, zt = torch.randn(3, 4, 9, generator=g), 2 * torch.randn(3, 4, 9, generator=g)
    x = torch.zeros(3, 4, dtype=torch.long)
    _, terms = distill_loss(SimpleNamespace(logits=zs), SimpleNamespace(logits=zt), x, None,
                            only(logit_weight=1.0, temperature=T))
    p = torch.softmax(zt.double() / T, -1)
    q = torch.softmax(zs.double() / T, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    assert terms["logit"] == pytest.approx(T * T * kl.item(), rel=1e-5)
    ref = F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), log_target=True,
                   reduction="sum") / (3 * 4) * T * T
    assert terms["logit"] == pytest.approx(ref.item(), rel=1e-4)


def test_distill_loss_errors():
    hs, ht = _hidden_outs(0)
    x = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="equal depth"):
        distill_loss(SimpleNamespace(hidden_states=hs), SimpleNamespace(hidden_states=ht[:-1]), x, None,
                     only(hidden_weight=1.0))
    with pytest.raises(ValueError, match="output_hidden_states"):
        distill_loss(SimpleNamespace(hidden_states=None), SimpleNamespace(hidden_states=ht), x, None,
                     only(hidden_weight=1.0))
    # no logits and only logit/task weight -> nothing to compute
    with pytest.raises(ValueError, match="no token logits"):
        distill_loss(SimpleNamespace(hidden_states=hs), SimpleNamespace(hidden_states=ht), x, None,
                     only(logit_weight=1.0, task_weight=1.0))


# ----------------------------------------------------------------------------- config validation


@pytest.mark.parametrize("kw,name", [
    (dict(task_weight=-1.0), "task_weight"),
    (dict(logit_weight=float("nan")), "logit_weight"),
    (dict(task_weight=0.0, logit_weight=0.0, hidden_weight=0.0), "all 0"),
    (dict(temperature=0.0), "temperature"),
    (dict(lr=-1e-3), "lr"),
    (dict(batch_size=0), "batch_size"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(amp="yes"), "amp"),
])
def test_bad_config(kw, name):
    with pytest.raises(ValueError, match=name):
        DistillConfig(**kw)


# ----------------------------------------------------------------------------- finetune


def test_finetune_lowers_loss_and_stats():
    teacher = llama()
    student = perturb(copy.deepcopy(teacher), scale=0.3)
    data = ids(16, 12, seed=7)
    cfg = DistillConfig(task_weight=0.0, lr=3e-3, batch_size=4, seed=0)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student.train()  # mode must be restored
    st = finetune(student, teacher, data, steps=24, cfg=cfg, progress=False)
    assert isinstance(st, FinetuneStats)
    assert st.steps == 24 and len(st.history) == 24
    assert st.tokens == 24 * 4 * 12
    assert st.seconds > 0 and st.tokens_per_second == pytest.approx(st.tokens / st.seconds)
    assert set(st.history[0]) == {"logit", "hidden", "total", "lr"}
    first = sum(h["total"] for h in st.history[:3]) / 3
    last = sum(h["total"] for h in st.history[-3:]) / 3
    assert last < 0.7 * first
    assert set(st.final) == set(st.history[0])
    assert st.final["total"] == pytest.approx(sum(h["total"] for h in st.history[-2:]) / 2)
    # linear decay to 0 just after the last step
    assert st.history[0]["lr"] == pytest.approx(3e-3)
    assert st.history[-1]["lr"] == pytest.approx(3e-3 / 24)
    assert student.training and all(m.training for m in student.modules())
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    assert all(p.grad is None for p in teacher.parameters())


def test_finetune_deterministic_and_seed_dependent():
    teacher = gpt2()
    base = perturb(copy.deepcopy(teacher), scale=0.2)
    data = ids(10, 8, seed=11)  # 10 rows, batch 4 -> 2 batches per epoch (short batch dropped)

    def run(seed, dropout=True):
        s = copy.deepcopy(base)
        finetune(s, teacher, data, steps=5, progress=False,
                 cfg=DistillConfig(lr=1e-3, batch_size=4, seed=seed, dropout=dropout, warmup_steps=2))
        return s.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_finetune_callbacks_and_param_groups():
    teacher = llama()
    student = perturb(copy.deepcopy(teacher))
    data = ids(3, 6)  # fewer rows than batch_size -> all rows each step
    calls = []
    lam = torch.nn.Parameter(torch.tensor(0.5))

    def extra(step):
        calls.append(("extra", step))
        return lam * 0.1, {"lam": float(lam.detach())}

    def after(step):
        calls.append(("after", step))
        assert lam.grad is not None  # backward already ran

    groups = [{"params": [p for p in student.parameters()]}, {"params": [lam], "lr": 0.01, "weight_decay": 0.0}]
    st = finetune(student, teacher, data, steps=3, cfg=DistillConfig(batch_size=8, warmup_steps=2),
                  progress=False, extra_loss=extra, after_backward=after, param_groups=groups)
    assert calls == [("extra", 0), ("after", 0), ("extra", 1), ("after", 1), ("extra", 2), ("after", 2)]
    assert st.tokens == 3 * 3 * 6
    h = st.history[0]
    assert {"distill", "task", "logit", "hidden", "lam", "total", "lr"} <= set(h)
    assert h["total"] == pytest.approx(h["distill"] + 0.1 * h["lam"], rel=1e-5)
    assert [x["lr"] for x in st.history] == pytest.approx([0.5e-4, 1e-4, 1e-4])
    assert float(lam.detach()) < 0.5  # the extra parameter was optimised


def test_finetune_encoder_padded_mask():
    teacher = bert()
    student = perturb(copy.deepcopy(teacher))
    x = ids(6, 10)
    mask = torch.ones_like(x)
    mask[0, 7:] = 0
    mask[3, 4:] = 0
    st = finetune(student, teacher, (x, mask), steps=2, cfg=DistillConfig(batch_size=6), progress=False)
    assert set(st.history[0]) == {"hidden", "total", "lr"}
    assert st.tokens == 2 * int(mask.sum())
    assert all(math.isfinite(h["total"]) for h in st.history)
    with pytest.raises(ValueError, match="no token logits"):
        finetune(student, teacher, (x, mask), steps=1, cfg=only(logit_weight=1.0), progress=False)


def test_finetune_nonfinite_raises_and_restores_modes():
    teacher = llama()
    student = copy.deepcopy(teacher)
    student.train()

    def bad(step):
        return torch.tensor(float("nan")), {}

    with pytest.raises(FloatingPointError, match="step 0"):
        finetune(student, teacher, ids(4, 6), steps=2, cfg=DistillConfig(batch_size=2), progress=False,
                 extra_loss=bad)
    assert student.training and not teacher.training


def test_finetune_bad_inputs():
    teacher = llama()
    student = copy.deepcopy(teacher)
    cfg = DistillConfig(batch_size=2)
    run = lambda data, steps=1: finetune(student, teacher, data, steps, cfg, progress=False)  # noqa: E731
    with pytest.raises(ValueError, match="empty"):
        run(torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab"):
        run(torch.full((2, 4), VOCAB))
    with pytest.raises(ValueError, match="vocab"):
        run(torch.full((2, 4), -1))
    with pytest.raises(ValueError, match="2-D"):
        run(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        run((ids(2, 4), torch.ones(2, 5, dtype=torch.long)))
    with pytest.raises(ValueError, match="steps"):
        run(ids(2, 4), steps=-1)
    with pytest.raises(ValueError, match="same module"):
        finetune(teacher, teacher, ids(2, 4), 1, cfg, progress=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    st = run(ids(2, 4), steps=0)
    assert st.steps == 0 and st.tokens == 0 and st.history == [] and st.final == {}
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_finetune_bf16_autocast_cpu():
    teacher = llama()
    student = perturb(copy.deepcopy(teacher))
    st = finetune(student, teacher, ids(4, 8), steps=1, cfg=DistillConfig(batch_size=4, amp=True), progress=False)
    assert all(math.isfinite(v) for v in st.history[0].values())
    assert next(student.parameters()).dtype == torch.float32
