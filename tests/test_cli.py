"""ziplm CLI: one-line errors with exit code 2 and no output directory, --help, and the prune /
latency / eval flows end to end with the heavy calls (load_model, prune, latency) replaced by fakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ziplm_ext.cli import commands as cli
from ziplm_ext.config import MeasureConfig, PruneConfig, TrainConfig
from ziplm_ext.eval import data as D
from ziplm_ext.io import models as M
from ziplm_ext.env import InferenceEnv
from ziplm_ext.stages.latency.table import LatencyTable

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64


# --------------------------------------------------------------------------
# fakes
# --------------------------------------------------------------------------
class CharTokenizer:
    """Byte-ish tokenizer with VOCAB ids; enough for data.token_blocks and models.check_tokenizer."""

    eos_token_id = 0
    pad_token_id = 0

    def __len__(self):
        return VOCAB

    def __call__(self, texts, add_special_tokens=False, verbose=False, **kw):
        return {"input_ids": [[1 + (ord(c) % (VOCAB - 1)) for c in t] for t in texts]}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    return BertModel(cfg).eval()


TEXT = ("The quick brown fox jumps over the lazy dog near the river bank. " * 40).strip()


@pytest.fixture
def textfile(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(TEXT + "\n\n" + TEXT + "\n")
    return p


@pytest.fixture
def fake_models(monkeypatch):
    """load_model -> tiny GPT-2 + char tokenizer for any name except a path that does not exist."""
    calls = []

    def load_model(name, dtype=torch.float32):
        calls.append((str(name), dtype))
        if str(name).startswith("bert"):
            return tiny_bert().to(dtype), CharTokenizer()
        if str(name) not in ("smollm2", "minilm") and not os.path.exists(name):
            raise FileNotFoundError(f"model not found: {name!r} is neither a built-in nor an existing path")
        return tiny_gpt2().to(dtype), CharTokenizer()

    monkeypatch.setattr(M, "load_model", load_model)
    monkeypatch.setattr(D, "wiki_split", lambda split: [TEXT, TEXT])  # no gensim parse in unit tests
    return calls


def make_fake_family(targets, env, out_marker="pruned.txt"):
    table = LatencyTable(env=env, dense_time=0.01, prunable_time=0.008,
                         layer_times={"blocks.0.attn": {0: 0.0, 2: 0.003}, "blocks.0.ffn": {0: 0.0, 64: 0.005}})
    results = [SimpleNamespace(target=t, model=None, levels={}, predicted_speedup=t * 1.01, measured_speedup=t * 0.97,
                               calibration_loss=2.0 + t, num_parameters=int(1e6 / t), metrics={"perplexity": 10.0 * t})
               for t in targets]

    class Family(SimpleNamespace):
        def save(self, directory):
            d = Path(directory)
            tmp = d.parent / (d.name + ".tmp")
            tmp.mkdir()
            (tmp / out_marker).write_text(json.dumps([r.target for r in self.results]))
            if d.exists():
                d.rmdir()  # an empty existing --out is allowed
            os.replace(tmp, d)

    return Family(results=results, env=env, latency_table=table, dense_calibration_loss=2.0,
                  dense_num_parameters=1_000_000, dense_metrics={"perplexity": 9.5},
                  baselines={"uniform": [{"target": t, "measured_speedup": t, "calibration_loss": 3.0 + t,
                                          "metrics": {"perplexity": 12.0 * t}} for t in targets]},
                  stage_seconds={"calibration": 1.0, "database": 2.0, "latency": 0.5, "search": 0.25,
                                 "export": 0.1, "evaluation": 0.3},
                  model_name="")


@pytest.fixture
def fake_prune(monkeypatch):
    """Install a fake ``ziplm_ext.api`` module (where the CLI imports ``prune`` from at call time);
    returns it, with the list of recorded calls."""
    calls = []
    mod = types.ModuleType("ziplm_ext.api")

    def prune(model, calibration, targets, env=None, config=None, **kw):
        calls.append(dict(model=model, calibration=calibration, targets=list(targets), env=env, config=config, **kw))
        if getattr(mod, "raise_", None) is not None:
            raise mod.raise_
        fam = make_fake_family(targets, env)
        fam.model_name = kw.get("model_name", "")
        return fam

    mod.prune = prune
    monkeypatch.setitem(sys.modules, "ziplm_ext.api", mod)
    mod.calls = calls
    return mod


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ziplm: error: "), err
    assert "Traceback" not in err


# --------------------------------------------------------------------------
# help / usage
# --------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["latency", "--help"], ["eval", "--help"]])
def test_help(argv, capsys):
    rc, out, _ = run(argv, capsys)
    assert rc == 0 and "usage: ziplm" in out


def test_no_command_and_usage_errors(capsys):
    rc, _, err = run([], capsys)
    assert rc == 2 and "usage" in err
    rc, _, err = run(["prune", "--model", "x"], capsys)  # missing --targets/--out
    assert rc == 2
    assert_one_line_error(err)
    rc, _, err = run(["prune", "--model", "x", "--targets", "abc", "--out", "o"], capsys)
    assert rc == 2
    assert_one_line_error(err)


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "ziplm_ext", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "prune" in r.stdout


def test_python_dash_m_error_exit_code(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ziplm_ext", "prune", "--model", "minilm", "--targets", "0.9",
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert_one_line_error(r.stderr)
    assert not out.exists()


# --------------------------------------------------------------------------
# prune: argument errors -> exit 2, one line, no output directory
# --------------------------------------------------------------------------
def prune_argv(out, data, model="smollm2", targets=("1.5", "2")):
    return ["prune", "--model", model, "--data", data, "--targets", *targets, "--out", out, "--no-progress"]


@pytest.mark.parametrize("targets", [("1",), ("0.5", "2"), ("1.5", "-3"), ("nan",), ("inf",)])
def test_prune_bad_targets(targets, tmp_path, textfile, fake_models, fake_prune, capsys):
    out = tmp_path / "out"
    rc, _, err = run(prune_argv(out, textfile, targets=targets), capsys)
    assert rc == 2
    assert_one_line_error(err)
    assert not out.exists() and fake_models == [] and fake_prune.calls == []


def test_prune_nonempty_out(tmp_path, textfile, fake_models, fake_prune, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, _, err = run(prune_argv(out, textfile), capsys)
    assert rc == 2 and "not empty" in err
    assert_one_line_error(err)
    assert sorted(os.listdir(out)) == ["keep.txt"] and fake_models == []


def test_prune_out_is_file(tmp_path, textfile, fake_models, fake_prune, capsys):
    out = tmp_path / "afile"
    out.write_text("x")
    rc, _, err = run(prune_argv(out, textfile), capsys)
    assert rc == 2
    assert_one_line_error(err)


def test_prune_out_uncreatable(tmp_path, textfile, fake_models, fake_prune, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = blocker / "sub" / "out"  # parent is a regular file: cannot be created, even as root
    rc, _, err = run(prune_argv(out, textfile), capsys)
    assert rc == 2
    assert_one_line_error(err)
    assert fake_models == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_prune_out_unwritable(tmp_path, textfile, fake_models, fake_prune, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = run(prune_argv(ro / "out", textfile), capsys)
        assert rc == 2
        assert_one_line_error(err)
        assert not (ro / "out").exists()
    finally:
        ro.chmod(0o700)


def test_prune_missing_data_file(tmp_path, fake_models, fake_prune, capsys):
    out = tmp_path / "out"
    rc, _, err = run(prune_argv(out, tmp_path / "nope.txt"), capsys)
    assert rc == 2 and "nope.txt" in err
    assert_one_line_error(err)
    assert not out.exists() and fake_models == []  # data checked before the model is loaded


def test_prune_empty_data_file(tmp_path, fake_models, fake_prune, capsys):
    p = tmp_path / "empty.txt"
    p.write_text("\n\n")
    rc, _, err = run(prune_argv(tmp_path / "out", p), capsys)
    assert rc == 2
    assert_one_line_error(err)


def test_prune_unknown_model_path(tmp_path, textfile, fake_prune, capsys):
    # the real load_model: fails fast on a path that does not exist
    out = tmp_path / "out"
    rc, _, err = run(prune_argv(out, textfile, model=tmp_path / "no_such_model"), capsys)
    assert rc == 2 and "no_such_model" in err
    assert_one_line_error(err)
    assert not out.exists() and fake_prune.calls == []


def test_prune_model_dir_without_config(tmp_path, textfile, fake_prune, capsys):
    d = tmp_path / "junk_model"
    d.mkdir()
    (d / "readme.txt").write_text("x")
    rc, _, err = run(prune_argv(tmp_path / "out", textfile, model=d), capsys)
    assert rc == 2
    assert_one_line_error(err)


def test_prune_bad_device(tmp_path, textfile, fake_models, fake_prune, capsys):
    argv = prune_argv(tmp_path / "out", textfile) + ["--device", "nonsense"]
    rc, _, err = run(argv, capsys)
    assert rc == 2
    assert_one_line_error(err)
    if not torch.cuda.is_available():
        rc, _, err = run(prune_argv(tmp_path / "out", textfile) + ["--device", "cuda"], capsys)
        assert rc == 2 and "CUDA" in err


def test_prune_tokenizer_mismatch(tmp_path, textfile, fake_prune, monkeypatch, capsys):
    class Small(CharTokenizer):
        def __len__(self):
            return 10

    monkeypatch.setattr(M, "load_model", lambda name, dtype=torch.float32: (tiny_gpt2(), Small()))
    out = tmp_path / "out"
    rc, _, err = run(prune_argv(out, textfile), capsys)
    assert rc == 2 and "tokenizer" in err
    assert_one_line_error(err)
    assert not out.exists() and fake_prune.calls == []


def test_prune_unsupported_architecture(tmp_path, textfile, fake_prune, monkeypatch, capsys):
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 4)

        def get_input_embeddings(self):
            return self.emb

    monkeypatch.setattr(M, "load_model", lambda name, dtype=torch.float32: (Weird(), CharTokenizer()))
    monkeypatch.setattr(D, "wiki_split", lambda split: [TEXT])
    rc, _, err = run(prune_argv(tmp_path / "out", textfile), capsys)
    assert rc == 2 and "unsupported architecture" in err
    assert_one_line_error(err)


def test_prune_workdir_inside_out(tmp_path, textfile, fake_models, fake_prune, capsys):
    out = tmp_path / "out"
    rc, _, err = run(prune_argv(out, textfile) + ["--workdir", out / "cache"], capsys)
    assert rc == 2
    assert_one_line_error(err)
    assert not out.exists()


# --------------------------------------------------------------------------
# prune: end-to-end flow with fakes
# --------------------------------------------------------------------------
def test_prune_flow(tmp_path, textfile, fake_models, fake_prune, capsys):
    out = tmp_path / "out"
    argv = prune_argv(out, textfile, targets=("3", "1.5", "2")) + [
        "--num-calibration", "4", "--spdy-evaluations", "7", "--baselines", "uniform", "magnitude",
        "--seq-len", "32", "--batch-size", "2", "--seed", "3", "--workdir", tmp_path / "cache", "--num-eval", "2"]
    rc, stdout, err = run(argv, capsys)
    assert rc == 0, err
    assert len(fake_prune.calls) == 1
    call = fake_prune.calls[0]
    assert call["targets"] == [1.5, 2.0, 3.0]
    assert call["env"] == InferenceEnv(device="cpu", dtype="float32", batch_size=2, seq_len=32, mode="prefill")
    assert isinstance(call["calibration"], list) and call["calibration"][0].startswith("The quick")
    assert isinstance(call["tokenizer"], CharTokenizer)
    cfg = call["config"]
    assert isinstance(cfg, PruneConfig)
    assert cfg.calibration.num_blocks == 4 and cfg.search.spdy_evaluations == 7 and cfg.seed == 3
    assert cfg.baselines == ("uniform", "magnitude") and cfg.progress is False
    assert cfg.workdir == str(tmp_path / "cache")
    assert (cfg.method, cfg.mode, cfg.measure.measure, cfg.train) == ("ziplm", "oneshot", True, TrainConfig())
    assert call["train_data"] is None and call["model_name"] == "smollm2"
    ev = call["eval_data"]  # causal LM: token blocks from the eval split
    assert isinstance(ev, torch.Tensor) and ev.dtype == torch.long and tuple(ev.shape) == (2, 32)
    assert fake_models[0][1] == torch.float32

    assert sorted(os.listdir(out)) == ["pruned.txt", "quality_vs_speedup.png", "report.md"]
    assert (out / "quality_vs_speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "smollm2" in md and "1.50x" in md and "3.00x" in md
    # summary table on stdout
    assert "ZipLM" in stdout and "uniform" in stdout and "1.50x" in stdout and "ppl" in stdout
    assert not (tmp_path / "out.tmp").exists()


def test_prune_into_existing_empty_dir(tmp_path, textfile, fake_models, fake_prune, capsys):
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = run(prune_argv(out, textfile, targets=("2",)) + ["--seq-len", "16", "--num-eval", "1"], capsys)
    assert rc == 0, err
    assert "report.md" in os.listdir(out)


def test_prune_encoder_eval_data(tmp_path, textfile, fake_models, fake_prune, monkeypatch, capsys):
    seen = {}

    def sentence_batches(texts, tok, max_len, num, seed=0):
        seen.update(max_len=max_len, num=num)
        return torch.ones(num, 8, dtype=torch.long), torch.ones(num, 8, dtype=torch.long)

    monkeypatch.setattr(D, "sentence_batches", sentence_batches)
    rc, _, err = run(prune_argv(tmp_path / "out", textfile, model="bert") + ["--num-eval", "2"], capsys)
    assert rc == 0, err
    ev = fake_prune.calls[0]["eval_data"]
    assert isinstance(ev, tuple) and len(ev) == 2 and seen == {"max_len": 128, "num": 16}


def test_prune_error_inside_prune_leaves_no_out(tmp_path, textfile, fake_models, fake_prune, capsys):
    fake_prune.raise_ = ValueError("target 3.0x is unreachable: the latency table allows at most 2.5x\nsecond line")
    out = tmp_path / "out"
    rc, _, err = run(prune_argv(out, textfile) + ["--seq-len", "16", "--num-eval", "1"], capsys)
    assert rc == 2 and "unreachable" in err and "second line" not in err
    assert_one_line_error(err)
    assert not out.exists()


def test_prune_keyboard_interrupt(tmp_path, textfile, fake_models, fake_prune, capsys):
    fake_prune.raise_ = KeyboardInterrupt()
    out = tmp_path / "out"
    rc, _, err = run(prune_argv(out, textfile) + ["--seq-len", "16", "--num-eval", "1"], capsys)
    assert rc == 130 and "Traceback" not in err
    assert not out.exists()


def test_prune_eval_data_too_small(tmp_path, textfile, fake_models, fake_prune, capsys):
    out = tmp_path / "out"
    rc, _, err = run(prune_argv(out, textfile) + ["--seq-len", "1024", "--num-eval", "64"], capsys)
    assert rc == 2 and "too small" in err
    assert_one_line_error(err)
    assert not out.exists() and fake_prune.calls == []


# --------------------------------------------------------------------------
# latency / eval
# --------------------------------------------------------------------------
def test_latency_out_is_a_directory(tmp_path, fake_models, capsys):
    # the flow itself runs for real in tests/test_cli_real.py
    rc, _, err = run(["latency", "--model", "smollm2", "--out", tmp_path], capsys)
    assert rc == 2
    assert_one_line_error(err)


def test_eval_causal(tmp_path, textfile, fake_models, capsys):
    rc, stdout, err = run(["eval", "--model", "smollm2", "--data", textfile, "--seq-len", "16", "--num-blocks", "4",
                           "--reference", "smollm2"], capsys)
    assert rc == 0, err
    assert "perplexity:" in stdout and "reference perplexity:" in stdout
    ppl = float(stdout.split("perplexity:")[1].split()[0])
    assert 1.0 < ppl < 10 * VOCAB


def test_eval_encoder_needs_reference(tmp_path, textfile, fake_models, capsys):
    rc, _, err = run(["eval", "--model", "bert", "--data", textfile], capsys)
    assert rc == 2 and "--reference" in err
    assert_one_line_error(err)


def test_eval_encoder_cosine(tmp_path, textfile, fake_models, monkeypatch, capsys):
    monkeypatch.setattr(D, "sentence_batches", lambda texts, tok, max_len, num, seed=0: (
        torch.randint(1, VOCAB, (num, 8)), torch.ones(num, 8, dtype=torch.long)))
    rc, stdout, err = run(["eval", "--model", "bert", "--reference", "bert", "--data", textfile], capsys)
    assert rc == 0, err
    cos = float(stdout.split("embedding cosine:")[1].split()[0])
    assert cos == pytest.approx(1.0, abs=1e-5)  # same weights (seeded) -> identical embeddings


def test_eval_missing_model(tmp_path, textfile, capsys):
    rc, _, err = run(["eval", "--model", tmp_path / "none", "--data", textfile], capsys)
    assert rc == 2
    assert_one_line_error(err)


def test_prune_gradual_and_flop_pass_training_options(tmp_path, textfile, fake_models, fake_prune, capsys):
    from ziplm_ext.stages.distill import DistillConfig

    argv = prune_argv(tmp_path / "g", textfile) + ["--seq-len", "16", "--gradual", "--train-steps", "5",
                                                  "--train-blocks", "3", "--train-batch-size", "2", "--lr", "3e-4",
                                                  "--temperature", "4", "--hidden-weight", "0.5"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    call = fake_prune.calls[-1]
    cfg = call["config"]
    assert cfg.mode == "gradual" and cfg.method == "ziplm" and cfg.train.steps_per_target == 5
    assert tuple(call["train_data"].shape) == (3, 16)
    assert cfg.train.distill == DistillConfig(lr=3e-4, temperature=4.0, hidden_weight=0.5, batch_size=2, seed=0)
    rc, _, err = run(prune_argv(tmp_path / "f", textfile) + ["--seq-len", "16", "--method", "flop",
                                                            "--measure-rounds", "4", "--no-measure"], capsys)
    assert rc == 0, err
    cfg = fake_prune.calls[-1]["config"]
    assert cfg.method == "flop" and cfg.mode == "oneshot" and cfg.train.steps_per_target == 100
    assert cfg.measure == MeasureConfig(measure=False, rounds=4)
    assert cfg.flop_config().steps == 100 and cfg.flop_config().measure_rounds == 4


@pytest.mark.parametrize("extra,match", [
    (["--gradual", "--method", "flop"], "--gradual applies to --method ziplm only"),
    (["--gradual", "--baselines", "uniform"], "--baselines are built by one-shot ZipLM runs only"),
    (["--method", "flop", "--lr", "-1"], "lr"),
])
def test_prune_training_option_errors(extra, match, tmp_path, textfile, fake_models, fake_prune, capsys):
    rc, _, err = run(prune_argv(tmp_path / "o", textfile) + ["--seq-len", "16"] + extra, capsys)
    assert rc != 0
    assert_one_line_error(err)
    assert match in err
    assert not (tmp_path / "o").exists()
