"""Adapter tests: physical slicing must equal the dense model with the removed structures zeroed.

Definition used throughout: a structure is removed in the dense reference by zeroing its
``group_size`` input columns of the out projection (``adapter.set_weight``).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from ziplm_ext.adapters import BertAdapter, GPT2Adapter, LlamaAdapter, RemovedModule, UnsupportedArchitectureError, get_adapter
from ziplm_ext.adapters.base import cache_kwargs, output_cache  # noqa: E402

VOCAB = 97


def make_model(arch: str, dtype=torch.float32, attn_impl: str = "eager"):
    torch.manual_seed(0)
    if arch == "bert":
        cfg = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64,
        )
        cls = transformers.BertModel
    elif arch == "bert_cls":
        cfg = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, num_labels=3,
        )
        cls = transformers.BertForSequenceClassification
    elif arch in ("gpt2", "gpt2_base"):
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)
        cls = transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.GPT2Model
    elif arch in ("llama", "llama_base"):
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
        cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.LlamaModel
    elif arch == "llama_mha":
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        )
        cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        cfg = transformers.MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
        cls = transformers.MistralForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
        cls = transformers.Qwen2ForCausalLM
    else:  # pragma: no cover
        raise ValueError(arch)
    cfg._attn_implementation = attn_impl
    model = cls(cfg).to(dtype).eval()
    # random non-trivial biases / norms so that "removed module == bias" is really tested
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_inputs(arch: str, seed: int = 1, left_pad: bool = False):
    """Batch with padding.  Left padding (causal LMs) only on request: HF's *dense* eager LLaMA
    in float64 already yields NaN for left-padded rows (fully masked query rows), which would
    make the comparison meaningless; the sdpa path handles it and is tested with left padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    if left_pad and not arch.startswith("bert"):
        mask[2, :3] = 0
    else:
        mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    t = out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
    return t


def zero_removed(adapter, ref, layer, alive_orig, n_dense):
    """Zero the out-projection input columns of the dense structures not in ``alive_orig``."""
    W = adapter.get_weight(ref, layer)
    gs = layer.group_size
    for s in range(n_dense):
        if s not in alive_orig:
            W[:, s * gs:(s + 1) * gs] = 0
    adapter.set_weight(ref, layer, W)


def random_plan(adapter, model, rng, rounds=1):
    """Per layer: list of successive keep lists (indices into the then-current structures)."""
    layers = adapter.prunable_layers(model)
    plan = {}
    forced = {0: ("attn", []), 1: ("ffn", []), 2: ("attn", "all")}
    for layer in layers:
        steps = []
        n = layer.num_structures
        for r in range(rounds):
            f = forced.get(layer.block)
            if r == 0 and f is not None and f[0] == layer.kind:
                keep = list(range(n)) if f[1] == "all" else []
            else:
                k = rng.randint(1, max(1, n - 1))
                keep = sorted(rng.sample(range(n), k))
            steps.append(keep)
            n = len(keep)
            if n == 0:
                break
        plan[layer.name] = steps
    return plan


def apply_plan(adapter, model, ref, plan):
    for layer in adapter.prunable_layers(model):
        alive = list(range(layer.num_structures))
        for keep in plan[layer.name]:
            adapter.slice(model, layer, keep)
            alive = [alive[i] for i in keep]
        zero_removed(adapter, ref, layer, set(alive), layer.num_structures)
        assert adapter.shapes(model)[layer.name] == len(alive)


