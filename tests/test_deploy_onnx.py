"""ONNX export of (pruned) BERT encoders and the ONNX Runtime engine.

* ONNX Runtime's outputs match PyTorch's within 1e-4 at two different (batch, sequence) shapes
  (dynamic axes), for a tiny random BERT and the real MiniLM, dense and pruned (per-block head
  counts, one attention and one FFN removed);
* ONNX Runtime's transformer optimiser fuses attention in every block that has heads, with that
  block's own head count;
* removed modules are residual paths (no empty tensor anywhere in the graph);
* the engine times artefacts in ONNX Runtime and fits how the latency stages use an engine.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx", reason="needs the onnx extra: pip install .[onnx]")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install .[onnx]")

from ziplm_ext.adapters import get_adapter  # noqa: E402
from ziplm_ext.deploy import onnx as deploy_onnx  # noqa: E402
from ziplm_ext.deploy.onnx import bert_widths, export_onnx, fused_attention_count, onnx_session  # noqa: E402
from ziplm_ext.engines.onnxruntime import STACK_DEPTH, OnnxRuntimeEngine  # noqa: E402
from ziplm_ext.env import InferenceEnv  # noqa: E402
from ziplm_ext.io.export import load_pruned, save_pruned  # noqa: E402

try:
    from test_adapters import make_model  # noqa: E402
except ImportError:  # tests/ as a package
    from tests.test_adapters import make_model  # noqa: E402

TOL = 1e-4
SHAPES = [(2, 9), (3, 17)]  # two different (batch, sequence) shapes through one exported graph


def prune(model, heads_keep: dict, ffn_keep: dict):
    """Slice `model` in place: block -> kept head / neuron indices (blocks not named stay dense)."""
    adapter = get_adapter(model)
    for layer in adapter.prunable_layers(model):
        keep = (heads_keep if layer.kind == "attn" else ffn_keep).get(layer.block)
        if keep is not None:
            adapter.slice(model, layer, keep)
    return model


def prune_tiny(model):
    """Tiny BERT (3 blocks, 4 heads, FFN 37): heads 3 / 0 / 1, FFN 37 / 13 / 0."""
    return prune(model, {0: [0, 2, 3], 1: [], 2: [1]}, {1: list(range(0, 37, 3)), 2: []})


def prune_minilm(model):
    """MiniLM (6 blocks, 12 heads, FFN 1536): heads 6 / 1 / 0 / 12 / 7 / 3, FFN of block 3 removed."""
    heads = {0: list(range(0, 12, 2)), 1: [5], 2: [], 4: [0, 1, 3, 4, 8, 9, 11], 5: [2, 7, 10]}
    ffn = {0: list(range(0, 1536, 2)), 3: [], 5: list(range(700))}
    return prune(model, heads, ffn)


def inputs(batch: int, seq: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq - 3:] = 0  # a right-padded row
    types = torch.zeros_like(ids)
    types[-1, seq // 2:] = 1  # a second segment
    return ids, mask, types


def assert_parity(model, path):
    session = onnx_session(path, threads=1)
    for batch, seq in SHAPES:
        ids, mask, types = inputs(batch, seq, model.config.vocab_size, seed=batch)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        out, = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                  "token_type_ids": types.numpy()})
        assert out.shape == tuple(ref.shape)
        err = float(np.abs(out - ref.numpy()).max())
        assert err < TOL, f"shape {(batch, seq)}: max abs diff {err:.3g} >= {TOL}"


def load(path_or_proto):
    return path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(str(path_or_proto))


def fused_heads(path) -> list:
    """num_heads of every fused attention node, in graph order."""
    m = load(path)
    return [next(a.i for a in n.attribute if a.name == "num_heads") for n in m.graph.node
            if n.op_type in ("Attention", "MultiHeadAttention")]


def assert_no_empty_tensor(path):
    m = load(path)
    empty = [i.name for i in m.graph.initializer if 0 in list(i.dims)]
    assert not empty, f"zero-sized initializers {empty}"
    for n in m.graph.node:  # constant shapes of reshapes: no zero head count (an empty attention)
        if n.op_type == "Constant":
            t = onnx.numpy_helper.to_array(n.attribute[0].t) if n.attribute[0].type == onnx.AttributeProto.TENSOR else None
            assert t is None or t.size > 0 or t.ndim == 0, f"empty constant in {n.name}"


def check_export(model, tmp_path, name):
    heads, _ = bert_widths(model)
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    assert path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    assert_parity(model, path)
    proto = onnx.load(str(path))
    assert fused_attention_count(proto) == sum(1 for h in heads if h > 0)
    assert fused_heads(proto) == [h for h in heads if h > 0]
    assert_no_empty_tensor(proto)
    return path


# --------------------------------------------------------------------------------------
# tiny random BERT
# --------------------------------------------------------------------------------------


def test_tiny_dense(tmp_path):
    model = make_model("bert").train()
    assert bert_widths(model) == ([4, 4, 4], [37, 37, 37])
    export_onnx(model, tmp_path / "t.onnx")
    assert all(m.training for m in model.modules())  # export leaves the model's modes alone
    check_export(model.eval(), tmp_path, "dense")


def test_tiny_pruned_plain_and_optimised(tmp_path):
    model = prune_tiny(make_model("bert")).eval()
    assert bert_widths(model) == ([3, 0, 1], [37, 13, 0])
    check_export(model, tmp_path, "pruned")
    # the plain (unfused) graph: standard ONNX only, each reshape carries its block's head count
    raw = export_onnx(model, tmp_path / "raw.onnx", optimize=False)
    assert_parity(model, raw)
    m = onnx.load(str(raw))
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
    assert fused_attention_count(raw) == 0
    assert_no_empty_tensor(raw)
    opt = tmp_path / "raw_opt.onnx"
    deploy_onnx.optimize_bert_onnx(str(raw), str(opt))
    assert fused_heads(opt) == [3, 1]


def test_tiny_pruned_through_save_and_load(tmp_path):
    model = prune_tiny(make_model("bert")).eval()
    save_pruned(model, tmp_path / "saved")
    loaded = load_pruned(tmp_path / "saved")
    out = tmp_path / "out"
    out.mkdir()
    path = check_export(loaded, out, "loaded")
    assert_parity(model, path)  # the original in-memory model too


def test_head_model_exports_its_encoder(tmp_path):
    model = prune_tiny(make_model("bert_cls")).eval()
    path = export_onnx(model, tmp_path / "cls.onnx")
    assert_parity(model.base_model, path)
    assert fused_heads(path) == [3, 1]


def test_width_artefacts_fuse_every_block(tmp_path):
    """The engine's per-width artefacts: `depth` chained blocks, each fused with the width's heads."""
    path = deploy_onnx.export_bert_block("attn", 3, 32, 8, tmp_path / "a.onnx", depth=4)
    assert fused_heads(path) == [3, 3, 3, 3]
    module = deploy_onnx.bert_block("attn", 3, 32, 8, depth=4)
    x, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        ref = module(x, mask).numpy()
    out, = onnx_session(path, 1).run(None, {"hidden_states": x.numpy(), "attention_mask": mask.numpy()})
    assert float(np.abs(out - ref).max()) < 1e-4  # same seed, same weights
    path = deploy_onnx.export_bert_block("ffn", 7, 32, 8, tmp_path / "f.onnx", depth=2)
    assert fused_attention_count(path) == 0
    assert [i.name for i in onnx_session(path, 1).get_inputs()] == ["hidden_states"]
    with pytest.raises(ValueError, match="width"):
        deploy_onnx.bert_block("ffn", 0, 32, 8)


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_unsupported_architecture_leaves_target(tmp_path):
    target = tmp_path / "x.onnx"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="BERT"):
        export_onnx(make_model("gpt2"), target)
    with pytest.raises(ValueError, match="BERT"):
        export_onnx(torch.nn.Linear(2, 2), target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]


def test_bad_arguments(tmp_path):
    model = make_model("bert")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "a.onnx", opset=9)
    with pytest.raises(ValueError, match="directory"):
        export_onnx(model, tmp_path)


def test_missing_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ImportError, match=r"pip install \.\[onnx\]"):
        export_onnx(make_model("bert"), tmp_path / "a.onnx")
    with pytest.raises(ImportError, match=r"pip install \.\[onnx\]"):
        OnnxRuntimeEngine().check(make_model("bert"), InferenceEnv(engine="onnxruntime"))
    assert not (tmp_path / "a.onnx").exists()


# --------------------------------------------------------------------------------------
# real MiniLM
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from ziplm_ext.io.models import load_minilm

    model, _ = load_minilm()
    return model


def test_minilm_dense(minilm, tmp_path):
    assert bert_widths(minilm) == ([12] * 6, [1536] * 6)
    check_export(minilm, tmp_path, "minilm")


def test_minilm_pruned(minilm, tmp_path):
    import copy

    model = prune_minilm(copy.deepcopy(minilm))
    assert bert_widths(model) == ([6, 1, 0, 12, 7, 3], [768, 1536, 1536, 0, 1536, 700])
    check_export(model, tmp_path, "minilm_pruned")


# --------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------

ENV = InferenceEnv(engine="onnxruntime", batch_size=2, seq_len=16, threads=1)


def test_engine_rejects_environments():
    eng, model = OnnxRuntimeEngine(), make_model("bert")
    for kw in ({"mode": "decode"}, {"dtype": "float16"}, {"device": "cuda"}):
        with pytest.raises(ValueError):  # refused by the environment itself or by the engine
            eng.check(model, InferenceEnv(engine="onnxruntime", **kw))
    with pytest.raises(ValueError, match="BERT"):
        eng.check(make_model("gpt2"), ENV)
    with pytest.raises(ValueError, match="timer"):
        eng.block_timer(_shapes(model), ENV, timer="native")


def _shapes(model):
    from ziplm_ext.adapters.shapes import model_shapes

    return model_shapes(model.config)


def test_engine_times_artefacts(tmp_path):
    eng = OnnxRuntimeEngine()
    dense = make_model("bert").eval()
    pruned = prune_tiny(make_model("bert")).eval()
    t = eng.model_time(dense, ENV, reps=5, warmup=1)
    assert math.isfinite(t) and t > 0
    path = export_onnx(pruned, tmp_path / "p.onnx")
    s = eng.speedups(dense, [pruned, path], ENV, rounds=2, reps_per_round=2, warmup=1)
    assert len(s) == 2 and all(math.isfinite(v) and v > 0 for v in s)
    timer = eng.block_timer(_shapes(dense), ENV)
    assert timer.timer == "onnxruntime" and timer.depth == STACK_DEPTH
    for kind, width in (("attn", 1), ("attn", 4), ("ffn", 5), ("ffn", 37)):
        times = timer.time_block(kind, width, warmup=1, reps=3)
        assert times.dtype == torch.float64 and times.shape == (3,)
        assert bool(torch.isfinite(times).all()) and bool((times > 0).all())
    with pytest.raises(ValueError, match="width"):
        timer.time_block("attn", 5, warmup=0, reps=1)
    meta = eng.host_meta(ENV)
    assert meta["onnxruntime_version"] and meta["num_threads"] == 1


# tiny blocks: the per-call session overhead can make the blocks add up to more than the model
@pytest.mark.filterwarnings("ignore:ziplm_ext. sum of full-width layer times:RuntimeWarning")
def test_engine_builds_a_latency_table(monkeypatch):
    from ziplm_ext import engines
    from ziplm_ext.stages.latency.build import build_latency_table

    monkeypatch.setitem(engines.ENGINES, "onnxruntime", OnnxRuntimeEngine)  # registered by ziplm_ext.engines
    model = make_model("bert").eval()
    levels = {f"blocks.{i}.{k}": ([1, 2] if k == "attn" else [10]) for i in range(3) for k in ("attn", "ffn")}
    table = build_latency_table(model, ENV, levels, reps=4, warmup=1, rounds=2, model_reps=4, progress=False)
    assert table.meta["timer"] == "onnxruntime" and table.meta["onnxruntime_version"]
    assert table.dense_time > 0 and 0 < table.prunable_time <= table.dense_time
    for name, row in table.layer_times.items():
        assert sorted(row) == ([0, 1, 2, 4] if name.endswith("attn") else [0, 10, 37])
        assert row[0] == 0.0 and all(v > 0 for k, v in row.items() if k)
