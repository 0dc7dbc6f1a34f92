"""Tests of ziplm_ext.stages.latency: building, measuring and calibrating latency tables (small, fast)."""

import math
import warnings

import pytest
import torch

from ziplm_ext.adapters import get_adapter, model_shapes
from ziplm_ext.adapters.base import cache_kwargs, output_cache
from ziplm_ext.engines import in_env
from ziplm_ext.env import InferenceEnv
from ziplm_ext.stages.latency.build import build_latency_table, measure_model_time, measure_speedups
from ziplm_ext.stages.latency.correct import calibrate_table
from ziplm_ext.stages.latency.table import LatencyTable
from ziplm_ext.stages.levels import ffn_grid as ffn_levels, model_grid as default_levels

ENV = InferenceEnv(device="cpu", dtype="float32", batch_size=1, seq_len=32, mode="prefill")
FAST = dict(reps=5, warmup=1, rounds=1, model_reps=3, progress=False)


@pytest.fixture(autouse=True)
def _quiet():
    # the native timing ops may be absent in a stale build: build_latency_table then warns
    # and falls back to the Python oracles; both must satisfy these tests.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def tiny_llama(hidden=64, heads=4, kv=2, d_ff=128, layers=2, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(n_embd=64, n_head=4, n_inner=None, layers=2, vocab=64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_head=n_head, n_inner=n_inner, n_layer=layers, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(hidden=64, heads=4, d_ff=128, layers=2, vocab=64):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, intermediate_size=d_ff,
                     num_hidden_layers=layers, max_position_embeddings=128)
    return BertModel(cfg).eval()


# ------------------------------------------------------------------------------- shapes


def test_model_shapes_from_configs():
    s = model_shapes(tiny_llama().config)
    assert (s.hidden, s.num_heads, s.num_kv_heads, s.head_dim, s.d_ff) == (64, 4, 2, 16, 128)
    assert s.q_per_structure == 2 and s.num_attn_structures == 2 and s.gated and s.causal
    g = model_shapes(tiny_gpt2().config)
    assert (g.hidden, g.num_heads, g.num_kv_heads, g.head_dim, g.d_ff) == (64, 4, 4, 16, 256)  # n_inner None -> 4d
    assert g.q_per_structure == 1 and not g.gated and g.causal
    b = model_shapes(tiny_bert().config)
    assert (b.num_heads, b.num_kv_heads, b.d_ff) == (4, 4, 128) and not b.gated and not b.causal


# ------------------------------------------------------------------------------- levels


def test_ffn_levels_grid():
    lv = ffn_levels(1000)
    assert lv == sorted(set(lv)) and lv[0] == 0 and lv[-1] == 1000
    nz = lv[1:]
    assert 5 <= nz[0] <= 15  # down to ~1%
    for a, b in zip(nz, nz[1:]):
        assert b / a <= 1 / 0.9 + 0.15  # geometric with ratio 0.9 (up to rounding)
    assert 900 in lv and 810 in lv
    lv32 = ffn_levels(1000, multiple=32)
    assert lv32[0] == 0 and lv32[-1] == 1000
    assert all(k % 32 == 0 for k in lv32[1:-1]) and lv32[1] == 32
    assert ffn_levels(1) == [0, 1]
    assert ffn_levels(100, ratio=0.5, min_frac=0.1) == [0, 12, 25, 50, 100]
    with pytest.raises(ValueError):
        ffn_levels(0)
    with pytest.raises(ValueError):
        ffn_levels(10, ratio=1.0)


def test_default_levels():
    m = tiny_llama()
    lv = default_levels(m)
    assert lv["blocks.0.attn"] == [0, 1, 2]  # 2 KV groups
    assert lv["blocks.1.ffn"] == ffn_levels(128)


