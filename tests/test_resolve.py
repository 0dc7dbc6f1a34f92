"""Sequential re-solve (ziplm_ext.stages.resolve): the closed-form least-squares re-fit of each kept
out projection on inputs from the pruned earlier layers, against the dense layer's outputs."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from ziplm_ext.adapters import get_adapter
from ziplm_ext.eval.metrics import kl_terms
from ziplm_ext.stages.calibrate import make_batches
from ziplm_ext.stages.database import build_database
from ziplm_ext.stages.resolve import resolve_sequential
from ziplm_ext.stages.slicing import build_pruned_model

VOCAB = 61


def make_model(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        cls = transformers.LlamaForCausalLM
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=64)
        cls = transformers.BertModel
    cfg._attn_implementation = "eager"
    model = cls(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def calib(n=12, T=16, seed=1):
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def pruned_pair(arch: str):
    model = make_model(arch)
    batches = make_batches(calib(), None, batch_size=4)
    db = build_database(model, batches, damp=0.01)
    names = db.names()
    widths = {}
    for k, n in enumerate(names):
        full = db[n].layer.num_structures
        widths[n] = [full // 2, 0, max(1, full // 3)][k % 3] if not n.startswith("blocks.0") else max(1, full // 2)
    return model, build_pruned_model(model, db, widths), batches


def model_loss(model, dense, ids) -> float:
    with torch.no_grad():
        if hasattr(dense, "lm_head"):
            ref = torch.log_softmax(dense(input_ids=ids).logits, -1)
            out = torch.log_softmax(model(input_ids=ids).logits, -1)
            return float(kl_terms(ref, out).sum() / (ids.numel()))
        ref, out = dense(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
        return float(((out - ref) ** 2).sum() / (ref ** 2).sum())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_resolve_lowers_every_layer_error_and_the_loss(arch):
    dense, pruned, batches = pruned_pair(arch)
    ids = calib()
    before = model_loss(pruned, dense, ids)
    report = resolve_sequential(pruned, dense, batches, damp=1e-6)
    assert report, "no layer was re-fitted"
    for name, (b, a) in report.items():
        assert a <= b * (1 + 1e-9) + 1e-12, (name, b, a)
    assert any(a < 0.99 * b for b, a in report.values())
    after = model_loss(pruned, dense, ids)
    assert after < before, (before, after)


def test_first_layer_matches_explicit_least_squares():
    """Block 0's attention has dense inputs on both sides; its re-fit is the damped normal equations."""
    dense, pruned, batches = pruned_pair("llama")
    adapter = get_adapter(dense)
    layer = [l for l in adapter.prunable_layers(pruned) if l.block == 0 and l.kind == "attn"][0]
    xs = {"d": [], "p": []}
    hooks = [adapter.out_proj(dense, layer).register_forward_pre_hook(lambda m, a: xs["d"].append(a[0].reshape(-1, a[0].shape[-1]))),
             adapter.out_proj(pruned, layer).register_forward_pre_hook(lambda m, a: xs["p"].append(a[0].reshape(-1, a[0].shape[-1])))]
    with torch.no_grad():
        for b in batches:
            dense(input_ids=b.input_ids)
            pruned(input_ids=b.input_ids)
    for h in hooks:
        h.remove()
    Xd, Xp = torch.cat(xs["d"]), torch.cat(xs["p"])
    Y = Xd @ adapter.get_weight(dense, layer).t()
    H = Xp.t() @ Xp
    H += 1e-3 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    expected = torch.linalg.solve(H, Xp.t() @ Y).t()
    resolve_sequential(pruned, dense, batches, damp=1e-3)
    torch.testing.assert_close(adapter.get_weight(pruned, layer), expected, rtol=1e-8, atol=1e-10)


def test_unpruned_model_is_left_unchanged():
    dense = make_model("llama")
    same = copy.deepcopy(dense)
    report = resolve_sequential(same, dense, make_batches(calib(), None, batch_size=4), damp=1e-6)
    for b, a in report.values():
        assert b < 1e-18 and a <= b + 1e-18
    for (n, p), (_, q) in zip(dense.named_parameters(), same.named_parameters()):
        assert torch.allclose(p, q, atol=1e-9), n


def test_bad_input():
    dense, pruned, _ = pruned_pair("llama")
    with pytest.raises(ValueError, match="no calibration batches"):
        resolve_sequential(pruned, dense, [])
    with pytest.raises(ValueError, match="different architectures"):
        resolve_sequential(pruned, make_model("gpt2"), make_batches(calib(), None, batch_size=4))


def test_model_loss_of_a_sliced_model_equals_the_stitched_loss():
    """StitchedLoss.model_loss (used to accept or reject a re-fit) scores a physically sliced model
    exactly as the search scored its stitched twin."""
    from ziplm_ext.stages.search.objective import StitchedLoss

    model = make_model("llama").float()
    ids = calib()
    db = build_database(model, make_batches(ids, None, batch_size=4), damp=0.01)
    loss = StitchedLoss(model, db, ids[:4])
    widths = {n: max(1, db[n].layer.num_structures // 2) for n in db.names()}
    stitched = loss(widths)
    assert stitched > 1e-6
    assert loss.model_loss(build_pruned_model(model, db, widths)) == pytest.approx(stitched, rel=1e-4)
