"""GGUF export (llama.cpp ``deci`` architecture) of dense and ZipLM-pruned LLaMA models, and the
llama.cpp engine.

Parity with PyTorch, on a tiny random LLaMA with grouped-query attention and on the real SmolLM2
(different KV groups and FFN widths per block, block 0's attention removed, a block whose FFN is
removed while its attention stays, a block with both removed):

* logits at every position: F32 within ``F32_BUDGET`` of PyTorch float32 (relative to the largest
  logit); F16 within ``F16_BUDGET`` of PyTorch run with the same F16-rounded weights (llama.cpp
  also rounds the activations of F16 matrix products to F16, PyTorch does not);
* greedy generation of 32 tokens identical (F32);
* perplexity through llama.cpp equal to PyTorch's within 1% (SmolLM2: held-out Wikipedia split);
* Q8_0 (llama.cpp's quantiser) loads and its perplexity is reported, not compared bit for bit
  (unrepaired pruned models are sensitive to rounding).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

HINT = "needs the llamacpp extra: pip install .[llamacpp]"
pytest.importorskip("gguf", reason=HINT)
pytest.importorskip("llama_cpp", reason=HINT)
transformers = pytest.importorskip("transformers")

from ziplm_ext.adapters import get_adapter  # noqa: E402
from ziplm_ext.adapters.shapes import model_shapes  # noqa: E402
from ziplm_ext.deploy.gguf import export_gguf, require_gguf  # noqa: E402
from ziplm_ext.engines.llamacpp import LlamaCppEngine, LlamaCppModel  # noqa: E402
from ziplm_ext.env import InferenceEnv  # noqa: E402
from ziplm_ext.eval.metrics import perplexity  # noqa: E402

F32_BUDGET = 1e-4  # max |logit difference| / max |logit|, F32 GGUF vs PyTorch float32
F16_BUDGET = 2e-2  # the same, F16 GGUF vs PyTorch with F16-rounded weights
PPL_RTOL = 0.01
NEW_TOKENS = 32


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def prune(model, widths: dict) -> None:
    """Slice `model` to `widths` {(block, kind): kept count} (leading structures kept; 0 removes)."""
    adapter = get_adapter(model)
    for layer in adapter.prunable_layers(model):
        k = widths.get((layer.block, layer.kind))
        if k is not None:
            adapter.slice(model, layer, list(range(k)))


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def torch_greedy(model, ids, n: int) -> list:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def f16_rounded(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return m


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def load(path, n_ctx: int = 256) -> LlamaCppModel:
    return LlamaCppModel(path, n_ctx=n_ctx, threads=2, kv_f32=True)


# --------------------------------------------------------------------------------------
# tiny random LLaMA (GQA: 4 query heads, 2 KV groups)
# --------------------------------------------------------------------------------------

TINY_VOCAB = 300
TINY_PRUNED = {  # (block, kind): kept structures; attention: KV groups of 2, FFN: neurons of 96
    (0, "attn"): 0, (0, "ffn"): 40,
    (1, "attn"): 1, (1, "ffn"): 0,  # FFN removed, attention present
    (2, "attn"): 0, (2, "ffn"): 0,  # identity block
    (3, "attn"): 2, (3, "ffn"): 17,
    (4, "attn"): 0, (4, "ffn"): 0,  # last block empty
}


def tiny_llama(pruned: bool):
    cfg = transformers.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_theta=10000.0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * r if p.dim() == 1 else r / math.sqrt(p.shape[-1]) * (3 if "embed" not in name else 1))
    if pruned:
        prune(model, TINY_PRUNED)
    return model


@pytest.fixture(scope="module", params=["dense", "pruned"])
def tiny(request, tmp_path_factory):
    model = tiny_llama(request.param == "pruned")
    d = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return model, export_gguf(model, d / "f32.gguf"), export_gguf(model, d / "f16.gguf", dtype="f16")


def tiny_ids(n: int = 48, seed: int = 1) -> list:
    return torch.randint(0, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_tiny_logits_every_position(tiny):
    model, f32, f16 = tiny
    ids = tiny_ids()
    ref = torch_logits(model, ids)
    assert rel_err(load(f32).logits(ids), ref) <= F32_BUDGET
    assert rel_err(load(f16).logits(ids), torch_logits(f16_rounded(model), ids)) <= F16_BUDGET


def test_tiny_greedy_generation_identical(tiny):
    model, f32, _ = tiny
    prompt = tiny_ids(8, seed=2)
    assert load(f32).generate(prompt, NEW_TOKENS) == torch_greedy(model, prompt, NEW_TOKENS)


def test_tiny_perplexity(tiny):
    model, f32, _ = tiny
    blocks = torch.randint(0, TINY_VOCAB, (3, 40), generator=torch.Generator().manual_seed(3))
    assert load(f32).perplexity(blocks.numpy()) == pytest.approx(perplexity(model, blocks), rel=PPL_RTOL)


def test_pruned_widths_are_written_per_block(tmp_path):
    model = tiny_llama(pruned=True)
    path = export_gguf(model, tmp_path / "m.gguf")
    fields = require_gguf().GGUFReader(str(path)).fields
    arr = {k: list(fields[f"deci.{k}"].contents()) for k in ("attention.head_count", "attention.head_count_kv",
                                                            "feed_forward_length")}
    # block 0: zero one-head attention; block 1: one-neuron FFN (attention present); last: one neuron
    assert arr == {"attention.head_count": [1, 2, 0, 4, 0], "attention.head_count_kv": [1, 1, 0, 2, 0],
                   "feed_forward_length": [40, 1, 0, 17, 1]}
    assert fields["deci.attention.key_length"].contents() == 16 == fields["deci.rope.dimension_count"].contents()
    assert fields["general.architecture"].contents() == "deci"


def test_export_is_atomic_and_errors_are_clear(tmp_path):
    model = tiny_llama(pruned=False)
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous")
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(model, target, dtype="bf16")
    with pytest.raises(ValueError, match="quantisation"):
        export_gguf(model, target, quant="q3")
    with pytest.raises(ValueError, match="tokens but the model"):  # SmolLM2's 49152 tokens, 300 rows
        from ziplm_ext.io.models import smollm2_path

        d, name = smollm2_path()
        export_gguf(model, target, tokenizer=d / name)
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=16))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    for m in (bert, gpt2):
        with pytest.raises(ValueError, match="LLaMA-family"):
            export_gguf(m, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


# --------------------------------------------------------------------------------------
# the real SmolLM2 (dense and pruned)
# --------------------------------------------------------------------------------------


def smollm2_widths(n_layers: int) -> dict:
    """KV groups (of 3) and FFN widths (of 1536) that differ per block; block 0 without attention,
    block 5 without FFN (attention kept), block 11 empty."""
    w = {}
    for b in range(n_layers):
        w[(b, "attn")] = (3, 2, 1)[b % 3]
        w[(b, "ffn")] = (1536, 1280, 1024, 768)[b % 4]
    w[(0, "attn")] = 0
    w[(5, "ffn")] = 0
    w[(11, "attn")] = w[(11, "ffn")] = 0
    return w


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from ziplm_ext.eval.data import token_blocks, wiki_split
    from ziplm_ext.io.models import load_smollm2

    dense, tok = load_smollm2()
    pruned = copy.deepcopy(dense)
    prune(pruned, smollm2_widths(dense.config.num_hidden_layers))
    d = tmp_path_factory.mktemp("smollm2")
    held_out = token_blocks(wiki_split("eval"), tok, 128, 2, seed=0)
    return dict(dense=dense, pruned=pruned, tok=tok, dir=d, blocks=held_out,
                dense_f32=export_gguf(dense, d / "dense.gguf", tokenizer=tok),
                pruned_f32=export_gguf(pruned, d / "pruned.gguf", tokenizer=tok))


def text_ids(tok, n: int = 64) -> list:
    text = "The history of the city begins in the twelfth century, when a small market town grew up around"
    ids = tok(text * 4, add_special_tokens=False).input_ids
    return ids[:n]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_smollm2_logits_generation_perplexity(smollm2, which):
    model, path, tok = smollm2[which], smollm2[f"{which}_f32"], smollm2["tok"]
    lm = load(path)
    ids = text_ids(tok)
    got, ref = lm.logits(ids), torch_logits(model, ids)
    assert rel_err(got, ref) <= F32_BUDGET
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert lm.generate(ids[:16], NEW_TOKENS) == torch_greedy(model, ids[:16], NEW_TOKENS)
    ppl_ref = perplexity(model, smollm2["blocks"])
    assert lm.perplexity(smollm2["blocks"].numpy()) == pytest.approx(ppl_ref, rel=PPL_RTOL)


@pytest.mark.slow
def test_smollm2_tokenizer_carried_over(smollm2):
    lm = load(smollm2["pruned_f32"])
    lc = lm._lc
    vocab = lc.llama_model_get_vocab(lm.model)
    text = "Structured pruning keeps whole heads."
    buf = (lc.llama_token * 64)()
    n = lc.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 64, False, False)
    assert list(buf[:n]) == smollm2["tok"](text, add_special_tokens=False).input_ids
    fields = require_gguf().GGUFReader(str(smollm2["pruned_f32"])).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm" and "tokenizer.chat_template" in fields


@pytest.mark.slow
def test_smollm2_pruned_f16_and_q8_0(smollm2):
    pruned, d, tok = smollm2["pruned"], smollm2["dir"], smollm2["tok"]
    f16 = export_gguf(pruned, d / "pruned-f16.gguf", tokenizer=tok, dtype="f16")
    ids = text_ids(tok)
    assert rel_err(load(f16).logits(ids), torch_logits(f16_rounded(pruned), ids)) <= F16_BUDGET
    q8 = export_gguf(pruned, d / "pruned-q8_0.gguf", tokenizer=tok, quant="q8_0")
    assert q8.stat().st_size < 0.4 * smollm2["pruned_f32"].stat().st_size
    ppl_q8 = load(q8).perplexity(smollm2["blocks"].numpy())
    ppl_ref = perplexity(pruned, smollm2["blocks"])
    print(f"\npruned SmolLM2 perplexity: PyTorch F32 {ppl_ref:.3f}, llama.cpp Q8_0 {ppl_q8:.3f}")
    assert math.isfinite(ppl_q8) and ppl_q8 < 2 * ppl_ref


# --------------------------------------------------------------------------------------
# the llama.cpp engine
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_engine_times_tiny_models(mode, tmp_path):
    dense, pruned = tiny_llama(False), tiny_llama(True)
    env = InferenceEnv(engine="llama.cpp", threads=1, mode=mode, batch_size=2, seq_len=16)
    eng = LlamaCppEngine()
    t = eng.model_time(dense, env, reps=3, warmup=1)
    assert math.isfinite(t) and t > 0
    (s,) = eng.speedups(dense, [pruned], env, rounds=2, reps_per_round=2, warmup=1)
    assert math.isfinite(s) and s > 0
    path = export_gguf(pruned, tmp_path / "p.gguf")
    assert eng.model_time(path, env, reps=2, warmup=0) > 0  # an exported artefact is timed as it is
    timer = eng.block_timer(model_shapes(dense.config), env)
    for kind, width in (("attn", 1), ("ffn", 48)):
        times = timer.time_block(kind, width, warmup=1, reps=3)
        assert times.shape == (3,) and bool(torch.isfinite(times).all()) and bool((times >= 0).all())


def test_engine_rejects_what_it_cannot_run():
    eng = LlamaCppEngine()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="LLaMA-family"):
        eng.check(gpt2, InferenceEnv(engine="llama.cpp"))
    with pytest.raises(ValueError, match="float32 or float16"):
        eng.check(tiny_llama(False), InferenceEnv(engine="llama.cpp", dtype="bfloat16"))


@pytest.mark.slow
def test_engine_smollm2_half_the_blocks_removed_is_faster(smollm2):
    """Decode at a 32-token context, 1 thread: half of SmolLM2's blocks removed reads about half the
    block weights per token, so it must be faster (a margin far above timing noise)."""
    dense = smollm2["dense"]
    half = copy.deepcopy(dense)
    n = dense.config.num_hidden_layers
    prune(half, {(b, k): 0 for b in range(1, n, 2) for k in ("attn", "ffn")})
    env = InferenceEnv(engine="llama.cpp", threads=1, mode="decode", seq_len=32)
    (s,) = LlamaCppEngine().speedups(smollm2["dense_f32"], [half], env, rounds=3, reps_per_round=2, warmup=1)
    assert s > 1.1


@pytest.mark.slow
def test_hf_tokenizer_conversion_matches_the_gguf_vocabulary(smollm2):
    """SmolLM2's tokenizer converted from its HF form gives the GGUF file's tokens, types, merges and
    special ids (only the pre-tokenizer name differs: "default" instead of "smollm")."""
    from ziplm_ext.deploy.gguf import hf_tokenizer_fields, tokenizer_fields

    conv = {k: v for k, v, *_ in hf_tokenizer_fields(smollm2["tok"], 49152)}
    orig = {k: v for k, v, *_ in tokenizer_fields(smollm2["tok"], 49152)}
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id"):
        assert conv[f"tokenizer.ggml.{key}"] == orig[f"tokenizer.ggml.{key}"], key
    assert conv["tokenizer.ggml.model"] == orig["tokenizer.ggml.model"] == "gpt2"
