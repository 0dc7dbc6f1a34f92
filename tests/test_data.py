"""Tests for ziplm_ext.data / models / metrics (offline; real models only in @slow tests)."""

import json
import math
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from ziplm_ext.eval import data as D
from ziplm_ext.eval import metrics as X
from ziplm_ext.io import models as M

# The fixed held-out split (sha256 of salt + title, bucket < 10 of 100).  If this
# list changes, every eval number reported so far is no longer comparable:
# change it only on purpose (and bump SPLIT_SALT).
EXPECTED_EVAL_TITLES = [
    "Afroasiatic languages", "Abraham Lincoln", "Arraignment", "Analysis of variance",
    "Aristotle", "Animation", "American Revolutionary War", "Albania", "Aldous Huxley",
    "Abstract (law)", "Assistive technology",
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
class IntTok:
    """Fake tokenizer: "3 4 5" -> [3, 4, 5]; EOS id 999."""

    eos_token_id = 999
    sep_token_id = None

    def __call__(self, texts, add_special_tokens=False, verbose=True, **kw):
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}


class LenTok:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def tiny_gpt2(vocab=100):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(vocab=100):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def minilm_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(M.minilm_path()), local_files_only=True)


# --------------------------------------------------------------------------
# Wikipedia corpus and split
# --------------------------------------------------------------------------
def test_wiki_parse_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPLM_CACHE_DIR", str(tmp_path))
    t0 = time.perf_counter()
    arts = D.wiki_articles()
    parse_s = time.perf_counter() - t0
    files = list(tmp_path.glob("enwiki_short_*.json"))
    assert len(files) == 1
    assert D.last_parse_seconds() is not None
    t0 = time.perf_counter()
    again = D.wiki_articles()
    cached_s = time.perf_counter() - t0
    assert again == arts
    assert cached_s < parse_s
    print(f"\nwiki parse {parse_s:.2f}s, cached load {cached_s:.3f}s, {len(arts)} articles")
    # a corrupt cache is re-parsed, not trusted
    files[0].write_text("{not json", encoding="utf-8")
    assert D.wiki_articles() == arts


def test_wiki_texts_are_clean_natural_text():
    texts = D.wiki_texts()
    assert len(texts) >= 80
    joined = "\n\n".join(texts)
    for markup in ("'''", "[[", "]]", "{{", "}}", "<ref", "&nbsp;", "#REDIRECT"):
        assert markup not in joined, markup
    for t in texts:
        assert t == t.strip() and len(t) >= D.MIN_ARTICLE_CHARS
        for para in t.split("\n\n"):
            assert not para.startswith(("=", "*", "#", "|"))
            assert len(para) >= D.MIN_PARAGRAPH_CHARS
    # case and punctuation kept (not gensim's lower-cased tokens)
    assert "Anarchism is a political philosophy" in joined
    assert sum(c.isupper() for c in joined) > 10_000
    assert joined.count(". ") > 10_000 and joined.count(", ") > 10_000


def test_split_disjoint_complete_and_fixed():
    arts = D.wiki_articles()
    train = D.wiki_split_articles("train")
    ev = D.wiki_split_articles("eval")
    tt, et = {a["title"] for a in train}, {a["title"] for a in ev}
    assert not (tt & et)
    assert tt | et == {a["title"] for a in arts}
    assert len(tt) == len(train) and len(et) == len(ev)  # no duplicated article
    assert not ({a["text"] for a in train} & {a["text"] for a in ev})
    assert [a["title"] for a in ev] == EXPECTED_EVAL_TITLES
    assert D.wiki_split("eval") == [a["text"] for a in ev]
    assert D.wiki_split("train") == D.wiki_split("train")
    with pytest.raises(ValueError, match="split must be"):
        D.wiki_split("test")


def test_split_sizes_reasonable():
    n_train, n_eval = len(D.wiki_split("train")), len(D.wiki_split("eval"))
    c_train = sum(map(len, D.wiki_split("train")))
    c_eval = sum(map(len, D.wiki_split("eval")))
    frac = n_eval / (n_train + n_eval)
    print(f"\ntrain {n_train} articles {c_train} chars; eval {n_eval} articles {c_eval} chars")
    assert 0.05 <= frac <= 0.2
    assert c_train > 1_500_000 and c_eval > 200_000