# ------------------------------------------------------------------------------- tables


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_build_table_every_layer_and_level(make, tmp_path):
    m = make()
    ad = get_adapter(m)
    t = build_latency_table(m, ENV, **FAST)
    layers = ad.prunable_layers(m)
    assert set(t.layer_times) == {l.name for l in layers}
    want = default_levels(m)
    for l in layers:
        row = t.layer_times[l.name]
        assert sorted(row) == want[l.name]
        assert row[0] == 0.0
        assert all(v > 0 for k, v in row.items() if k > 0)
        assert t.full_count(l.name) == l.num_structures
    # identical blocks share one timing per (kind, level)
    assert t.layer_times["blocks.0.ffn"] == t.layer_times["blocks.1.ffn"]
    assert t.dense_time > 0 and 0 < t.prunable_time <= t.dense_time
    assert t.env == ENV
    for key in ("torch_version", "host", "reps", "date", "spread", "timer"):
        assert key in t.meta
    assert set(t.meta["spread"]) == {"attn", "ffn"}
    p = tmp_path / "table.json"
    t.save(p)
    t2 = LatencyTable.load(p)
    assert t2.layer_times == t.layer_times and t2.dense_time == t.dense_time and t2.env == t.env
    assert t2.meta == t.meta
    assert t2.predict_speedup({}) == pytest.approx(1.0)


