"""The CLI against the real pipeline, no fakes: a tiny LLaMA saved as a Hugging Face directory with
a real (character-level) tokenizer, real calibration text, real latency tables and measurements.

Covers the CLI-to-pipeline contract: `--dtype` (half precision), `ziplm latency` writing the table
`ziplm prune --latency-table` consumes, `--no-measure`, and determinism with a fixed table and seed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ziplm_ext.cli import commands as cli
from ziplm_ext.stages.latency.table import LatencyTable

TEXT = ("Anarchism is a political philosophy and movement that is sceptical of authority and rejects all "
        "involuntary, coercive forms of hierarchy. Autism is a neurodevelopmental condition. ") * 30
CHARS = sorted(set(TEXT + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:'\"()- \n"))


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_llama")
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=1, pad_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def textfile(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT + "\n\n" + TEXT[::-1] + "\n")
    return p


COMMON = ["--seq-len", "32", "--num-calibration", "8", "--num-eval", "2", "--spdy-evaluations", "6",
          "--measure-rounds", "3", "--no-progress"]


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def weights(d: Path) -> dict:
    files = sorted(d.glob("*.safetensors"))
    assert files, f"no weights in {d}"
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prune_real_pipeline(model_dir, textfile, tmp_path, capsys, dtype):
    out = tmp_path / "out"
    rc, stdout, err = run(["prune", "--model", model_dir, "--data", textfile, "--targets", "1.3", "--out", out,
                           "--dtype", dtype, "--baselines", "uniform", *COMMON], capsys)
    assert rc == 0, err
    fam = json.loads((out / "family.json").read_text())
    assert fam["env"]["dtype"] == dtype
    (r,) = fam["results"]
    assert r["measured_speedup"] >= 0.97 * 1.3 and r["predicted_speedup"] > 1.0
    assert r["metrics"]["perplexity"] > 1.0
    table = LatencyTable.load(out / "latency_table.json")
    assert set(table.meta["module_overheads"]) == {"attn", "ffn"}
    # the delivered model is in the environment's dtype and loads back
    w = weights(out / "target_1.3x")
    assert {t.dtype for t in w.values() if t.is_floating_point()} == {getattr(torch, dtype)}
    rc, stdout, err = run(["eval", "--model", out / "target_1.3x", "--data", textfile, "--seq-len", "32",
                           "--num-blocks", "2", "--dtype", dtype], capsys)
    assert rc == 0, err and "perplexity" in stdout


def test_latency_table_reused_by_prune_deterministically(model_dir, textfile, tmp_path, capsys):
    table_path = tmp_path / "table.json"
    rc, stdout, err = run(["latency", "--model", model_dir, "--out", table_path, "--seq-len", "32", "--reps", "5",
                           "--rounds", "2", "--ffn-multiple", "16", "--no-progress"], capsys)
    assert rc == 0, err
    table = LatencyTable.load(table_path)
    # exactly what prune builds: module overheads and the FFN grid rounded to 16
    assert set(table.meta["module_overheads"]) == {"attn", "ffn"} and table.meta["ffn_multiple"] == 16
    assert all(k % 16 == 0 for k in table.layer_times["blocks.0.ffn"])

    runs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        rc, stdout, err = run(["prune", "--model", model_dir, "--data", textfile, "--targets", "1.3", "1.6",
                               "--out", out, "--latency-table", table_path, "--no-measure", *COMMON], capsys)
        assert rc == 0, err
        runs.append(out)
    fams = [json.loads((o / "family.json").read_text()) for o in runs]
    for a, b in zip(fams[0]["results"], fams[1]["results"]):
        assert a["widths"] == b["widths"] and a["measured_speedup"] is None
        assert all(k % 16 == 0 for n, k in a["widths"].items() if n.endswith("ffn")), "the table's grid is used"
    assert fams[0]["dense_time"] == table.dense_time  # the given table, not a new measurement
    for t in ("1.3", "1.6"):
        wa, wb = weights(runs[0] / f"target_{t}x"), weights(runs[1] / f"target_{t}x")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_prune_rejects_table_of_other_environment(model_dir, textfile, tmp_path, capsys):
    table_path = tmp_path / "table.json"
    rc, _, err = run(["latency", "--model", model_dir, "--out", table_path, "--seq-len", "32", "--reps", "3",
                      "--rounds", "1", "--no-progress"], capsys)
    assert rc == 0, err
    out = tmp_path / "out"
    rc, _, err = run(["prune", "--model", model_dir, "--data", textfile, "--targets", "1.3", "--out", out,
                      "--latency-table", table_path, *COMMON[2:], "--seq-len", "64"], capsys)
    assert rc == 2 and "another environment" in err and "seq_len" in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1 and not out.exists()