ARCHS = ["bert", "gpt2", "llama", "mistral", "qwen2", "llama_mha"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rounds", [1, 2])
def test_slicing_is_exact(arch, dtype, rounds):
    model = make_model(arch, dtype)
    ref = copy.deepcopy(model)
    adapter = get_adapter(model)
    plan = random_plan(adapter, model, random.Random(hash((arch, rounds)) % 1000), rounds=rounds)
    apply_plan(adapter, model, ref, plan)
    inputs = make_inputs(arch)
    got, want = outputs(model, inputs), outputs(ref, inputs)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **tol)
    # physically smaller
    n_dense = sum(p.numel() for p in ref.parameters())
    n_pruned = sum(p.numel() for p in model.parameters())
    assert n_pruned < n_dense
    # removed modules really were replaced
    assert isinstance(adapter.out_proj(model, adapter.prunable_layers(model)[0]), RemovedModule)
    assert isinstance(adapter.out_proj(model, adapter.prunable_layers(model)[3]), RemovedModule)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_slicing_exact_attn_impls_and_seeds(arch, attn_impl):
    for seed in range(3):
        model = make_model(arch, torch.float64, attn_impl=attn_impl)
        ref = copy.deepcopy(model)
        adapter = get_adapter(model)
        rng = random.Random(seed)
        for layer in adapter.prunable_layers(model):
            n = layer.num_structures
            keep = sorted(rng.sample(range(n), rng.randint(0, n)))
            adapter.slice(model, layer, keep)
            zero_removed(adapter, ref, layer, set(keep), n)
        inputs = make_inputs(arch, seed, left_pad=attn_impl == "sdpa")
        want = outputs(ref, inputs)
        assert not want.isnan().any()
        torch.testing.assert_close(outputs(model, inputs), want, rtol=1e-10, atol=1e-10)


def test_all_removed_everywhere():
    for arch in ["bert", "gpt2", "llama"]:
        model = make_model(arch, torch.float64)
        ref = copy.deepcopy(model)
        adapter = get_adapter(model)
        for layer in adapter.prunable_layers(model):
            adapter.slice(model, layer, [])
            adapter.slice(model, layer, [])  # removing again is a no-op
            zero_removed(adapter, ref, layer, set(), layer.num_structures)
        assert set(adapter.shapes(model).values()) == {0}
        torch.testing.assert_close(outputs(model, make_inputs(arch)), outputs(ref, make_inputs(arch)),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_with_removed_attention(arch):
    """Incremental decoding must match a full forward, also when block 0's attention is removed."""
    # SDPA: HF's eager LLaMA attention takes the softmax in float32 (~1e-8 even for a dense model)
    model = make_model(arch, torch.float64, attn_impl="sdpa")
    adapter = get_adapter(model)
    layers = adapter.prunable_layers(model)
    adapter.slice(model, layers[0], [])  # blocks.0.attn removed
    adapter.slice(model, layers[2], [1])  # blocks.1.attn partially kept
    adapter.slice(model, layers[3], [0, 5, 7])
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :5], use_cache=True)
        past = output_cache(out)
        assert past.get_seq_length() == 5
        steps = [out.logits]
        for t in range(5, 8):
            out = model(input_ids=ids[:, t:t + 1], **cache_kwargs(model, past), use_cache=True)
            past = output_cache(out)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_get_set_weight_roundtrip_and_shapes(arch):
    model = make_model(arch)
    adapter = get_adapter(model)
    cfg = model.config
    layers = adapter.prunable_layers(model)
    assert [l.name for l in layers[:2]] == ["blocks.0.attn", "blocks.0.ffn"]
    assert len(layers) == 2 * cfg.num_hidden_layers
    hidden = cfg.hidden_size
    for layer in layers:
        W = adapter.get_weight(model, layer)
        assert W.shape == (hidden, layer.num_structures * layer.group_size)
        W2 = torch.randn_like(W)
        adapter.set_weight(model, layer, W2)
        assert torch.equal(adapter.get_weight(model, layer), W2)
        W2[0, 0] += 1  # get_weight returns a copy
        assert not torch.equal(adapter.get_weight(model, layer), W2)
        with pytest.raises(ValueError):
            adapter.set_weight(model, layer, W2[:, :-1])
    shapes = adapter.shapes(model)
    assert shapes == {l.name: l.num_structures for l in layers}
    # out_proj identity survives a partial slice (hooks keep working)
    l0 = layers[0]
    mod = adapter.out_proj(model, l0)
    keep0 = [0, 2] if l0.num_structures > 2 else [1]
    adapter.slice(model, l0, keep0)
    assert adapter.out_proj(model, l0) is mod
    assert adapter.get_weight(model, l0).shape == (hidden, len(keep0) * l0.group_size)
    assert adapter.shapes(model)["blocks.0.attn"] == len(keep0)
    # dense counts still reported by prunable_layers
    assert adapter.prunable_layers(model)[0].num_structures == l0.num_structures
    adapter.slice(model, l0, [])
    assert adapter.get_weight(model, l0).shape == (hidden, 0)
    assert adapter.shapes(model)["blocks.0.attn"] == 0
    with pytest.raises(ValueError):
        adapter.slice(model, l0, [0])
    with pytest.raises(ValueError):
        adapter.slice(model, layers[1], [3, 1])
    with pytest.raises(ValueError):
        adapter.slice(model, layers[1], [10_000])


