"""One-shot pipeline: calibration, database, stitching and the end-to-end run on the real MiniLM."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ziplm_ext
from ziplm_ext.adapters import UnsupportedArchitectureError, get_adapter
from ziplm_ext.stages.calibrate import block_hessians, make_batches
from ziplm_ext.stages.database import build_database
from ziplm_ext.config import CalibrationConfig, MeasureConfig, PruneConfig, SearchConfig, TrainConfig
from ziplm_ext.stages.search.objective import StitchedLoss
from ziplm_ext.stages.slicing import build_pruned_model


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def calib(n=6, T=16, seed=1):
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


def test_block_hessians_match_direct_activations():
    model = tiny_llama()
    ids = calib()
    adapter = get_adapter(model)
    # reference: hooks on a full forward
    seen = {}
    hooks = []
    for layer in adapter.prunable_layers(model):
        def pre(mod, args, name=layer.name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            seen[name] = seen.get(name, 0) + x.T @ x
        hooks.append(adapter.out_proj(model, layer).register_forward_pre_hook(pre))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    got = {}
    for _, H, ntok in block_hessians(model, make_batches(ids, None, 4)):
        assert ntok == ids.numel()
        got.update(H)
    assert set(got) == set(seen)
    for name in seen:
        torch.testing.assert_close(got[name], seen[name], rtol=1e-5, atol=1e-6)


def test_database_resume_and_stitching_equals_slicing(tmp_path):
    model = tiny_llama()
    batches = make_batches(calib(), None, 4)
    db = build_database(model, batches, workdir=tmp_path, progress=False)
    files = sorted(p.name for p in (tmp_path / "database").glob("*.pt"))
    assert len(files) == 4
    db2 = build_database(model, batches, workdir=tmp_path, progress=False)  # resumes from disk
    for name in db.names():
        assert torch.equal(db[name].history.order, db2[name].history.order)
        torch.testing.assert_close(db[name].history.R, db2[name].history.R)
        errs = db[name].errors
        assert errs[0] == 0.0 and all(a <= b + 1e-9 for a, b in zip(errs, errs[1:])), "error grows as levels shrink"
    other = tiny_llama(seed=5)
    with pytest.raises(ValueError, match="fresh --workdir"):
        build_database(other, batches, workdir=tmp_path, progress=False)
    # stitched (zeroed columns) and physically sliced models compute the same function
    levels = {"blocks.0.attn": 1, "blocks.0.ffn": 40, "blocks.1.attn": 0, "blocks.1.ffn": 96}
    loss = StitchedLoss(model, db, calib(4, 16, seed=2), batch_size=2)
    loss.set_widths(levels)
    sliced = build_pruned_model(model, db, levels)
    ids = calib(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(sliced(input_ids=ids).logits, loss.work(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert get_adapter(sliced).shapes(sliced) == levels
    dense_levels = {n: db[n].layer.num_structures for n in db.names()}
    assert loss(dense_levels) == pytest.approx(0.0, abs=1e-6)
    assert loss(levels) > 0


def test_prune_rejects_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="must be > 1"):
        ziplm_ext.prune(model, calib(), [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        ziplm_ext.prune(model, torch.zeros(0, 16, dtype=torch.long), [1.5])
    with pytest.raises(ValueError, match="out of range"):
        ziplm_ext.prune(model, torch.full((4, 16), 500), [1.5])
    with pytest.raises(ValueError, match="needs tokenizer"):
        ziplm_ext.prune(model, ["some text"], [1.5])
    with pytest.raises(UnsupportedArchitectureError):
        ziplm_ext.prune(torch.nn.Linear(3, 3), calib(), [1.5])


def test_unreachable_target_names_the_maximum():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"unreachable: the most this model can gain .* is \d+\.\d+x"):
        ziplm_ext.prune(model, calib(), [1000.0], ziplm_ext.InferenceEnv(seq_len=16),
                        PruneConfig(progress=False, measure=MeasureConfig(latency_reps=3, rounds=2)))


@pytest.mark.slow
def test_end_to_end_real_minilm(tmp_path):
    """The real all-MiniLM-L6-v2 on real Wikipedia text: one target, measured, saved and reloaded.

    ZipLM's non-uniform, OBS-updated allocation must never have a higher calibration loss than the
    uniform baseline (same width fraction in every layer of a kind, OBS updates) at the same speedup
    target (ZipLM paper, comparison with uniform structured pruning)."""
    from ziplm_ext.eval.data import sentence_batches, wiki_split
    from ziplm_ext.io.models import load_minilm

    model, tok = load_minilm()
    ev = sentence_batches(wiki_split("eval"), tok, 64, 32, seed=0)
    config = PruneConfig(baselines=("uniform",), progress=False,
                         calibration=CalibrationConfig(num_blocks=8, loss_blocks=4),
                         search=SearchConfig(spdy_evaluations=20), measure=MeasureConfig(latency_reps=10, rounds=8))
    fam = ziplm_ext.prune(model, wiki_split("train"), [1.5], ziplm_ext.InferenceEnv(seq_len=128), config,
                          tokenizer=tok, eval_data=ev)
    (res,) = fam.results
    assert res.measured_speedup >= 0.97 * 1.5
    assert res.num_parameters < fam.dense_num_parameters
    ziplm_cos = res.metrics["embedding_cosine"]
    (uni,) = fam.baselines["uniform"]
    assert uni["target"] == 1.5 and uni["predicted_speedup"] >= 1.5 * (1 - 1e-9)
    uniform_cos = uni["metrics"]["embedding_cosine"]
    print(f"embedding cosine at 1.5x: ZipLM {ziplm_cos:.4f}, uniform {uniform_cos:.4f}")
    # The guarantee is on the calibration loss (the uniform allocation at the same budget is one of
    # the search's seeds, and a re-fit is kept only when it lowers the loss); held-out cosine
    # follows it but depends on which widths the end-to-end timing noise led to.
    assert res.calibration_loss <= uni["calibration_loss"] * (1 + 1e-6), (res.calibration_loss, uni["calibration_loss"])
    assert 0.3 < ziplm_cos <= 1.0 and 0.0 < uniform_cos <= 1.0, (ziplm_cos, uniform_cos)
    out = fam.save(tmp_path / "family")
    loaded = ziplm_ext.load_pruned(out / "target_1.5x")
    ids, mask = ev
    with torch.no_grad():
        a = res.model(input_ids=ids[:4], attention_mask=mask[:4]).last_hidden_state
        b = loaded(input_ids=ids[:4], attention_mask=mask[:4]).last_hidden_state
    assert torch.equal(a, b)
    assert (out / "family.json").exists() and (out / "latency_table.json").exists()


def test_ffn_levels_round_to_hardware_multiples():
    import functools

    from ziplm_ext.stages.levels import layer_grid

    model = tiny_llama()
    db = build_database(model, make_batches(calib(), None, 4), progress=False,
                        grid_fn=functools.partial(layer_grid, ffn_multiple=16))
    for name in db.names():
        e = db[name]
        if e.layer.kind == "ffn":
            assert all(k % 16 == 0 for k in e.grid) and e.grid[0] == 96 and e.grid[-1] == 0
        else:
            assert e.grid == list(range(e.layer.num_structures, -1, -1))


# ----------------------------------------------------------------------------- pruning a pruned model


def _synthetic_table(model, env):
    """Times proportional to the kept width on the default level grid (no timing in tests)."""
    from ziplm_ext.stages.latency.table import LatencyTable
    from ziplm_ext.stages.levels import layer_grid

    rows = {}
    for l in get_adapter(model).prunable_layers(model):
        full = 0.1 if l.kind == "attn" else 0.15
        rows[l.name] = {c: full * c / l.num_structures for c in set(layer_grid(l)) | {0, l.num_structures}}
    prunable = sum(max(r.values()) for r in rows.values())
    return LatencyTable(env=env, dense_time=2 * prunable, prunable_time=prunable, layer_times=rows)


def test_database_on_a_pruned_model_uses_current_widths():
    model = tiny_llama()
    batches = make_batches(calib(), None, 4)
    db = build_database(model, batches, progress=False)
    first = {"blocks.0.attn": 0, "blocks.0.ffn": 60, "blocks.1.attn": 1, "blocks.1.ffn": 96}
    pruned = build_pruned_model(model, db, first)
    db2 = build_database(pruned, batches, progress=False)
    assert "blocks.0.attn" not in db2.names()  # removed: nothing left to prune
    assert db2["blocks.0.ffn"].layer.num_structures == 60 and db2["blocks.0.ffn"].grid[0] == 60
    second = {"blocks.0.attn": 0, "blocks.0.ffn": 30, "blocks.1.attn": 1, "blocks.1.ffn": 50}
    loss = StitchedLoss(pruned, db2, calib(4, 16, seed=2), batch_size=2, reference=model)
    loss.set_widths(second)
    smaller = build_pruned_model(pruned, db2, second)
    assert get_adapter(smaller).shapes(smaller) == second
    ids = calib(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(smaller(input_ids=ids).logits, loss.work(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cannot keep 96 structures, the model has 60"):
        build_pruned_model(pruned, db2, {"blocks.0.ffn": 96})


def _gradual(model, targets, workdir, steps=3):
    from ziplm_ext.stages.distill import DistillConfig

    env = ziplm_ext.InferenceEnv(seq_len=16)
    config = PruneConfig(mode="gradual", workdir=workdir, progress=False,
                         train=TrainConfig(steps_per_target=steps, distill=DistillConfig(batch_size=4, lr=1e-3)),
                         measure=MeasureConfig(measure=False), search=SearchConfig(spdy_evaluations=6),
                         calibration=CalibrationConfig(loss_blocks=2))
    return ziplm_ext.prune(model, calib(8), targets, env, config, train_data=calib(16, 16, seed=7),
                           latency_table=_synthetic_table(model, env))


def test_gradual_resume_equals_uninterrupted(tmp_path):
    model = tiny_llama()
    full = _gradual(model, [1.3, 1.7], tmp_path / "a")
    assert [r.target for r in full] == [1.3, 1.7]
    shapes = [get_adapter(r.model).shapes(r.model) for r in full]
    assert all(shapes[1][n] <= shapes[0][n] for n in shapes[0])  # each target prunes the previous model
    for r in full:
        assert r.predicted_speedup >= r.target * 0.999
        assert r.training["steps"] == 3 and r.training["tokens_per_second"] > 0
    # "interrupted" after the first target, then resumed with the full list
    part = _gradual(model, [1.3], tmp_path / "b")
    resumed = _gradual(model, [1.3, 1.7], tmp_path / "b")
    assert (tmp_path / "b" / "gradual" / "target_1.3x" / "state.json").is_file()
    for a, b, c in zip(full, resumed, [part[0], None]):
        assert a.widths == b.widths
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        if c is not None:
            assert c.widths == a.widths
    with pytest.raises(ValueError, match="other settings"):
        _gradual(model, [1.3, 1.7], tmp_path / "b", steps=4)


def test_prune_routes_flop_and_checks_training_input(monkeypatch):
    import ziplm_ext.methods.flop.prune as F

    model = tiny_llama()
    with pytest.raises(ValueError, match="method='flop' trains: give train_data="):
        ziplm_ext.prune(model, calib(), [1.5], config=PruneConfig(method="flop"))
    with pytest.raises(ValueError, match="mode='gradual' fine-tunes after each target"):
        ziplm_ext.prune(model, calib(), [1.5], config=PruneConfig(mode="gradual"))
    with pytest.raises(ValueError, match="train_data token ids out of range"):
        ziplm_ext.prune(model, calib(), [1.5], config=PruneConfig(mode="gradual"), train_data=torch.full((2, 8), 999))
    with pytest.raises(ValueError, match="unknown mode"):
        PruneConfig(mode="sometimes")
    seen = {}
    monkeypatch.setattr(F, "flop_prune", lambda *a, **kw: seen.update(args=a, kw=kw) or "family")
    config = PruneConfig(method="flop", train=TrainConfig(steps_per_target=7), seed=3,
                         flop=ziplm_ext.FlopConfig(gate_lr=0.3))
    assert ziplm_ext.prune(model, calib(), [2, 1.5], config=config, train_data=calib(4)) == "family"
    flop_config = seen["args"][4]
    assert seen["args"][2] == [1.5, 2.0] and flop_config.steps == 7 and flop_config.gate_lr == 0.3
    assert flop_config.seed == 3 and flop_config.measure_rounds == 15 and seen["kw"]["distill"] is None


# ----------------------------------------------------------------------------- the deprecated keyword form


def test_legacy_keywords_warn_and_map_to_config(monkeypatch):
    """The 0.1 keyword form still works for one release: each keyword warns, naming its PruneConfig
    field, and sets exactly that field (the golden test runs the whole pipeline in this form)."""
    import ziplm_ext.api as A

    seen = {}
    monkeypatch.setattr(A, "prune_oneshot", lambda *a, **kw: seen.update(config=a[4]) or "oneshot")
    monkeypatch.setattr(A, "prune_gradual", lambda *a, **kw: seen.update(config=a[4], kw=kw) or "gradual")
    model = tiny_llama()
    warning = r"prune\(damp=\.\.\.\) is deprecated: set PruneConfig\.calibration\.damp"
    with pytest.warns(DeprecationWarning, match=warning):
        assert ziplm_ext.prune(model, calib(), [1.5], damp=0.5) == "oneshot"
    assert seen["config"] == PruneConfig(calibration=CalibrationConfig(damp=0.5))
    legacy = dict(num_calibration_blocks=8, loss_blocks=2, damp=0.1, ffn_multiple=16, spdy_evaluations=9,
                  measure=False, measure_rounds=3, latency_reps=4, max_corrections=1, workdir="w", seed=5,
                  progress=False, mode="gradual", steps_per_target=11, distill=ziplm_ext.DistillConfig(lr=1e-3))
    with pytest.warns(DeprecationWarning) as record:
        assert ziplm_ext.prune(model, calib(), [1.5], train_data=calib(4), **legacy) == "gradual"
    assert len(record) == len(legacy)
    for name, w in zip(legacy, record):
        assert f"prune({name}=...)" in str(w.message) and f"PruneConfig.{A.LEGACY_KEYWORDS[name]}" in str(w.message)
    assert seen["config"] == PruneConfig(
        mode="gradual", workdir="w", seed=5, progress=False,
        calibration=CalibrationConfig(num_blocks=8, loss_blocks=2, damp=0.1, ffn_multiple=16),
        search=SearchConfig(spdy_evaluations=9),
        measure=MeasureConfig(measure=False, rounds=3, latency_reps=4, max_corrections=1),
        train=TrainConfig(steps_per_target=11, distill=ziplm_ext.DistillConfig(lr=1e-3)))
    # keywords apply on top of a given config
    with pytest.warns(DeprecationWarning):
        ziplm_ext.prune(model, calib(), [1.5], None, PruneConfig(seed=2, baselines=("uniform",)), spdy_evaluations=5)
    assert seen["config"] == PruneConfig(seed=2, baselines=("uniform",), search=SearchConfig(spdy_evaluations=5))


def test_legacy_flop_options_and_unknown_keywords(monkeypatch):
    import ziplm_ext.methods.flop.prune as F

    seen = {}
    monkeypatch.setattr(F, "flop_prune", lambda *a, **kw: seen.update(args=a, kw=kw) or "family")
    model = tiny_llama()
    curve = object()
    with pytest.warns(DeprecationWarning, match="PruneConfig.flop"):
        ziplm_ext.prune(model, calib(), [1.5], method="flop", train_data=calib(4), steps_per_target=7,
                        flop_options=dict(gate_lr=0.3, max_shrinks=0, curve=curve))
    flop_config = seen["args"][4]
    assert (flop_config.steps, flop_config.gate_lr, flop_config.max_shrinks) == (7, 0.3, 0)
    assert seen["kw"]["curve"] is curve
    with pytest.raises(TypeError, match="unexpected keyword argument.*spdy_evalutions"):
        ziplm_ext.prune(model, calib(), [1.5], spdy_evalutions=5)
    with pytest.raises(TypeError, match="config must be a PruneConfig"):
        ziplm_ext.prune(model, calib(), [1.5], config=dict(seed=1))
    with pytest.raises(TypeError, match="env must be an InferenceEnv, got PruneConfig"):
        ziplm_ext.prune(model, calib(), [1.5], PruneConfig())


@pytest.mark.parametrize("make, message", [
    (lambda: PruneConfig(method="prune"), "unknown method 'prune'"),
    (lambda: PruneConfig(baselines=("uniform", "random")), "unknown baseline 'random'"),
    (lambda: PruneConfig(baselines="uniform"), "PruneConfig.baselines must be a sequence"),
    (lambda: PruneConfig(mode="gradual", baselines=("uniform",)), "baselines are built in mode='oneshot' only"),
    (lambda: PruneConfig(method="flop", baselines=("uniform",)), "baselines are built by method='ziplm' runs only"),
    (lambda: PruneConfig(seed=-1), "PruneConfig.seed must be an int >= 0"),
    (lambda: PruneConfig(progress=1), "PruneConfig.progress must be True or False"),
    (lambda: PruneConfig(calibration=dict(damp=0.1)), "PruneConfig.calibration must be a CalibrationConfig"),
    (lambda: PruneConfig(flop=ziplm_ext.FlopConfig(steps=5)), "PruneConfig.flop.steps is taken from "
                                                              "PruneConfig.train.steps_per_target"),
    (lambda: CalibrationConfig(num_blocks=0), "CalibrationConfig.num_blocks must be an int >= 1"),
    (lambda: CalibrationConfig(damp=float("nan")), "CalibrationConfig.damp must be a finite number >= 0"),
    (lambda: CalibrationConfig(ffn_multiple=2.0), "CalibrationConfig.ffn_multiple must be an int >= 1"),
    (lambda: SearchConfig(spdy_evaluations=0), "SearchConfig.spdy_evaluations must be an int >= 1"),
    (lambda: MeasureConfig(rounds=0), "MeasureConfig.rounds must be an int >= 1"),
    (lambda: MeasureConfig(max_corrections=-1), "MeasureConfig.max_corrections must be an int >= 0"),
    (lambda: MeasureConfig(measure="no"), "MeasureConfig.measure must be True or False"),
    (lambda: TrainConfig(steps_per_target=-1), "TrainConfig.steps_per_target must be an int >= 0"),
    (lambda: TrainConfig(distill={"lr": 1}), "TrainConfig.distill must be a DistillConfig"),
    (lambda: ziplm_ext.FlopConfig(warmup_frac=2), r"FlopConfig.warmup_frac must lie in \[0, 1\]"),
    (lambda: ziplm_ext.FlopConfig(curve_densities=()), "FlopConfig.curve_densities must be densities"),
    (lambda: ziplm_ext.FlopConfig(gate_lr=0), "FlopConfig.gate_lr must be a finite number > 0"),
])
def test_config_rejects_bad_fields(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_configs_are_frozen_and_normalised():
    config = PruneConfig(baselines=["magnitude"])
    assert config.baselines == ("magnitude",)
    with pytest.raises(AttributeError):
        config.seed = 3
    assert ziplm_ext.FlopConfig(curve_densities=[0.5, 0.25]).curve_densities == (0.5, 0.25)
    assert PruneConfig(method="flop", seed=4, progress=False).flop_config() == ziplm_ext.FlopConfig(
        steps=100, seed=4, progress=False)
