"""The stitched-model loss with block-output reuse equals the full forward's loss.

The search's objective (ZipLM paper, structured SPDY search) reuses the outputs of the blocks
before the first one whose widths changed. Checked on tiny LLaMA (GQA, rotary), GPT-2 (Conv1D,
learned positions) and BERT (encoder, last hidden states) models: over a sequence of random
allocations the reusing loss equals the loss with no reuse and the loss of an independently
stitched copy run end to end, while running fewer blocks.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

from ziplm_ext.adapters import get_adapter
from ziplm_ext.eval.metrics import kl_terms
from ziplm_ext.stages.calibrate import make_batches
from ziplm_ext.stages.database import build_database
from ziplm_ext.stages.search.objective import StitchedLoss


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=4, n_positions=64, n_inner=20)
    return transformers.GPT2LMHeadModel(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=20, max_position_embeddings=64)
    return transformers.BertModel(cfg)


def _setup(make, seed=0):
    torch.manual_seed(seed)
    model = make().eval().requires_grad_(False)
    ids = torch.randint(0, 97, (6, 12), generator=torch.Generator().manual_seed(seed + 1))
    db = build_database(model, make_batches(ids, None, 4), progress=False)
    return model, ids, db


def _random_allocations(db, n, seed):
    """A walk through allocations: each step changes one or two random layers (as local moves do),
    sometimes all of them (as a new SPDY proposal does)."""
    rng = np.random.default_rng(seed)
    names = db.names()
    cur = {nm: int(db[nm].layer.num_structures) for nm in names}
    out = [dict(cur)]
    for step in range(n):
        changed = names if step % 5 == 4 else list(rng.choice(names, size=int(rng.integers(1, 3)), replace=False))
        for nm in changed:
            cur[nm] = int(rng.choice(db[nm].grid))
        out.append(dict(cur))
    return out


def _end_to_end(model, db, ids, widths, causal):
    """The stitched copy built and run independently: set every layer's weights, one full forward."""
    m = copy.deepcopy(model)
    ad = get_adapter(m)
    layers = {l.name: l for l in ad.prunable_layers(m)}
    for nm, c in widths.items():
        ad.set_weight(m, layers[nm], db.weights(nm, c))
    with torch.no_grad():
        if causal:
            ref = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            out = torch.log_softmax(m(input_ids=ids).logits.float(), -1)
            return float(kl_terms(ref, out).sum()) / (ids.shape[0] * ids.shape[1])
        ref, out = model(input_ids=ids).last_hidden_state, m(input_ids=ids).last_hidden_state
        return float(((out - ref) ** 2).sum() / (ref**2).sum())


@pytest.mark.parametrize("make,causal", [(_llama, True), (_gpt2, True), (_bert, False)],
                         ids=["llama", "gpt2", "bert"])
def test_cached_loss_equals_uncached(make, causal):
    model, ids, db = _setup(make)
    cached = StitchedLoss(model, db, ids, batch_size=4, prefixes=3)
    plain = StitchedLoss(model, db, ids, batch_size=4, prefixes=0)
    allocs = _random_allocations(db, 24, seed=3)
    for w in allocs + allocs[::-3]:  # revisits: prefixes stored long ago
        a, b = cached(w), plain(w)
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), w
    assert plain.stats["blocks_run"] == plain.stats["blocks_total"]
    assert cached.stats["blocks_run"] < 0.8 * cached.stats["blocks_total"]
    # the loss is the stitched model's own: an independent end-to-end forward (one batch) agrees
    one = StitchedLoss(model, db, ids, batch_size=8, prefixes=2)
    for w in allocs[:6]:
        assert one(w) == pytest.approx(_end_to_end(model, db, ids, w, causal), rel=1e-5, abs=1e-8)
    assert one.stats["blocks_run"] < one.stats["blocks_total"]


def test_cache_distinguishes_prefixes():
    """Same widths from block k on, different before it: block k must be re-run, not replayed."""
    model, ids, db = _setup(_llama, seed=4)
    loss = StitchedLoss(model, db, ids, batch_size=8, prefixes=4)
    plain = StitchedLoss(model, db, ids, batch_size=8, prefixes=0)
    full = {nm: int(db[nm].layer.num_structures) for nm in db.names()}
    a = dict(full, **{"blocks.3.ffn": int(db["blocks.3.ffn"].grid[1])})
    b = dict(a, **{"blocks.0.attn": 1})
    for w in (full, a, b, a, full, b):
        assert loss(w) == pytest.approx(plain(w), rel=1e-6, abs=1e-9)
    assert loss(a) != loss(b)


def test_prefixes_validated():
    model, ids, db = _setup(_gpt2, seed=5)
    with pytest.raises(ValueError, match="prefixes"):
        StitchedLoss(model, db, ids, prefixes=-1)