def test_gpt2_conv1d_transpose():
    model = make_model("gpt2")
    adapter = get_adapter(model)
    layer = adapter.prunable_layers(model)[0]
    assert torch.equal(adapter.get_weight(model, layer), model.transformer.h[0].attn.c_proj.weight.t())
    assert adapter.out_proj(model, adapter.prunable_layers(model)[1]) is model.transformer.h[0].mlp.c_proj


def test_llama_gqa_group_size():
    model = make_model("llama")
    adapter = get_adapter(model)
    attn = adapter.prunable_layers(model)[0]
    assert attn.num_structures == 2 and attn.group_size == 2 * 8
    adapter.slice(model, attn, [1])
    sa = model.model.layers[0].self_attn
    assert sa.q_proj.out_features == 16 and sa.k_proj.out_features == 8 and sa.v_proj.out_features == 8
    assert sa.o_proj.in_features == 16


@pytest.mark.parametrize("arch,cls,blocks_attr", [
    ("bert", BertAdapter, lambda m: m.encoder.layer),
    ("bert_cls", BertAdapter, lambda m: m.bert.encoder.layer),
    ("gpt2", GPT2Adapter, lambda m: m.transformer.h),
    ("gpt2_base", GPT2Adapter, lambda m: m.h),
    ("llama", LlamaAdapter, lambda m: m.model.layers),
    ("llama_base", LlamaAdapter, lambda m: m.layers),
])
def test_get_adapter_and_blocks(arch, cls, blocks_attr):
    model = make_model(arch)
    adapter = get_adapter(model)
    assert isinstance(adapter, cls) and adapter.family in ("bert", "gpt2", "llama")
    assert adapter.blocks(model) == list(blocks_attr(model))


def test_slicing_exact_on_head_models():
    for arch in ["bert_cls", "gpt2_base", "llama_base"]:
        model = make_model(arch, torch.float64)
        ref = copy.deepcopy(model)
        adapter = get_adapter(model)
        plan = random_plan(adapter, model, random.Random(5))
        apply_plan(adapter, model, ref, plan)
        inputs = make_inputs(arch)
        with torch.no_grad():
            a, b = model(**inputs), ref(**inputs)
        key = "logits" if arch == "bert_cls" else "last_hidden_state"
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10)


def test_keeps_dtype_and_device():
    model = make_model("llama", torch.float64)
    adapter = get_adapter(model)
    for layer in adapter.prunable_layers(model):
        adapter.slice(model, layer, [0] if layer.block != 2 else [])
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_unsupported_architecture():
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_adapter(nn.Linear(2, 2))
    msg = str(e.value)
    assert "Linear" in msg and "bert" in msg and "gpt2" in msg and "llama" in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)
    t5 = transformers.T5Model(transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                    num_heads=2))
    with pytest.raises(UnsupportedArchitectureError, match="T5Model"):
        get_adapter(t5)
