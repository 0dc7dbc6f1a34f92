"""Cached decoding of physically pruned causal LMs is exact.

ZipLM removes whole attention heads / KV groups, FFN neurons and, at high compression, whole
attention or FFN modules of a block.  A removed attention module no longer writes keys and
values, yet HF caches derive the number of processed tokens (position ids, causal-mask
sizes) from one layer's stored keys.  These tests check, in float64 on tiny random models
(LLaMA with grouped-query attention and GPT-2), for every pattern of removed structures:

* one cached decode step equals the last row of a full forward on prompt + token;
* ``model.generate`` (greedy, with its KV cache) gives exactly the tokens of greedy decoding
  by repeated full forwards without a cache;
* both still hold after ``save_pruned`` / ``load_pruned``.

The cache is always passed with the keyword that the installed transformers uses
(:func:`ziplm_ext.adapters.base.cache_kwargs`); passing a deprecated keyword is an error
here.  Attention runs as SDPA: HF's *eager* LLaMA attention computes the softmax in float32,
so it is not float64-exact even for the dense model.
"""

from __future__ import annotations

import warnings
import zlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ziplm_ext.adapters import get_adapter  # noqa: E402
from ziplm_ext.adapters.base import ConstantOutput, cache_keyword, cache_kwargs, find_kv_cache, output_cache
from ziplm_ext.io.export import load_pruned, save_pruned  # noqa: E402

VOCAB = 61
N_LAYERS = 3
PROMPT = 7
NEW_TOKENS = 32


def randomize(model) -> None:
    """Weights drawn here, one generator per parameter name, so that the tiny models (and the
    tokens they generate) do not depend on transformers' init code or parameter order: matrices
    and embeddings N(0, 0.3^2), biases N(0, 0.2^2), norm weights 1 + N(0, 0.2^2)."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith("bias"):
                p.copy_(0.2 * r)
            elif p.dim() == 1:  # LayerNorm / RMSNorm weight
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(0.3 * r)


def make_model(arch: str):
    if arch == "llama":  # GQA: 4 query heads share 2 KV heads (2 structures per attention)
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=N_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:  # 4 heads of size 8; lm_head tied to the token embedding
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_head=4, n_inner=24, n_layer=N_LAYERS, n_positions=128,
            bos_token_id=None, eos_token_id=None,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "sdpa"
    model = model.to(torch.float64).eval()
    randomize(model)
    return model


# pattern name -> {layer name: kept structure indices}; [] removes the whole module.  An
# attention keep list is given per family: LLaMA attention has 2 structures (KV groups, each
# with its 2 query heads), GPT-2 attention 4 (heads); every FFN has 24 neurons.
PATTERNS = {
    "attn_removed_first": {"blocks.0.attn": []},
    "attn_removed_last": {f"blocks.{N_LAYERS - 1}.attn": []},
    "attn_removed_all": {f"blocks.{b}.attn": [] for b in range(N_LAYERS)},
    "ffn_removed": {"blocks.0.ffn": [], "blocks.2.ffn": []},
    "partial_widths": {
        "blocks.0.attn": {"llama": [1], "gpt2": [0, 2, 3]},
        "blocks.1.attn": {"llama": [0], "gpt2": [1]},
        "blocks.0.ffn": [0, 3, 4, 10, 17, 23],
        "blocks.2.ffn": list(range(0, 24, 3)),
    },
    "mixed": {
        "blocks.0.attn": [],
        "blocks.0.ffn": list(range(0, 24, 2)),
        "blocks.1.attn": {"llama": [1], "gpt2": [0, 3]},
        "blocks.2.attn": {"llama": [0], "gpt2": [1, 2]},
        "blocks.2.ffn": [],
    },
}

CASES = [(arch, pat) for arch in ("llama", "gpt2") for pat in PATTERNS]


def prune(model, arch: str, pattern: dict) -> None:
    adapter = get_adapter(model)
    layers = {l.name: l for l in adapter.prunable_layers(model)}
    for name, keep in pattern.items():
        keep = keep[arch] if isinstance(keep, dict) else keep
        adapter.slice(model, layers[name], keep)
        assert adapter.current_count(model, layers[name]) == len(keep)
        assert adapter.is_removed(model, layers[name]) == (not keep)


def prompt_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(seed))


def check_decode_step(model) -> None:
    ids = prompt_ids()
    nxt = torch.randint(0, VOCAB, (2, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*deprecated.*", category=FutureWarning)
        full = model(input_ids=torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1]
        pre = model(input_ids=ids, use_cache=True)
        cache = output_cache(pre)
        step = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, cache))
        prompt_only = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pre.logits, prompt_only, rtol=1e-10, atol=1e-10)
    assert output_cache(step) is cache and cache.get_seq_length() == PROMPT + 1


def greedy_full_forward(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


def generate(model, ids: torch.Tensor):
    """Greedy ``model.generate``: ``(sequences, the KV cache it decoded with)``."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*deprecated.*", category=FutureWarning)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=0, return_dict_in_generate=True,
        )
    return out.sequences, output_cache(out)