def test_explicit_levels_and_rough_monotonicity():
    m = tiny_llama(hidden=128, heads=8, kv=4, d_ff=1024, layers=1, vocab=32)
    lv = {"blocks.0.ffn": [256], "blocks.0.attn": [1]}
    t = build_latency_table(m, ENV, lv, reps=15, warmup=2, rounds=3, model_reps=3, progress=False)
    ffn, attn = t.layer_times["blocks.0.ffn"], t.layer_times["blocks.0.attn"]
    assert sorted(ffn) == [0, 256, 1024]  # 0 and full width added
    assert sorted(attn) == [0, 1, 4]
    assert ffn[1024] > ffn[256] > 0.0
    assert attn[4] > 0.0 and attn[1] > 0.0
    with pytest.raises(KeyError):
        build_latency_table(m, ENV, {"blocks.9.ffn": [1]}, **FAST)
    with pytest.raises(ValueError):
        build_latency_table(m, ENV, {"blocks.0.ffn": [2000]}, **FAST)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_decode_mode_table_and_measurements(make):
    import copy

    m = make()
    env = InferenceEnv(batch_size=2, seq_len=24, mode="decode")
    t = build_latency_table(m, env, **FAST)
    assert t.env.mode == "decode" and t.dense_time > 0
    row = t.layer_times["blocks.0.attn"]
    assert all(row[k] > 0 for k in row if k > 0)
    # pruned variant with a removed attention module and a narrower FFN: decode steps run with the
    # cache and are timed; the cache is cropped back so every step sees seq_len cached tokens
    p = copy.deepcopy(m)
    ad = get_adapter(p)
    layers = {l.name: l for l in ad.prunable_layers(p)}
    ad.slice(p, layers["blocks.0.attn"], [])
    ad.slice(p, layers["blocks.1.ffn"], range(layers["blocks.1.ffn"].num_structures // 2))
    (s,) = measure_speedups(m, [p], env, rounds=2, reps_per_round=2, warmup=1)
    assert s > 0 and math.isfinite(s)
    assert measure_model_time(p, env, reps=2, warmup=1) > 0


def test_decode_step_matches_full_forward_for_pruned_model():
    # the generation step the decode timing runs computes the right thing on a pruned model
    import copy

    m = tiny_llama()
    p = copy.deepcopy(m)
    ad = get_adapter(p)
    layers = {l.name: l for l in ad.prunable_layers(p)}
    ad.slice(p, layers["blocks.0.attn"], [])
    ad.slice(p, layers["blocks.1.attn"], [1])
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = p(input_ids=ids, use_cache=False).logits[:, -1]
        cache = output_cache(p(input_ids=ids[:, :16], use_cache=True))
        step = p(input_ids=ids[:, 16:], **cache_kwargs(p, cache), use_cache=True).logits[:, -1]
        cache.crop(-1)
        again = p(input_ids=ids[:, 16:], **cache_kwargs(p, cache), use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, step)


def test_decode_mode_rejects_encoders():
    env = InferenceEnv(batch_size=1, seq_len=16, mode="decode")
    with pytest.raises(ValueError, match="decode.*needs a causal LM"):
        build_latency_table(tiny_bert(), env, **FAST)
    with pytest.raises(ValueError, match="needs a causal LM"):
        measure_model_time(tiny_bert(), env)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_env_times_a_cast_copy(dtype):
    # The pruning maths stays in float32; the environment's dtype is what is timed.
    m = tiny_gpt2()
    env = InferenceEnv(dtype=dtype, seq_len=8)
    assert in_env(m, env) is not m and next(in_env(m, env).parameters()).dtype == env.torch_dtype
    assert in_env(m, InferenceEnv(seq_len=8)) is m
    assert measure_model_time(m, env, reps=2, warmup=1) > 0
    assert next(m.parameters()).dtype == torch.float32  # the caller's model is not converted
    table = build_latency_table(m, env, **FAST)
    assert table.meta["float32_dense_time"] > 0


# ------------------------------------------------------------------------- end to end


def test_measure_model_time_positive_and_restores_mode():
    m = tiny_bert()
    m.train()
    t = measure_model_time(m, ENV, reps=3, warmup=1)
    assert t > 0 and math.isfinite(t)
    assert m.training


def test_measure_speedups_self_and_ffn_removed():
    import copy

    dense = tiny_gpt2(n_embd=128, n_head=4, n_inner=2048, layers=2, vocab=32)
    same = copy.deepcopy(dense)
    noffn = copy.deepcopy(dense)
    ad = get_adapter(noffn)
    for l in ad.prunable_layers(noffn):
        if l.kind == "ffn":
            ad.slice(noffn, l, [])
    s_same, s_noffn = measure_speedups(dense, [same, noffn], ENV, rounds=12, reps_per_round=3)
    assert 0.5 < s_same < 2.0
    assert s_noffn > 1.2


# ------------------------------------------------------------------------- calibration


def _synthetic_table():
    lt = {f"blocks.{i}.{k}": ({0: 0.0, 1: 0.4, 2: 0.8, 4: 1.0} if k == "attn" else {0: 0.0, 50: 0.7, 100: 2.0})
          for i in range(2) for k in ("attn", "ffn")}
    return LatencyTable(env=ENV, dense_time=10.0, prunable_time=6.0, layer_times=lt)


def test_calibrate_recovers_known_scale():
    t = _synthetic_table()
    a = 0.8
    configs = [
        {"blocks.0.ffn": 50, "blocks.1.ffn": 50},
        {"blocks.0.attn": 1, "blocks.1.ffn": 0},
        {"blocks.0.attn": 0, "blocks.1.attn": 2, "blocks.0.ffn": 0, "blocks.1.ffn": 50},
    ]
    measured = []
    for lv in configs:
        saving = t.prunable_time - (t.predict_time(lv) - t.unprunable_time)
        measured.append((lv, t.dense_time / (t.dense_time - a * saving)))
    c = calibrate_table(t, measured)
    assert c.meta["calibration"]["scale"] == pytest.approx(a, rel=1e-9)
    assert c.dense_time == t.dense_time
    assert c.prunable_time == pytest.approx(a * t.prunable_time)
    for lv, s in measured:
        assert c.predict_speedup(lv) == pytest.approx(s, rel=1e-9)
    assert max(abs(e) for e in c.meta["calibration"]["rel_time_error_after"]) < 1e-9
    assert max(abs(e) for e in c.meta["calibration"]["rel_time_error_before"]) > 1e-3
    assert t.meta == {}  # input untouched
    # a noisy fit is least squares: close to a
    noisy = [(lv, s * (1 + (-1) ** i * 0.005)) for i, (lv, s) in enumerate(measured)]
    assert calibrate_table(t, noisy).meta["calibration"]["scale"] == pytest.approx(a, rel=0.1)


def test_calibrate_clamps_and_rejects():
    t = _synthetic_table()
    # measured far faster than possible: a would exceed dense/prunable -> clamped
    c = calibrate_table(t, [({"blocks.0.ffn": 0}, 5.0)])
    assert c.prunable_time <= c.dense_time
    with pytest.raises(ValueError):
        calibrate_table(t, [])
    with pytest.raises(ValueError):
        calibrate_table(t, [({}, 1.0)])


# ------------------------------------------------------------------------- shapes, grids, engines


def _hf(cls_name, **extra):
    import transformers

    cls = getattr(transformers, cls_name)
    if cls_name.startswith("Bert"):
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=24, **extra)
    elif cls_name.startswith("GPT2"):
        cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0,
                                      eos_token_id=0, **extra)
    else:
        cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, **extra)
    return cls(cfg)


