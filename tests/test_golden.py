"""Golden behaviour of ``ziplm_ext.prune`` (one-shot ZipLM, synthetic latency table, no timing).

``tests/golden/golden.json`` was written by ``tests/golden/make_golden.py`` from the code before the
module reorganisation. These tests re-run the same prunes and require the same result: identical
levels (own and baselines'), predicted speedups and calibration losses to 1e-9 relative, and every
parameter of every pruned model bit-identical (sha256 of its bytes), also after save/load_pruned.

Only public entry points are used (``ziplm_ext.prune``, ``InferenceEnv``, ``LatencyTable``,
``load_pruned``). Regenerate the golden file only for an intended behaviour change:
``.venv/bin/python tests/golden/make_golden.py``.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

import ziplm_ext

_GEN_PATH = Path(__file__).parent / "golden" / "make_golden.py"
_spec = importlib.util.spec_from_file_location("ziplm_golden_make", _GEN_PATH)
G = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(G)

GOLDEN = json.loads(G.GOLDEN_PATH.read_text())
REL = 1e-9

_runs: dict = {}


def _run(family):
    """The prune of `family`, once per session (several tests inspect it)."""
    if family not in _runs:
        _runs[family] = G.run_prune(family)
    return _runs[family]


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-15)


def _param_diff(expected: dict, got: dict) -> list[str]:
    """One line per parameter whose name set, shape, dtype or bytes differ."""
    lines = []
    for name in sorted(set(expected) - set(got)):
        lines.append(f"missing parameter {name} {expected[name]['shape']}")
    for name in sorted(set(got) - set(expected)):
        lines.append(f"unexpected parameter {name} {got[name]['shape']}")
    for name in sorted(set(expected) & set(got)):
        e, g = expected[name], got[name]
        if e["shape"] != g["shape"] or e["dtype"] != g["dtype"]:
            lines.append(f"{name}: shape/dtype {g['shape']} {g['dtype']} != golden {e['shape']} {e['dtype']}")
        elif e["sha256"] != g["sha256"]:
            lines.append(f"{name}: same shape {g['shape']}, different bytes")
    return lines


def _check_inputs(family, dense):
    """Precondition: the same random model, calibration data and table as when golden.json was made
    (a failure here means the test inputs changed -- e.g. transformers' init --, not ziplm_ext)."""
    case = GOLDEN["cases"][family]
    diff = _param_diff(case["dense_params"], G.param_record(dense))
    assert not diff, f"{family}: the dense test model differs from the golden one (inputs changed):\n" + "\n".join(diff)
    assert G.tensor_sha256(G.calibration_ids(family)) == case["calibration_sha256"], "calibration ids changed"
    assert G.table_record(G.synthetic_table(family)) == case["table"], "synthetic latency table changed"


def test_golden_file_matches_generator_settings():
    assert GOLDEN["format"] == G.FORMAT
    assert sorted(GOLDEN["cases"]) == sorted(G.FAMILIES)
    s = GOLDEN["settings"]
    assert s["targets"] == list(G.TARGETS) and s["env"] == G.ENV and s["spdy_evaluations"] == G.SPDY_EVALUATIONS
    assert s["baselines"] == list(G.BASELINES)


@pytest.mark.parametrize("family", G.FAMILIES)
def test_golden_is_nontrivial(family):
    """The recorded runs actually prune: some layer below full width, targets differ, models shrink."""
    case = GOLDEN["cases"][family]
    full = {n: max(int(k) for k in row) for n, row in case["table"]["layer_times"].items()}
    res = case["results"]
    assert [r["target"] for r in res] == list(G.TARGETS)
    for r in res:
        assert set(r["levels"]) == set(full)
        assert any(r["levels"][n] < full[n] for n in full)
        assert r["num_parameters"] < case["dense_num_parameters"]
        assert r["predicted_speedup"] >= r["target"] * 0.999
    assert res[0]["levels"] != res[1]["levels"]


@pytest.mark.parametrize("family", G.FAMILIES)
def test_levels_speedups_losses_match_golden(family):
    fam, dense = _run(family)
    _check_inputs(family, dense)
    case = GOLDEN["cases"][family]
    assert _close(fam.dense_calibration_loss, case["dense_calibration_loss"]), \
        f"dense calibration loss {fam.dense_calibration_loss!r} != golden {case['dense_calibration_loss']!r}"
    assert fam.dense_num_parameters == case["dense_num_parameters"]
    assert [r.target for r in fam.results] == [r["target"] for r in case["results"]]
    for r, e in zip(fam.results, case["results"]):
        t = e["target"]
        assert dict(r.widths) == e["levels"], f"{family} {t:g}x: widths {dict(r.widths)} != golden {e['levels']}"
        assert _close(r.predicted_speedup, e["predicted_speedup"]), \
            f"{family} {t:g}x: predicted speedup {r.predicted_speedup!r} != golden {e['predicted_speedup']!r}"
        assert _close(r.calibration_loss, e["calibration_loss"]), \
            f"{family} {t:g}x: calibration loss {r.calibration_loss!r} != golden {e['calibration_loss']!r}"
        assert r.num_parameters == e["num_parameters"]
        assert r.measured_speedup is None  # measure=False
    assert sorted(fam.baselines) == sorted(case["baselines"])
    for kind, rows in case["baselines"].items():
        got = fam.baselines[kind]
        assert [row["target"] for row in got] == [row["target"] for row in rows], f"{family} {kind} targets"
        for g, e in zip(got, rows):
            t = e["target"]
            assert dict(g["widths"]) == e["levels"], f"{family} {kind} {t:g}x: widths {dict(g['widths'])} != golden"
            assert _close(g["predicted_speedup"], e["predicted_speedup"]), f"{family} {kind} {t:g}x: speedup"
            assert _close(g["calibration_loss"], e["calibration_loss"]), f"{family} {kind} {t:g}x: calibration loss"
            assert g["num_parameters"] == e["num_parameters"]


@pytest.mark.parametrize("family", G.FAMILIES)
def test_pruned_weights_bit_identical(family):
    fam, dense = _run(family)
    _check_inputs(family, dense)
    for r, e in zip(fam.results, GOLDEN["cases"][family]["results"]):
        diff = _param_diff(e["params"], G.param_record(r.model))
        assert not diff, f"{family} {e['target']:g}x: pruned weights differ from golden:\n" + "\n".join(diff)


@pytest.mark.parametrize("family", G.FAMILIES)
def test_save_load_pruned_bit_identical(family, tmp_path):
    fam, _ = _run(family)
    out = fam.save(tmp_path / "family")
    for e in GOLDEN["cases"][family]["results"]:
        loaded = ziplm_ext.load_pruned(out / f"target_{e['target']:g}x")
        diff = _param_diff(e["params"], G.param_record(loaded))
        assert not diff, f"{family} {e['target']:g}x after save/load_pruned:\n" + "\n".join(diff)


def test_config_form_equals_keyword_form():
    """``prune(config=PruneConfig(...))`` is the same run as the deprecated keyword form the golden
    file was made with: same widths, losses and bit-identical weights."""
    family = "llama"
    model = G.build_model(family)
    config = ziplm_ext.PruneConfig(baselines=G.BASELINES, seed=0, progress=False,
                                   search=ziplm_ext.SearchConfig(spdy_evaluations=G.SPDY_EVALUATIONS),
                                   measure=ziplm_ext.MeasureConfig(measure=False))
    with G.one_thread():
        fam = ziplm_ext.prune(model, G.calibration_ids(family), list(G.TARGETS), G.env(), config,
                              latency_table=G.synthetic_table(family))
    assert G.record(family, fam, model) == GOLDEN["cases"][family]