def check_generate(model) -> torch.Tensor:
    ids = prompt_ids()
    got, cache = generate(model, ids)
    assert got.shape == (2, PROMPT + NEW_TOKENS)
    ref = greedy_full_forward(model, ids, NEW_TOKENS)
    assert torch.equal(got, ref), f"generate {got[:, PROMPT:].tolist()} != full forwards {ref[:, PROMPT:].tolist()}"
    # generate really decoded with a KV cache, one entry per fed token.  (generate derives
    # position ids from the attention mask, so its tokens alone can survive a cache that
    # lost count of the tokens; the direct decode step above does not.)
    assert cache is not None and cache.get_seq_length() == PROMPT + NEW_TOKENS - 1
    # the comparison means something only if decoding is not stuck on one token (with every
    # attention removed the model is a bigram model, and one prompt may run into a fixed point)
    assert len(set(got[:, PROMPT:].flatten().tolist())) >= 2
    return got


def pruned_model(arch: str, pattern: str):
    model = make_model(arch)
    prune(model, arch, PATTERNS[pattern])
    return model


@pytest.mark.parametrize("arch,pattern", CASES)
def test_cached_decode_step_equals_full_forward(arch, pattern):
    check_decode_step(pruned_model(arch, pattern))


@pytest.mark.parametrize("arch,pattern", CASES)
def test_generate_equals_greedy_full_forwards(arch, pattern):
    check_generate(pruned_model(arch, pattern))


@pytest.mark.parametrize("arch,pattern", CASES)
def test_exact_after_save_and_load(arch, pattern, tmp_path):
    model = pruned_model(arch, pattern)
    save_pruned(model, tmp_path / "m")
    loaded = load_pruned(tmp_path / "m")
    assert get_adapter(loaded).shapes(loaded) == get_adapter(model).shapes(model)
    ids = prompt_ids()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)  # bit-exact
    check_decode_step(loaded)
    check_generate(loaded)


def test_bert_decoder_with_removed_attention_decodes_exactly():
    # BERT as a causal decoder (BertLMHeadModel) uses the same cache bookkeeping
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        intermediate_size=24, max_position_embeddings=128, is_decoder=True,
    )
    cfg._attn_implementation = "sdpa"
    model = transformers.BertLMHeadModel(cfg).to(torch.float64).eval()
    adapter = get_adapter(model)
    layers = {l.name: l for l in adapter.prunable_layers(model)}
    adapter.slice(model, layers["blocks.0.attn"], [])
    adapter.slice(model, layers["blocks.1.attn"], [0, 3])
    adapter.slice(model, layers["blocks.2.ffn"], [])
    check_decode_step(model)


def test_removed_attention_finds_the_cache_under_any_keyword():
    # older 5.x releases pass the cache as `past_key_values=`, newer ones as `cache=`; a
    # removed attention module must extend its cache layer either way (also positionally)
    h = torch.randn(2, 5, 32, dtype=torch.float64)
    calls = [
        lambda m, c: m(hidden_states=h, cache=c),
        lambda m, c: m(hidden_states=h, past_key_values=c),
        lambda m, c: m(h, c),
        lambda m, c: m(h, None, attention_mask=None, layer_past=c),
    ]
    for call in calls:
        mod = ConstantOutput(32, None, returns_tuple=True, touches_cache=True, layer_idx=1)
        cache = transformers.DynamicCache()
        out, weights = call(mod, cache)
        assert weights is None and out.shape == h.shape and not out.any()
        assert cache.get_seq_length(1) == 5
        assert cache.get_seq_length(0) == 0  # only its own layer is touched
    enc_dec = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    ConstantOutput(32, None, returns_tuple=True, touches_cache=True, layer_idx=0)(h, cache=enc_dec)
    assert enc_dec.self_attention_cache.get_seq_length() == 5
    assert enc_dec.cross_attention_cache.get_seq_length() == 0
    # no cache, or a module that does not touch caches: nothing happens
    cache = transformers.DynamicCache()
    ConstantOutput(32, None)(h, cache=cache)
    assert cache.get_seq_length() == 0
    assert find_kv_cache((h,), {"use_cache": True, "attention_mask": None}) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cache_keyword_matches_the_installed_transformers(arch):
    import inspect

    model = make_model(arch)
    kw = cache_keyword(model)
    assert kw in inspect.signature(model.forward).parameters
    assert list(cache_kwargs(model, "x")) == [kw]
    # the output object carries the cache under the same name
    with torch.no_grad():
        out = model(input_ids=prompt_ids(), use_cache=True)
    assert kw in type(out).__dataclass_fields__
    assert output_cache(out) is getattr(out, kw)
    assert output_cache(out).get_seq_length() == PROMPT