@pytest.mark.parametrize("cls_name,extra,causal_lm,lm_head", [
    ("BertModel", {}, False, False),
    ("BertForMaskedLM", {}, False, True),
    ("BertForSequenceClassification", {}, False, False),
    ("BertLMHeadModel", {"is_decoder": True}, True, True),
    ("BertModel", {"is_decoder": True}, False, False),
    ("GPT2Model", {}, False, False),
    ("GPT2LMHeadModel", {}, True, True),
    ("LlamaModel", {}, False, False),
    ("LlamaForCausalLM", {}, True, True),
])
def test_is_causal_lm_one_rule_for_models_and_saved_configs(cls_name, extra, causal_lm, lm_head):
    from ziplm_ext.adapters import has_lm_head, is_causal_lm

    m = _hf(cls_name, **extra)
    assert is_causal_lm(m) is causal_lm
    assert has_lm_head(m) is lm_head  # masked LMs have token logits but are no causal LMs
    m.config.architectures = [cls_name]  # as save_pretrained writes it
    assert is_causal_lm(m.config) is causal_lm
    # causal attention is a property of the blocks, not of the head
    assert model_shapes(m.config).causal is (not cls_name.startswith("Bert") or bool(extra.get("is_decoder")))


def test_config_without_architectures_falls_back_on_the_model_type():
    import transformers

    from ziplm_ext.adapters import is_causal_lm

    assert is_causal_lm(transformers.LlamaConfig(vocab_size=8, hidden_size=8, num_attention_heads=2))
    assert not is_causal_lm(transformers.BertConfig(vocab_size=8, hidden_size=8, num_attention_heads=2))


def test_layer_grid_is_the_one_grid():
    import dataclasses

    from ziplm_ext.stages import database
    from ziplm_ext.stages.levels import layer_grid

    m = tiny_llama()
    layers = get_adapter(m).prunable_layers(m)
    attn = next(l for l in layers if l.kind == "attn")
    ffn = next(l for l in layers if l.kind == "ffn")
    assert layer_grid(attn) == [0, 1, 2]
    assert layer_grid(ffn) == ffn_levels(128)
    assert layer_grid(ffn, ffn_multiple=16) == ffn_levels(128, multiple=16)
    assert layer_grid(ffn, ffn_ratio=0.5, ffn_min_frac=0.1) == ffn_levels(128, ratio=0.5, min_frac=0.1)
    assert default_levels(m) == {l.name: layer_grid(l) for l in layers}
    assert default_levels(m, ffn_multiple=16)[ffn.name] == layer_grid(ffn, ffn_multiple=16)
    assert layer_grid(dataclasses.replace(attn, num_structures=5)) == list(range(6))
    assert database.build_database.__kwdefaults__["grid_fn"] is layer_grid  # the database uses the same grid


def test_get_engine_is_torch_eager_and_times_blocks():
    from ziplm_ext.engines import Engine, TorchEagerEngine, get_engine
    from ziplm_ext.engines.base import BlockTimer

    engine = get_engine(ENV)
    assert isinstance(engine, TorchEagerEngine) and isinstance(engine, Engine) and engine.name == "torch"
    timer = engine.block_timer(model_shapes(tiny_llama().config), ENV, "python")
    assert isinstance(timer, BlockTimer) and timer.timer == "python"
    times = timer.time_block("ffn", 64, 0, 3)
    assert len(times) == 3 and all(float(t) > 0 for t in times)
    with pytest.raises(ValueError, match="timer must be"):
        engine.block_timer(model_shapes(tiny_llama().config), ENV, "fast")

    class Elsewhere:
        engine = "no-such-runtime"

    with pytest.raises(ValueError, match="unknown inference engine"):
        get_engine(Elsewhere())
