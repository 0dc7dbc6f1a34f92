"""write_report on a duck-typed fake family: both files, the numbers, a valid PNG, no leftovers."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

pytest.importorskip("matplotlib")

from ziplm_ext.stages.latency.table import InferenceEnv, LatencyTable  # noqa: E402
from ziplm_ext.report import (REPORT_MD, REPORT_PNG, best_per_target, quality_key, render_markdown,  # noqa: E402
                              summary_table, write_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class FakeResult:
    target: float
    predicted_speedup: float
    measured_speedup: float | None
    calibration_loss: float
    num_parameters: int
    metrics: dict = field(default_factory=dict)
    widths: dict = field(default_factory=dict)
    model: object = None


def make_family(metric="perplexity", measured=True):
    env = InferenceEnv(device="cpu", dtype="float32", batch_size=1, seq_len=128)
    table = LatencyTable(env=env, dense_time=0.0123, prunable_time=0.0101,
                         layer_times={"blocks.0.attn": {0: 0.0, 1: 0.002, 2: 0.004},
                                      "blocks.0.ffn": {0: 0.0, 4: 0.003, 8: 0.0061}})

    def m(v):
        return {metric: v} if metric else {}

    results = [
        FakeResult(1.5, 1.52, 1.47 if measured else None, 2.3456, 101_234_567, m(23.4567 if metric == "perplexity" else 0.9712)),
        FakeResult(2.0, 2.01, 1.93 if measured else None, 2.9876, 80_123_456, m(31.2345 if metric == "perplexity" else 0.9433)),
    ]
    baselines = {"uniform": [
        {"target": 1.5, "measured_speedup": 1.51, "calibration_loss": 2.7777, "metrics": m(27.8888 if metric == "perplexity" else 0.9555)},
        {"target": 2.0, "measured_speedup": 2.04, "calibration_loss": 3.5556, "metrics": m(45.6789 if metric == "perplexity" else 0.9011)},
    ]}
    return SimpleNamespace(
        results=results, env=env, latency_table=table,
        dense_calibration_loss=2.0101, dense_num_parameters=134_515_008,
        dense_metrics=m(19.8765 if metric == "perplexity" else 1.0),
        baselines=baselines,
        stage_seconds={"calibration": 12.5, "database": 300.25, "latency": 40.0, "search": 5.5,
                       "export": 3.0, "evaluation": 20.0},
        model_name="smollm2",
    )


def test_write_report_files_numbers_png(tmp_path):
    fam = make_family()
    md_path, png_path = write_report(fam, tmp_path)
    assert md_path == tmp_path / REPORT_MD and png_path == tmp_path / REPORT_PNG
    assert md_path.is_file() and png_path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([REPORT_MD, REPORT_PNG])  # no temp files

    md = md_path.read_text()
    for s in ["smollm2", "cpu/float32/prefill/bs1x128", "12.300 ms",
              "1.50x", "2.00x", "1.52x", "1.47x", "2.01x", "1.93x", "1.51x", "2.04x",
              "2.346", "2.988", "2.778", "3.556", "23.46", "31.23", "27.89", "45.68", "19.88",
              "101,234,567", "80,123,456", "134,515,008", "uniform", "ZipLM",
              "calibration", "database", "search", "evaluation", "300 s (5.0 min)", "12.50 s",
              REPORT_PNG]:
        assert s in md, s
    # best per target section: ZipLM wins both (lower perplexity)
    best = md.split("## Best method per target", 1)[1]
    assert "**1.50x:** ZipLM" in best and "**2.00x:** ZipLM" in best

    data = png_path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_write_report_overwrites_and_creates_dir(tmp_path):
    d = tmp_path / "new" / "dir"
    write_report(make_family(), d)
    write_report(make_family(), d)  # second write replaces atomically
    assert sorted(p.name for p in d.iterdir()) == sorted([REPORT_MD, REPORT_PNG])


def test_quality_key_fallbacks_and_best():
    assert quality_key(make_family("perplexity")) == "perplexity"
    assert quality_key(make_family("embedding_cosine")) == "embedding_cosine"
    assert quality_key(make_family(None)) == "calibration_loss"

    fam = make_family("embedding_cosine")
    fam.baselines["uniform"][0]["metrics"]["embedding_cosine"] = 0.99  # higher is better -> uniform wins at 1.5
    best = {t: row["method"] for t, row, _ in best_per_target(fam)}
    assert best == {1.5: "uniform", 2.0: "ZipLM"}


def test_report_without_measurement_or_metrics(tmp_path):
    fam = make_family(None, measured=False)
    fam.stage_seconds = {}
    md_path, png_path = write_report(fam, tmp_path)
    md = md_path.read_text()
    assert "n/a" in md and "No stage timing recorded." in md
    assert png_path.read_bytes()[:8] == PNG_MAGIC


def test_markdown_from_minimal_namespace():
    fam = SimpleNamespace(results=[], baselines={}, env=None, latency_table=None, stage_seconds=None,
                          dense_calibration_loss=None, dense_num_parameters=None, dense_metrics=None,
                          model_name=None)
    md = render_markdown(fam)
    assert "No pruned results." in md


def test_report_labels_the_family_method_and_handles_no_table(tmp_path):
    fam = make_family()
    fam.method = "FLOP"
    fam.latency_table = None
    fam.baselines = {}
    md = render_markdown(fam)
    assert "| FLOP | 1.50x" in md and "| ZipLM |" not in md
    md_path, png_path = write_report(fam, tmp_path / "r")
    assert png_path.read_bytes()[:8] == PNG_MAGIC


def test_kept_structures_per_layer_from_widths():
    fam = make_family()
    assert "Kept structures" not in render_markdown(fam)  # no widths recorded: no section
    fam.results[0].widths = {"blocks.0.attn": 2, "blocks.0.ffn": 6}
    fam.results[1].widths = {"blocks.0.attn": 1, "blocks.0.ffn": 4}
    md = render_markdown(fam)
    section = md.split("## Kept structures per layer", 1)[1]
    assert "| layer | 1.50x | 2.00x |" in section
    assert "| blocks.0.attn | 2 | 1 |" in section and "| blocks.0.ffn | 6 | 4 |" in section


def test_kept_structures_accept_the_old_levels_key():
    # family.json written before the rename PrunedResult.levels -> widths
    fam = make_family()
    fam.results = [dict(target=r.target, predicted_speedup=r.predicted_speedup, measured_speedup=r.measured_speedup,
                        calibration_loss=r.calibration_loss, num_parameters=r.num_parameters, metrics=r.metrics,
                        levels={"blocks.0.attn": k, "blocks.0.ffn": 2 * k}) for r, k in zip(fam.results, (2, 1))]
    section = render_markdown(fam).split("## Kept structures per layer", 1)[1]
    assert "| blocks.0.attn | 2 | 1 |" in section and "| blocks.0.ffn | 4 | 2 |" in section
    fam.results[1]["widths"] = fam.results[1].pop("levels")  # the new key, mixed with the old one
    assert render_markdown(fam).split("## Kept structures per layer", 1)[1] == section


def test_summary_table():
    lines = summary_table(make_family()).splitlines()
    assert lines[0].split() == ["method", "target", "pred", "measured", "params", "ppl"]
    assert lines[1].split() == ["dense", "-", "1.00x", "1.00x", "134,515,008", "19.88"]
    assert [ln.split()[:2] for ln in lines[2:]] == [["ZipLM", "1.50x"], ["uniform", "1.50x"],
                                                    ["ZipLM", "2.00x"], ["uniform", "2.00x"]]
    assert lines[2].split()[2:] == ["1.52x", "1.47x", "101,234,567", "23.46"]
    assert summary_table(make_family(None, measured=False)).splitlines()[0].split()[-1] == "calib_loss"
