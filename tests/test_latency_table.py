import json
import os

import pytest

from ziplm_ext.env import InferenceEnv
from ziplm_ext.errors import UnreachableTargetError
from ziplm_ext.stages.latency.table import FORMAT_VERSION, LatencyTable


def make_table(env=None):
    # 2 blocks; attention with 2 heads, FFN with widths 0/4/8
    layer_times = {
        "blocks.0.attn": {0: 0.0, 1: 1.0, 2: 2.0},
        "blocks.0.ffn": {4: 1.5, 8: 3.0},  # 0 -> 0.0 added automatically
        "blocks.1.attn": {0: 0.0, 1: 1.0, 2: 2.0},
        "blocks.1.ffn": {0: 0.0, 4: 1.5, 8: 3.0},
    }
    return LatencyTable(
        env=env or InferenceEnv(),
        dense_time=12.0,
        prunable_time=10.0,
        layer_times=layer_times,
        meta={"model": "toy", "repetitions": 9},
    )


def test_env_defaults_and_roundtrip():
    env = InferenceEnv()
    assert (env.device, env.dtype, env.batch_size, env.seq_len, env.mode) == ("cpu", "float32", 1, 128, "prefill")
    d = InferenceEnv(device="cuda", dtype="bfloat16", batch_size=8, seq_len=512, mode="decode").to_dict()
    assert InferenceEnv.from_dict(d) == InferenceEnv(device="cuda", dtype="bfloat16", batch_size=8, seq_len=512, mode="decode")
    assert hash(env) == hash(InferenceEnv())  # frozen -> hashable
    with pytest.raises(Exception):
        env.batch_size = 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": 1.5}, "seq_len"),
        ({"dtype": "float64"}, "dtype"),
        ({"mode": "train"}, "mode"),
        ({"device": ""}, "device"),
    ],
)
def test_env_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        InferenceEnv(**kwargs)


def test_env_from_dict_strict():
    d = InferenceEnv().to_dict()
    del d["mode"]
    with pytest.raises(ValueError, match="mode"):
        InferenceEnv.from_dict(d)
    d = InferenceEnv().to_dict()
    d["extra"] = 1
    with pytest.raises(ValueError, match="extra"):
        InferenceEnv.from_dict(d)


def test_torch_dtype_lazy():
    torch = pytest.importorskip("torch")
    assert InferenceEnv(dtype="bfloat16").torch_dtype is torch.bfloat16
    assert InferenceEnv().torch_dtype is torch.float32


def test_save_load_roundtrip(tmp_path):
    t = make_table(InferenceEnv(dtype="float16", batch_size=4, seq_len=64, mode="decode"))
    p = tmp_path / "sub" / "lat.json"
    t.save(p)
    assert sorted(os.listdir(p.parent)) == ["lat.json"]  # no temp file left behind
    raw = json.loads(p.read_text())
    assert raw["format_version"] == FORMAT_VERSION == 1
    t2 = LatencyTable.load(p)
    assert t2.env == t.env
    assert t2.dense_time == t.dense_time and t2.prunable_time == t.prunable_time
    assert t2.layer_times == t.layer_times
    assert all(isinstance(k, int) for per in t2.layer_times.values() for k in per)
    assert t2.meta == {"model": "toy", "repetitions": 9}
    # overwrite is fine (atomic replace)
    t2.meta["note"] = "x"
    t2.save(p)
    assert LatencyTable.load(p).meta["note"] == "x"


def test_load_errors(tmp_path):
    d = make_table().to_dict()
    for key in ("format_version", "env", "dense_time", "prunable_time", "layer_times"):
        bad = dict(d)
        del bad[key]
        p = tmp_path / f"no_{key}.json"
        p.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=key):
            LatencyTable.load(p)
    bad = dict(d, format_version=2)
    p = tmp_path / "v2.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="format_version"):
        LatencyTable.load(p)
    p = tmp_path / "garbage.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        LatencyTable.load(p)


def test_bad_table_values():
    with pytest.raises(ValueError, match=r"\[0\]"):
        LatencyTable(InferenceEnv(), 1.0, 0.5, {"a": {0: 0.1, 1: 0.5}})
    with pytest.raises(ValueError, match="prunable_time"):
        LatencyTable(InferenceEnv(), 1.0, 2.0, {"a": {1: 0.5}})
    with pytest.raises(ValueError, match="dense_time"):
        LatencyTable(InferenceEnv(), 0.0, 0.0, {"a": {1: 0.5}})
    with pytest.raises(ValueError):
        LatencyTable(InferenceEnv(), 1.0, 0.5, {"a": {1: -0.5}})


def test_predictions():
    t = make_table()
    assert t.unprunable_time == pytest.approx(2.0)
    assert t.layer_times["blocks.0.ffn"][0] == 0.0
    full = {"blocks.0.attn": 2, "blocks.0.ffn": 8, "blocks.1.attn": 2, "blocks.1.ffn": 8}
    assert t.predict_time(full) == pytest.approx(12.0)
    assert t.predict_speedup(full) == pytest.approx(1.0)
    half = {"blocks.0.attn": 1, "blocks.0.ffn": 4, "blocks.1.attn": 1, "blocks.1.ffn": 4}
    assert t.predict_time(half) == pytest.approx(2.0 + 5.0)
    assert t.predict_speedup(half) == pytest.approx(12.0 / 7.0)
    # missing layers are at full width
    assert t.predict_time({"blocks.0.attn": 0}) == pytest.approx(10.0)
    with pytest.raises(KeyError, match="blocks.9"):
        t.predict_time({"blocks.9.attn": 1})
    with pytest.raises(KeyError, match="measured"):
        t.predict_time({"blocks.0.ffn": 5})
    assert t.full_count("blocks.0.ffn") == 8


def test_budget_and_max_speedup():
    t = make_table()
    assert t.max_speedup() == pytest.approx(12.0 / 2.0)
    assert t.budget(2.0) == pytest.approx(12.0 / 2 - 2.0)
    assert t.budget(1.5) == pytest.approx(8.0 - 2.0)
    # consistency: any allocation using exactly the budget meets the target
    b = t.budget(2.0)  # 4.0 of the 10.0 prunable seconds
    levels = {"blocks.0.attn": 1, "blocks.0.ffn": 4, "blocks.1.attn": 0, "blocks.1.ffn": 4}
    assert sum(t.layer_times[n][k] for n, k in levels.items()) == pytest.approx(b)
    assert t.predict_speedup(levels) == pytest.approx(2.0)
    for bad in (1.0, 0.5, -2.0, float("nan")):
        with pytest.raises(ValueError, match="target must be > 1"):
            t.budget(bad)
    with pytest.raises(UnreachableTargetError, match="unreachable"):
        t.budget(6.0)
    with pytest.raises(UnreachableTargetError):
        t.budget(7.0)
    assert t.budget(5.9) > 0
    # removal (0 kept) not listed: it is added with time 0.0, so max_speedup assumes removal
    t2 = LatencyTable(InferenceEnv(), 10.0, 8.0, {"a": {2: 2.0, 4: 4.0}, "b": {2: 2.0, 4: 4.0}})
    assert 0 in t2.layer_times["a"]  # removal is always allowed
    assert t2.max_speedup() == pytest.approx(10.0 / 2.0)


def test_check_env():
    t = make_table()
    t.check_env(InferenceEnv())
    t.check_env(InferenceEnv().to_dict())
    with pytest.raises(ValueError, match="seq_len"):
        t.check_env(InferenceEnv(seq_len=256))
    with pytest.raises(ValueError, match="mode"):
        t.check_env(InferenceEnv(mode="decode"))