def test_split_independent_of_python_hash_seed():
    code = ("from ziplm_ext.eval import data as D; import json;"
            "print(json.dumps([D.article_split(t) for t in ['Alabama','Aristotle','Zebra','x']]))")
    outs = []
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1] == [D.article_split(t) for t in ["Alabama", "Aristotle", "Zebra", "x"]]
    assert outs[0][:2] == ["train", "eval"]


# --------------------------------------------------------------------------
# token_blocks
# --------------------------------------------------------------------------
def test_token_blocks_exact_slices_of_stream():
    texts = [" ".join(str(i) for i in range(0, 50)), " ".join(str(i) for i in range(100, 130))]
    stream = list(range(0, 50)) + [999] + list(range(100, 130))  # EOS between documents
    b = D.token_blocks(texts, IntTok(), seq_len=8, num_blocks=6, seed=0)
    assert b.shape == (6, 8) and b.dtype == torch.long
    starts = []
    for row in b.tolist():
        k = stream.index(row[0])
        assert k % 8 == 0 and stream[k:k + 8] == row
        starts.append(k)
    assert len(set(starts)) == 6  # non-overlapping, no repeats
    assert torch.equal(b, D.token_blocks(texts, IntTok(), 8, 6, seed=0))
    assert not torch.equal(b, D.token_blocks(texts, IntTok(), 8, 6, seed=1))
    # all 10 available blocks -> every block once
    allb = D.token_blocks(texts, IntTok(), 8, 10, seed=3)
    assert sorted(r[0] for r in allb.tolist()) == [stream[8 * i] for i in range(10)]


def test_token_blocks_too_small_and_empty():
    with pytest.raises(ValueError, match=r"^calibration data too small: 10 tokens, need 20"):
        D.token_blocks(["0 1 2 3 4 5 6 7 8 9"], IntTok(), seq_len=10, num_blocks=2)
    with pytest.raises(ValueError, match="calibration data too small"):
        D.token_blocks([], IntTok(), 4, 1)
    with pytest.raises(ValueError, match="calibration data too small"):
        D.token_blocks(["", "   "], IntTok(), 4, 1)


def test_token_blocks_real_tokenizer(minilm_tok):
    ev = D.wiki_split("eval")
    b = D.token_blocks(ev, minilm_tok, seq_len=64, num_blocks=16, seed=0)
    assert b.shape == (16, 64)
    assert torch.equal(b, D.token_blocks(ev, minilm_tok, 64, 16, seed=0))
    assert int(b.max()) < len(minilm_tok) and int(b.min()) >= 0
    # BERT has no EOS: SEP separates documents; no CLS inside the stream
    assert minilm_tok.cls_token_id not in b.unique().tolist()


# --------------------------------------------------------------------------
# sentence_batches / read_text_file
# --------------------------------------------------------------------------
def test_sentence_batches(minilm_tok):
    tr = D.wiki_split("train")
    ids, am = D.sentence_batches(tr, minilm_tok, max_len=32, num=20, seed=0)
    assert ids.shape == am.shape and ids.shape[0] == 20 and ids.shape[1] <= 32
    assert ids.dtype == torch.long and am.dtype == torch.long
    assert (ids[:, 0] == minilm_tok.cls_token_id).all()
    assert ((ids == minilm_tok.pad_token_id) == (am == 0)).all()
    assert (am.sum(1) >= 8).all()  # real sentences, not fragments
    ids2, am2 = D.sentence_batches(tr, minilm_tok, max_len=32, num=20, seed=0)
    assert torch.equal(ids, ids2) and torch.equal(am, am2)
    ids3, _ = D.sentence_batches(tr, minilm_tok, max_len=32, num=20, seed=1)
    assert ids.shape != ids3.shape or not torch.equal(ids, ids3)
    with pytest.raises(ValueError, match="calibration data too small"):
        D.sentence_batches(["One short sentence is here today."], minilm_tok, 32, 5, 0)


