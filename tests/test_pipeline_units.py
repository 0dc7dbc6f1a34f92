"""Unit tests of pipeline pieces with the end-to-end timing mocked out.

* ``solve_targets``: the one-shot measure -> re-fit -> re-solve loop (a delivered model must
  measure at least MIN_SPEEDUP_FRACTION of its target; overshoots are re-solved because they
  waste accuracy; ZipLM paper: the search is driven by the latency table, and the candidates are
  validated by end-to-end timing in the inference environment).
* ``add_module_overheads``: the per-module fixed cost measured by removing every module of a kind.
* ``build_baselines``: the uniform (one width fraction per kind, OBS updates) and magnitude (same
  widths, L2-norm selection, no update) baselines the paper compares ZipLM against.
* ``build_magnitude_model``: the structure = head / KV group / neuron of the paper, scored by
  the L2 norm of its out-projection columns.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import ziplm_ext.methods.ziplm_oneshot as P
import ziplm_ext.stages.latency.build as LAT
import ziplm_ext.stages.search.problem as SP
from ziplm_ext.adapters import get_adapter
from ziplm_ext.adapters.base import expand_groups
from ziplm_ext.stages.calibrate import make_batches
from ziplm_ext.stages.database import build_database
from ziplm_ext.env import InferenceEnv
from ziplm_ext.stages.latency.table import LatencyTable
from ziplm_ext.config import CalibrationConfig, MeasureConfig, PruneConfig, SearchConfig
from ziplm_ext.errors import UnreachableTargetError
from ziplm_ext.results import MAX_OVERSHOOT, MIN_SPEEDUP_FRACTION, num_parameters
from ziplm_ext.stages.levels import layer_grid
from ziplm_ext.stages.search.objective import StitchedLoss
from ziplm_ext.stages.search.problem import SearchProblem
from ziplm_ext.stages.search.uniform import uniform_per_kind_levels
from ziplm_ext.stages.slicing import build_magnitude_model, build_pruned_model

ENV = InferenceEnv(seq_len=16)
REAL_SEARCH = SP.search_target  # the solve loop looks it up in P (tests replace it there)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def calib(n=6, T=16, seed=1):
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


def synthetic_table(model, scale=1.0, dense_factor=2.0, attn_full=0.1, ffn_full=0.15):
    """Times proportional to the kept width on the database's level grid, times `scale`.
    dense_time = dense_factor x the (unscaled) prunable time: the unprunable part is fixed."""
    rows = {}
    for l in get_adapter(model).prunable_layers(model):
        full = attn_full if l.kind == "attn" else ffn_full
        rows[l.name] = {c: scale * full * c / l.num_structures
                        for c in set(layer_grid(l)) | {0, l.num_structures}}
    unscaled = sum(attn_full if n.endswith("attn") else ffn_full for n in rows)
    return LatencyTable(env=ENV, dense_time=dense_factor * unscaled,
                        prunable_time=sum(max(r.values()) for r in rows.values()), layer_times=rows)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    ids = calib()
    db = build_database(model, make_batches(ids, None, 4), progress=False)
    loss = StitchedLoss(model, db, ids[:2], batch_size=2)
    return model, db, loss


def make_run(table, max_corrections=2, measure=True, rounds=1, baselines=()):
    config = PruneConfig(seed=0, progress=False, baselines=baselines, search=SearchConfig(spdy_evaluations=6),
                         measure=MeasureConfig(measure=measure, rounds=rounds, max_corrections=max_corrections),
                         calibration=CalibrationConfig(damp=0.01, loss_blocks=2))
    return P.ZipLMRun(ENV, config, calib(), table, layer_grid)


class FakeTiming:
    """Stands in for ``measure_speedups``: each model's speedup comes from `speed(call, target_index,
    shapes)`; every call is recorded (the shapes of the models it was given, and `rounds`)."""

    def __init__(self, speed):
        self.speed = speed
        self.calls = []

    def __call__(self, dense, models, env, *, rounds=15, **kw):
        assert env == ENV
        shapes = [get_adapter(m).shapes(m) for m in models]
        self.calls.append(dict(shapes=shapes, rounds=rounds, models=list(models)))
        return [self.speed(len(self.calls) - 1, i, s) for i, s in enumerate(shapes)]


def truth(model, a):
    """A 'real machine' on which the table's layer savings are off by the factor `a`
    (the model ``calibrate_table`` fits): T(levels) = dense - a * (P_dense - P(levels))."""
    tab = synthetic_table(model)
    return lambda call, i, shapes: tab.dense_time / (tab.dense_time - a * (tab.prunable_time
                                                                          - (tab.predict_time(shapes)
                                                                             - tab.unprunable_time)))


@pytest.fixture
def spy_calibrate(monkeypatch):
    seen = []
    real = LAT.calibrate_table

    def spy(table, observations):
        seen.append([(dict(lv), s) for lv, s in observations])
        return real(table, observations)

    monkeypatch.setattr(LAT, "calibrate_table", spy)
    return seen


def solve(setup, monkeypatch, speed, targets=(1.2,), max_corrections=2):
    model, db, loss = setup
    fake = FakeTiming(speed)
    monkeypatch.setattr(LAT, "measure_speedups", fake)
    problem = SearchProblem(db, synthetic_table(model))
    run = make_run(problem.table, max_corrections)
    results = P.solve_targets(model, model, db, problem, loss, list(targets), run)
    assert "search" in run.stages and "measure" in run.stages
    return results, fake, problem


# ----------------------------------------------------------------------------- solve_targets


def test_first_round_hit_is_not_resolved(setup, monkeypatch, spy_calibrate):
    model, db, _ = setup
    (res,), fake, problem = solve(setup, monkeypatch, truth(model, 1.0))  # the table is exact
    assert len(fake.calls) == 1 and len(fake.calls[0]["models"]) == 1 and fake.calls[0]["rounds"] == 1
    assert spy_calibrate == []  # nothing to correct
    assert problem.table.meta.get("calibration") is None
    assert res.widths == fake.calls[0]["shapes"][0]
    assert MIN_SPEEDUP_FRACTION * 1.2 <= res.measured_speedup <= MAX_OVERSHOOT * 1.2
    assert res.measured_speedup == pytest.approx(res.predicted_speedup)
    assert res.model is fake.calls[0]["models"][0]  # the measured model is the delivered one
    assert same_weights(res.model, build_pruned_model(model, db, res.widths))
    assert res.num_parameters == num_parameters(res.model)


def test_miss_refits_table_and_delivers_resolved_model(setup, monkeypatch, spy_calibrate):
    model, db, loss = setup
    # the real machine saves only 70% of what the table predicts: 1.2x on the table measures ~1.13x
    (res,), fake, problem = solve(setup, monkeypatch, truth(model, 0.7))
    assert len(fake.calls) == 2, "one re-solve after the miss, then the target is met"
    first, second = fake.calls[0]["shapes"][0], fake.calls[1]["shapes"][0]
    first_speed = truth(model, 0.7)(0, 0, first)
    assert first_speed < MIN_SPEEDUP_FRACTION * 1.2
    # the table was re-fitted on the measurement of the missed model
    assert len(spy_calibrate) == 1 and spy_calibrate[0] == [(first, pytest.approx(first_speed))]
    assert problem.table.meta["calibration"]["scale"] == pytest.approx(0.7)
    assert problem.table.layer_times != synthetic_table(model).layer_times
    # the re-solved model prunes more and is the one delivered
    assert second != first and sum(second.values()) < sum(first.values())
    assert res.widths == second and res.model is fake.calls[1]["models"][0]
    assert get_adapter(res.model).shapes(res.model) == second
    assert res.measured_speedup == pytest.approx(truth(model, 0.7)(0, 0, second))
    assert res.measured_speedup >= MIN_SPEEDUP_FRACTION * 1.2
    assert res.predicted_speedup == pytest.approx(problem.table.predict_speedup(second))
    assert res.calibration_loss == pytest.approx(loss(second))
    assert same_weights(res.model, build_pruned_model(model, db, second))


def test_overshoot_is_resolved_and_lower_loss_candidate_taken(setup, monkeypatch, spy_calibrate):
    model, db, loss = setup
    # the machine saves 1.6x what the table predicts: 1.2x on the table measures ~1.36x > 1.1 x 1.2
    (res,), fake, problem = solve(setup, monkeypatch, truth(model, 1.6))
    assert len(fake.calls) == 2 and len(spy_calibrate) == 1
    first, second = fake.calls[0]["shapes"][0], fake.calls[1]["shapes"][0]
    assert truth(model, 1.6)(0, 0, first) > MAX_OVERSHOOT * 1.2
    assert sum(second.values()) > sum(first.values()), "the re-solved model prunes less"
    assert loss(second) < loss(first)
    assert res.widths == second and res.model is fake.calls[1]["models"][0]
    assert 1.2 * MIN_SPEEDUP_FRACTION <= res.measured_speedup <= 1.2 * MAX_OVERSHOOT
    assert res.calibration_loss == pytest.approx(loss(second))


def scripted_losses(monkeypatch, losses):
    """The real search, but the i-th call reports calibration loss ``losses[i]``."""
    calls = []

    def search(problem, target, loss_fn, **kw):
        levels, _, info = REAL_SEARCH(problem, target, loss_fn, **kw)
        calls.append(target)
        return levels, losses[len(calls) - 1], info

    monkeypatch.setattr(P, "search_target", search)
    return calls


def test_overshooting_candidate_kept_when_later_ones_are_worse(setup, monkeypatch, spy_calibrate):
    """Only the most accurate candidate that meets the target is delivered: a later candidate
    that misses it (even with lower loss) or meets it with higher loss does not replace it."""
    scripted_losses(monkeypatch, [0.5, 0.3, 0.1])
    # round 0: overshoot (kept, loss 0.5); round 1: overshoot again (kept, loss 0.3);
    # round 2: miss (loss 0.1, not kept)
    speeds = [1.5, 1.4, 1.1]
    (res,), fake, problem = solve(setup, monkeypatch, lambda call, i, s: speeds[call], max_corrections=2)
    assert len(fake.calls) == 3 and len(spy_calibrate) == 2
    assert res.model is fake.calls[1]["models"][0]
    assert res.widths == fake.calls[1]["shapes"][0]
    assert res.measured_speedup == 1.4 and res.calibration_loss == 0.3
    # the re-fits use every measurement so far
    assert [s for _, s in spy_calibrate[1]] == [1.5, 1.4]

    # a later in-window candidate with a HIGHER loss does not replace an earlier overshoot
    scripted_losses(monkeypatch, [0.2, 0.9])
    speeds2 = [1.5, 1.2]
    (res,), fake, _ = solve(setup, monkeypatch, lambda call, i, s: speeds2[call])
    assert len(fake.calls) == 2
    assert res.model is fake.calls[0]["models"][0] and res.measured_speedup == 1.5


def test_only_missed_targets_are_remeasured(setup, monkeypatch, spy_calibrate):
    # target 1.2 is hit on the first round; 1.4 overshoots once and is then hit
    def speed(call, i, shapes):
        return {(0, 0): 1.2, (0, 1): 1.7, (1, 0): 1.4}[(call, i)]

    res, fake, _ = solve(setup, monkeypatch, speed, targets=(1.2, 1.4))
    assert [len(c["models"]) for c in fake.calls] == [2, 1]
    assert [r.target for r in res] == [1.2, 1.4]
    assert res[0].model is fake.calls[0]["models"][0] and res[0].measured_speedup == 1.2
    assert res[1].model is fake.calls[1]["models"][0] and res[1].measured_speedup == 1.4


def test_target_missed_after_all_corrections_is_unreachable(setup, monkeypatch, spy_calibrate):
    # every candidate falls short of 0.97 x 1.2 = 1.164
    speeds = [1.15, 1.163, 1.14]  # (the re-fitted tables still reach 1.2x)
    with pytest.raises(UnreachableTargetError) as err:
        solve(setup, monkeypatch, lambda call, i, s: speeds[call], max_corrections=2)
    msg = str(err.value)
    assert "after 2 table correction(s)" in msg
    assert "1.2x measured 1.16x" in msg, msg  # the target and the best speedup measured for it
    assert "table maximum" in msg
    assert len(spy_calibrate) == 2  # corrected max_corrections times, measured max_corrections + 1 times


def test_target_unreachable_on_refitted_table_stops_early(setup, monkeypatch, spy_calibrate):
    model, *_ = setup
    # the machine saves only 30% of the predicted time: after the fit even removing every
    # prunable module is predicted below 1.2x, so there is nothing left to re-solve
    fake_speed = truth(model, 0.3)
    with pytest.raises(UnreachableTargetError, match=r"1\.2x measured 1\.0\dx") as err:
        solve(setup, monkeypatch, fake_speed, max_corrections=3)
    assert len(spy_calibrate) == 1
    assert "after 1 table correction(s)" in str(err.value)  # the corrections actually made
    assert "table maximum 1.18x" in str(err.value)  # dense / (dense - 0.3 x prunable) = 1 / 0.85


# ----------------------------------------------------------------------------- add_module_overheads


def overhead_table(model, dense_time):
    """Attention blocks of different native cost (0.08 / 0.12 at full width) so that the mean matters."""
    rows = {}
    for l in get_adapter(model).prunable_layers(model):
        full = (0.08 if l.block == 0 else 0.12) if l.kind == "attn" else 0.15
        rows[l.name] = {c: full * c / l.num_structures for c in set(layer_grid(l)) | {0, l.num_structures}}
    return LatencyTable(ENV, dense_time, sum(max(r.values()) for r in rows.values()), rows, meta={"model": "x"})


def mock_removal(monkeypatch, speedups):
    fake = FakeTiming(lambda call, i, shapes: speedups[i])
    monkeypatch.setattr(LAT, "measure_speedups", fake)
    return fake


def test_module_overheads_follow_the_formula(monkeypatch):
    model = tiny_llama()
    table = overhead_table(model, dense_time=2.0)
    L = 2  # modules of each kind
    s_attn = 1 / (1 - 0.13 * L / 2.0)   # one full attention module really costs 0.13 s
    s_ffn = 0.98                         # removing the FFNs "slowed the model down" (noise)
    fake = mock_removal(monkeypatch, [s_attn, s_ffn, 2.0])
    out = LAT.add_module_overheads(table, model, ENV, rounds=7)
    # the variants: every attention removed / every FFN removed, nothing else touched
    (call,) = fake.calls
    assert call["rounds"] == 7
    assert call["shapes"][0] == {"blocks.0.attn": 0, "blocks.0.ffn": 96, "blocks.1.attn": 0, "blocks.1.ffn": 96}
    assert call["shapes"][1] == {"blocks.0.attn": 2, "blocks.0.ffn": 0, "blocks.1.attn": 2, "blocks.1.ffn": 0}
    assert call["shapes"][2] == {"blocks.0.attn": 0, "blocks.0.ffn": 0, "blocks.1.attn": 0, "blocks.1.ffn": 0}
    assert get_adapter(model).shapes(model)["blocks.0.attn"] == 2  # the model itself is not modified

    real_attn = table.dense_time * (1 - 1 / s_attn) / L
    native_attn = (0.08 + 0.12) / 2
    oh_attn = max(0.0, real_attn - native_attn)
    assert oh_attn == pytest.approx(0.03)
    assert out.meta["module_overheads"] == {"attn": pytest.approx(oh_attn), "ffn": 0.0}
    assert out.meta["module_removal_speedups"] == {"attn": s_attn, "ffn": s_ffn}
    assert out.meta["model"] == "x" and out.env == table.env and out.dense_time == table.dense_time
    for name, row in table.layer_times.items():
        oh = oh_attn if name.endswith("attn") else 0.0
        for k, t in row.items():
            assert out.layer_times[name][k] == pytest.approx(t + oh if k > 0 else 0.0), (name, k)
    assert out.prunable_time == pytest.approx(table.prunable_time + L * oh_attn)
    assert table.meta == {"model": "x"} and table.layer_times["blocks.0.attn"][1] == pytest.approx(0.04)  # input kept


def test_module_overheads_of_both_kinds(monkeypatch):
    model = tiny_llama()
    table = overhead_table(model, dense_time=2.0)
    s_attn, s_ffn = 1 / (1 - 0.12), 1 / (1 - 0.2)  # real full modules: 0.12 s and 0.2 s
    mock_removal(monkeypatch, [s_attn, s_ffn, 2.0])
    out = LAT.add_module_overheads(table, model, ENV)
    assert out.meta["module_overheads"] == {"attn": pytest.approx(0.02), "ffn": pytest.approx(0.05)}
    assert out.layer_times["blocks.1.ffn"][1] == pytest.approx(0.15 / 96 + 0.05)
    assert out.layer_times["blocks.0.attn"][0] == 0.0 and out.layer_times["blocks.1.ffn"][0] == 0.0
    assert out.prunable_time == pytest.approx(sum(max(r.values()) for r in out.layer_times.values()))


@pytest.mark.parametrize("s_all, unprunable", [(1.25, 0.8), (1.0 / 0.0004, 0.001)])
def test_module_overheads_scaled_down_when_noise_exceeds_dense(monkeypatch, s_all, unprunable):
    model = tiny_llama()
    table = overhead_table(model, dense_time=1.0)  # prunable 0.5 of 1.0
    s_attn = 1 / (1 - 0.4 * 2 / 1.0)               # "a full attention module costs 0.4 s": impossible
    mock_removal(monkeypatch, [s_attn, 1.0, s_all])
    out = LAT.add_module_overheads(table, model, ENV)
    oh = 0.4 - 0.1
    assert out.meta["module_overheads"]["attn"] == pytest.approx(oh)
    # unscaled the prunable modules would take 1.1 s: every entry is scaled by one common factor
    # so that they leave the measured unprunable part (all modules removed: dense / s_all, at
    # least 0.1% of dense) in place
    limit = table.dense_time - unprunable
    scale = limit / (table.prunable_time + 2 * oh)
    for name, row in table.layer_times.items():
        add = oh if name.endswith("attn") else 0.0
        for k, t in row.items():
            want = (t + add) * scale if k > 0 else 0.0
            assert out.layer_times[name][k] == pytest.approx(want, abs=1e-12), (name, k)
    assert out.prunable_time == pytest.approx(limit)
    assert out.prunable_time == pytest.approx(sum(max(r.values()) for r in out.layer_times.values()))
    assert out.prunable_time <= limit + 1e-12 and out.unprunable_time >= unprunable - 1e-12
    assert all(t >= 0 for r in out.layer_times.values() for t in r.values())
    assert 1 < out.max_speedup() <= 1 / unprunable + 1e-9


# ----------------------------------------------------------------------------- build_baselines


def _grid_step_up(counts, level):
    larger = [c for c in counts if c > level]
    return min(larger) if larger else None


def test_uniform_and_magnitude_baselines(setup, monkeypatch):
    model, db, loss = setup
    monkeypatch.setattr(LAT, "measure_speedups", lambda *a, **kw: pytest.fail("measure=False must not time"))
    problem = SearchProblem(db, synthetic_table(model))
    targets = [1.2, 1.5, 3.0]  # 3.0 > table maximum 2.0
    out = P.build_baselines(model, db, problem, loss, targets,
                            make_run(problem.table, measure=False, baselines=("uniform", "magnitude")))
    assert set(out) == {"uniform", "magnitude"}
    for kind in out:
        assert [r["target"] for r in out[kind]] == [1.2, 1.5]  # the unreachable target is skipped
    names = problem.names
    for uni, mag in zip(out["uniform"], out["magnitude"]):
        t, levels = uni["target"], uni["widths"]
        budget = problem.budget(t)
        want = problem.to_widths(uniform_per_kind_levels(problem.grids, problem.times, budget, problem.kinds))
        assert levels == want
        # one width per kind (all layers of a kind share the grid here)
        for k in ("attn", "ffn"):
            assert len({levels[n] for n in names if n.endswith(k)}) == 1
        # meets the budget, and as tightly as possible: raising any one kind's width overshoots it
        used = sum(problem.table.layer_time(n, c) for n, c in levels.items())
        assert used <= budget + 1e-12
        assert uni["predicted_speedup"] == pytest.approx(problem.table.predict_speedup(levels))
        assert uni["predicted_speedup"] >= t * (1 - 1e-9)
        for k in ("attn", "ffn"):
            up = dict(levels)
            for n in names:
                if n.endswith(k):
                    nxt = _grid_step_up(db[n].grid, levels[n])
                    if nxt is not None:
                        up[n] = nxt
            if up != levels:
                assert sum(problem.table.layer_time(n, c) for n, c in up.items()) > budget
        assert levels != {n: db[n].layer.num_structures for n in names}
        # uniform: the OBS-updated model of the database at those levels
        assert same_weights(uni["model"], build_pruned_model(model, db, levels))
        assert uni["calibration_loss"] == pytest.approx(loss(levels))
        assert uni["num_parameters"] == num_parameters(uni["model"])
        # magnitude: same widths, magnitude selection, no calibration loss
        assert mag["widths"] == levels and mag["calibration_loss"] is None
        assert get_adapter(mag["model"]).shapes(mag["model"]) == levels
        assert same_weights(mag["model"], build_magnitude_model(model, levels))
        assert mag["predicted_speedup"] == uni["predicted_speedup"]
        assert uni["measured_speedup"] is None and mag["measured_speedup"] is None
    assert out["uniform"][1]["predicted_speedup"] > out["uniform"][0]["predicted_speedup"]
    assert P.build_baselines(model, db, problem, loss, targets, make_run(problem.table)) == {}


def test_baselines_measured_in_one_interleaved_call(setup, monkeypatch):
    model, db, loss = setup
    problem = SearchProblem(db, synthetic_table(model))
    fake = FakeTiming(lambda call, i, shapes: 1.0 + i / 10)
    monkeypatch.setattr(LAT, "measure_speedups", fake)
    out = P.build_baselines(model, db, problem, loss, [1.2, 1.5],
                            make_run(problem.table, rounds=4, baselines=("magnitude", "uniform")))
    (call,) = fake.calls
    assert call["rounds"] == 4 and len(call["models"]) == 4
    order = [out["magnitude"][0], out["uniform"][0], out["magnitude"][1], out["uniform"][1]]
    for i, row in enumerate(order):
        assert row["model"] is call["models"][i]
        assert row["measured_speedup"] == pytest.approx(1.0 + i / 10)


# ----------------------------------------------------------------------------- build_magnitude_model


def _zeroed_dense(model, drop: dict):
    """The dense model with the out-projection columns of the dropped structures set to zero."""
    z = copy.deepcopy(model)
    adapter = get_adapter(z)
    for layer in adapter.prunable_layers(z):
        if layer.name in drop:
            W = adapter.get_weight(z, layer)
            W[:, expand_groups(drop[layer.name], layer.group_size)] = 0
            adapter.set_weight(z, layer, W)
    return z


def _check_magnitude(model, levels, expected_keep, out_cols, inputs, output):
    pruned = build_magnitude_model(model, levels)
    adapter = get_adapter(model)
    assert adapter.shapes(pruned) == {**adapter.shapes(model), **levels}
    drop = {}
    for layer in adapter.prunable_layers(model):
        if layer.name not in expected_keep:
            continue
        keep = expected_keep[layer.name]
        drop[layer.name] = [s for s in range(layer.num_structures) if s not in keep]
        if keep:  # kept columns are the dense ones, unchanged (no weight update)
            dense_cols = out_cols(model, layer)[:, expand_groups(keep, layer.group_size)]
            assert torch.equal(out_cols(pruned, layer), dense_cols), layer.name
        else:
            assert adapter.is_removed(pruned, layer)
    ref = _zeroed_dense(model, drop)
    with torch.no_grad():
        torch.testing.assert_close(output(pruned(**inputs)), output(ref(**inputs)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(output(pruned(**inputs)), output(model(**inputs)), atol=1e-4)
    return pruned


def _topk(scores, k):
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:k])


def test_magnitude_llama_gqa_keeps_largest_kv_groups():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    hd, rep = 8, 2  # head_dim, query heads per KV group: a structure is 16 o_proj columns
    # per query-head scales: KV group ranking differs from the single-head ranking
    head_scale = [5.0, 0.1, 3.0, 3.0, 0.5, 0.5, 4.0, 0.2]
    with torch.no_grad():
        for blk in model.model.layers:
            W = blk.self_attn.o_proj.weight
            W.copy_(W / W.norm(dim=0, keepdim=True))
            for h, s in enumerate(head_scale):
                W[:, h * hd:(h + 1) * hd] *= s * torch.tensor([1.0, 1, 2, 2, 1, 1, 2, 2])
    # hand computation: squared norm of each KV group's head_dim x q_per_kv o_proj columns
    for blk in model.model.layers:
        W = blk.self_attn.o_proj.weight.detach()
        groups = [float(W[:, g * rep * hd:(g + 1) * rep * hd].pow(2).sum()) for g in range(4)]
        assert _topk(groups, 2) == [0, 1] and _topk(groups, 3) == [0, 1, 3]
        # the strongest single query heads (0 and 6) lie in groups 0 and 3: a per-head score would differ
        assert _topk([float(W[:, h * hd:(h + 1) * hd].pow(2).sum()) for h in range(8)], 2) == [0, 6]
        # so would columns grouped in the wrong (interleaved) order: columns c with c % 4 == s
        inter = W.reshape(W.shape[0], rep * hd, 4).pow(2).sum(dim=(0, 1)).tolist()
        assert _topk(inter, 2) != [0, 1]
    ffn_norms = [[float(blk.mlp.down_proj.weight.detach()[:, j].pow(2).sum()) for j in range(24)]
                 for blk in model.model.layers]
    levels = {"blocks.0.attn": 2, "blocks.1.attn": 3, "blocks.0.ffn": 10, "blocks.1.ffn": 0}
    expected = {"blocks.0.attn": [0, 1], "blocks.1.attn": [0, 1, 3], "blocks.0.ffn": _topk(ffn_norms[0], 10),
                "blocks.1.ffn": []}

    def cols(m, layer):
        return get_adapter(m).get_weight(m, layer)

    ids = calib(2, 12, seed=4) % 97
    pruned = _check_magnitude(model, levels, expected, cols, dict(input_ids=ids), lambda o: o.logits)
    # the query rows of the kept groups' heads survive too
    q_rows = expand_groups(expand_groups([0, 1], rep), hd)
    assert torch.equal(pruned.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight[q_rows])
    kv_rows = expand_groups([0, 1, 3], hd)
    assert torch.equal(pruned.model.layers[1].self_attn.k_proj.weight, model.model.layers[1].self_attn.k_proj.weight[kv_rows])


def _random_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_magnitude_gpt2_heads():
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=20)
    model = _random_biases(transformers.GPT2LMHeadModel(cfg).eval()).requires_grad_(False)
    hd = 8
    # Conv1D stores c_proj as (in, out): head h is rows h*hd:(h+1)*hd
    head_norms = [[float(b.attn.c_proj.weight[h * hd:(h + 1) * hd].pow(2).sum()) for h in range(4)]
                  for b in model.transformer.h]
    ffn_norms = [[float(b.mlp.c_proj.weight[j].pow(2).sum()) for j in range(20)] for b in model.transformer.h]
    levels = {"blocks.0.attn": 1, "blocks.1.attn": 3, "blocks.0.ffn": 0, "blocks.1.ffn": 7}
    expected = {"blocks.0.attn": _topk(head_norms[0], 1), "blocks.1.attn": _topk(head_norms[1], 3),
                "blocks.0.ffn": [], "blocks.1.ffn": _topk(ffn_norms[1], 7)}
    ids = calib(2, 12, seed=5) % 97
    _check_magnitude(model, levels, expected, lambda m, l: get_adapter(m).get_weight(m, l),
                     dict(input_ids=ids), lambda o: o.logits)


def test_magnitude_bert_heads():
    torch.manual_seed(2)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=20, max_position_embeddings=64)
    model = _random_biases(transformers.BertModel(cfg).eval()).requires_grad_(False)
    hd = 8
    head_norms = [[float(b.attention.output.dense.weight[:, h * hd:(h + 1) * hd].pow(2).sum()) for h in range(4)]
                  for b in model.encoder.layer]
    ffn_norms = [[float(b.output.dense.weight[:, j].pow(2).sum()) for j in range(20)] for b in model.encoder.layer]
    levels = {"blocks.0.attn": 2, "blocks.1.attn": 0, "blocks.0.ffn": 5, "blocks.1.ffn": 13}
    expected = {"blocks.0.attn": _topk(head_norms[0], 2), "blocks.1.attn": [],
                "blocks.0.ffn": _topk(ffn_norms[0], 5), "blocks.1.ffn": _topk(ffn_norms[1], 13)}
    ids = calib(2, 12, seed=6) % 97
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    _check_magnitude(model, levels, expected, lambda m, l: get_adapter(m).get_weight(m, l),
                     dict(input_ids=ids, attention_mask=mask), lambda o: o.last_hidden_state)