def test_read_text_file(tmp_path):
    p = tmp_path / "docs.txt"
    p.write_text("First doc line one.\nline two.\n\n  \nSecond doc.\r\n\r\nThird doc.\n\n\n", encoding="utf-8")
    assert D.read_text_file(p) == ["First doc line one.\nline two.", "Second doc.", "Third doc."]
    with pytest.raises(FileNotFoundError, match="text file not found"):
        D.read_text_file(tmp_path / "nope.txt")
    e = tmp_path / "empty.txt"
    e.write_text(" \n\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        D.read_text_file(e)
    b = tmp_path / "bin.txt"
    b.write_bytes(b"abc\xff\xfe\x00")
    with pytest.raises(ValueError, match="UTF-8"):
        D.read_text_file(b)


# --------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------
def test_perplexity_matches_hf_loss():
    m = tiny_gpt2()
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (5, 16))
    with torch.no_grad():
        ref = m(ids, labels=ids).loss.item()
    assert X.lm_loss(m, ids, batch_size=2) == pytest.approx(ref, rel=1e-5)
    assert X.perplexity(m, ids, batch_size=2) == pytest.approx(math.exp(ref), rel=1e-5)
    assert X.perplexity(m, ids, batch_size=8) == pytest.approx(math.exp(ref), rel=1e-5)
    # random model on a 100-token vocab: close to uniform
    assert 50 < X.perplexity(m, ids) < 200


def test_kl_to_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert X.kl_to_teacher(t, t).item() == pytest.approx(0.0, abs=1e-6)
    ref = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    assert X.kl_to_teacher(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    assert X.kl_to_teacher(s, t).item() > 0
    s.requires_grad_(True)
    X.kl_to_teacher(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kl_terms_is_the_elementwise_kl():
    torch.manual_seed(3)
    ref_lp, lp = torch.randn(3, 7, 13).log_softmax(-1), torch.randn(3, 7, 13).log_softmax(-1)
    terms = X.kl_terms(ref_lp, lp)
    assert terms.shape == ref_lp.shape
    # the exact arithmetic the search's calibration loss and the distillation logit term rely on
    assert torch.equal(terms, ref_lp.exp() * (ref_lp - lp))
    torch.testing.assert_close(terms, torch.nn.functional.kl_div(lp, ref_lp, log_target=True, reduction="none"))
    assert torch.all(X.kl_terms(ref_lp, ref_lp) == 0)
    assert float(terms.sum(-1).min()) >= -1e-6  # KL >= 0 per position
    torch.testing.assert_close(X.kl_to_teacher(lp, ref_lp), terms.sum(-1).mean())
    d = torch.float64
    assert X.kl_terms(ref_lp.to(d), lp.to(d)).dtype == d


def test_sentence_embeddings_unit_norm_and_mask_aware():
    m = tiny_bert()
    torch.manual_seed(2)
    ids = torch.randint(5, 100, (4, 10))
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    ids[1, 6:] = 0
    e = X.sentence_embeddings(m, ids, am, batch_size=3)
    assert e.shape == (4, 32)
    assert torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    # padding must not change a sentence's embedding
    short = X.sentence_embeddings(m, ids[1:2, :6], am[1:2, :6])
    assert torch.allclose(short, e[1:2], atol=1e-5)
    assert X.embedding_cosine(m, m, ids, am) == pytest.approx(1.0, abs=1e-5)
    other = tiny_bert()
    torch.manual_seed(9)
    for p in other.parameters():
        p.data.add_(0.5 * torch.randn_like(p))
    assert X.embedding_cosine(other, m, ids, am) < 0.999


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------
def test_check_tokenizer():
    m = tiny_gpt2(vocab=100)
    M.check_tokenizer(m, LenTok(100))
    M.check_tokenizer(m, LenTok(95))  # small padding of the embedding is fine
    with pytest.raises(ValueError, match="tokenizer does not match the model: vocab size 101 vs embedding rows 100"):
        M.check_tokenizer(m, LenTok(101))
    with pytest.raises(ValueError, match="vocab size 50 vs embedding rows 100"):
        M.check_tokenizer(m, LenTok(50))


def test_load_model_local_dirs(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model not found"):
        M.load_model(tmp_path / "missing")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="directory"):
        M.load_model(tmp_path / "f.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a model directory"):
        M.load_model(empty)

    g = tiny_gpt2()
    g.save_pretrained(tmp_path / "gpt2")
    lm, tok = M.load_model(tmp_path / "gpt2")
    assert type(lm).__name__ == "GPT2LMHeadModel" and tok is None and not lm.training
    b = tiny_bert(vocab=30522)
    b.save_pretrained(tmp_path / "bert")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(M.minilm_path()), local_files_only=True).save_pretrained(tmp_path / "bert")
    enc, btok = M.load_model(str(tmp_path / "bert"))
    assert type(enc).__name__ == "BertModel" and len(btok) == 30522
    M.check_tokenizer(enc, btok)

    # ziplm_shapes.json -> ziplm_ext.export.load_pruned (module written elsewhere: faked here)
    import ziplm_ext.io

    calls = []
    fake = types.ModuleType("ziplm_ext.io.export")
    fake.load_pruned = lambda d: calls.append(d) or ("MODEL", "TOK")
    monkeypatch.setitem(sys.modules, "ziplm_ext.io.export", fake)
    monkeypatch.setattr(ziplm_ext.io, "export", fake, raising=False)
    (tmp_path / "gpt2" / "ziplm_shapes.json").write_text("{}")
    assert M.load_model(tmp_path / "gpt2") == ("MODEL", "TOK")
    assert calls == [str(tmp_path / "gpt2")]


# --------------------------------------------------------------------------
# real built-in models (slow)
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_embeddings_semantic():
    model, tok = M.load_minilm()
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    M.check_tokenizer(model, tok)
    sents = ["A man is playing a guitar on stage.",
             "Someone performs music with a guitar in front of an audience.",
             "The stock market fell sharply after the interest rate announcement."]
    enc = tok(sents, padding=True, return_tensors="pt")
    e = X.sentence_embeddings(model, enc["input_ids"], enc["attention_mask"])
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = e @ e.T
    print(f"\nMiniLM cos(similar)={sim[0, 1]:.3f} cos(unrelated)={sim[0, 2]:.3f}")
    assert sim[0, 1] > sim[0, 2] + 0.3
    assert sim[0, 1] > 0.5
    ids, am = D.sentence_batches(D.wiki_split("eval"), tok, max_len=64, num=16, seed=0)
    assert X.embedding_cosine(model, model, ids, am) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_smollm2_loads_and_heldout_perplexity():
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = M.load_smollm2()
    load_s = time.perf_counter() - t0
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size) \
        == (30, 9, 3, 576, 1536)
    assert c.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not hasattr(c, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(lin) == 30 * 7 + 1 and all(type(m) is torch.nn.Linear for m in lin)
    M.check_tokenizer(model, tok)
    s = "The quick brown fox, named O'Hara, jumps over 13 lazy dogs! Café – naïve."
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s

    n_tok = {k: sum(len(x) for x in D._encode(tok, D.wiki_split(k))) for k in ("train", "eval")}
    blocks = D.token_blocks(D.wiki_split("eval"), tok, seq_len=128, num_blocks=8, seed=0)
    t0 = time.perf_counter()
    ppl = X.perplexity(model, blocks, batch_size=8)
    ppl_s = time.perf_counter() - t0
    print(f"\nSmolLM2 load {load_s:.1f}s; tokens train={n_tok['train']} eval={n_tok['eval']}; "
          f"held-out ppl (8x128) = {ppl:.2f} in {ppl_s:.1f}s")
    assert n_tok["train"] > 300_000 and n_tok["eval"] > 50_000
    assert math.isfinite(ppl) and 8 < ppl < 80
