"""Generate ``tests/golden/golden.json``: the behaviour of today's ``ziplm_ext.prune`` on three tiny
random models (LLaMA with GQA, GPT-2, BERT), recorded so that a refactor can be proven to change nothing.

    .venv/bin/python tests/golden/make_golden.py          # rewrite golden.json
    .venv/bin/python tests/golden/make_golden.py --out /tmp/g.json   # compare another checkout

Only public entry points are used (``ziplm_ext.prune``, ``InferenceEnv``, ``LatencyTable``), so the
same code keeps working after the package's modules are reorganised. ``tests/test_golden.py``
imports this file for the model / data / table builders and compares a fresh run to golden.json.

Everything is deterministic: model weights come from ``torch.manual_seed`` + transformers' init,
calibration ids from a seeded ``torch.Generator``, the latency table from a closed-form formula (no
timing), and the run is pinned to one intra-op thread (float reductions can depend on the thread
count, which would make bit-exact weight hashes machine dependent).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch
import transformers

import ziplm_ext

GOLDEN_PATH = Path(__file__).with_name("golden.json")
FORMAT = 1

FAMILIES = ("llama", "gpt2", "bert")
TARGETS = (1.5, 2.0)
VOCAB = 100
SEQ = 16
N_CALIB = 8
SPDY_EVALUATIONS = 12
BASELINES = ("uniform", "magnitude")
ENV = dict(device="cpu", dtype="float32", batch_size=1, seq_len=SEQ, mode="prefill")

# Structures per prunable layer of each tiny model: (attention structures, FFN neurons, blocks).
# LLaMA with GQA prunes whole KV groups (2 groups of 2 query heads), GPT-2/BERT single heads.
SHAPES = {"llama": (2, 96, 3), "gpt2": (4, 80, 3), "bert": (4, 72, 3)}


def build_model(family: str) -> torch.nn.Module:
    """A tiny random model; weights fixed by ``torch.manual_seed`` (transformers' own init)."""
    torch.manual_seed({"llama": 11, "gpt2": 12, "bert": 13}[family])
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       initializer_range=0.2)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_inner=80, n_positions=64,
                                      initializer_range=0.2, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=72, max_position_embeddings=64, initializer_range=0.2)
        model = transformers.BertModel(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def calibration_ids(family: str) -> torch.Tensor:
    g = torch.Generator().manual_seed({"llama": 21, "gpt2": 22, "bert": 23}[family])
    return torch.randint(0, VOCAB, (N_CALIB, SEQ), generator=g)


def env() -> "ziplm_ext.InferenceEnv":
    return ziplm_ext.InferenceEnv(**ENV)


def level_grid(kind: str, full: int) -> list[int]:
    """The kept counts the table prices: the package's default level grid, written out here so the
    test does not depend on internals (every head count for attention; for the FFN the geometric
    grid round(full * 0.9**i) while 0.9**i >= 0.01, plus full width and 0). Pricing exactly this
    grid keeps the search space the same whether prune() takes its grid from the package default
    or from the counts a given table has times for."""
    if kind == "attn":
        return list(range(full + 1))
    out, frac = {0, full}, 1.0
    while frac >= 0.01 * (1 - 1e-12):
        out.add(min(max(1, int(round(full * frac))), full))
        frac *= 0.9
    return sorted(out)


def table_rows(family: str) -> dict[str, dict[int, float]]:
    """Closed-form synthetic per-layer times on the level grid. Each kept module pays a fixed
    overhead plus a part that grows with its width (attention with a small superlinear term);
    layers of different blocks cost a little differently so the search has real trade-offs."""
    n_attn, n_ffn, blocks = SHAPES[family]
    rows: dict[str, dict[int, float]] = {}
    for b in range(blocks):
        a_full = 1.0e-3 * (1.0 + 0.15 * b)
        f_full = 1.5e-3 * (1.0 + 0.10 * ((b * 2) % 3))
        rows[f"blocks.{b}.attn"] = {
            c: (0.0 if c == 0 else a_full * (0.25 + 0.6 * c / n_attn + 0.15 * (c / n_attn) ** 2))
            for c in level_grid("attn", n_attn)}
        rows[f"blocks.{b}.ffn"] = {
            c: (0.0 if c == 0 else f_full * (0.15 + 0.85 * c / n_ffn))
            for c in level_grid("ffn", n_ffn)}
    return rows


def synthetic_table(family: str) -> "ziplm_ext.LatencyTable":
    rows = table_rows(family)
    prunable = sum(r[max(r)] for r in rows.values())
    dense = prunable / 0.8  # 20% of the dense time is unprunable (embeddings, head, norms)
    return ziplm_ext.LatencyTable(env=env(), dense_time=dense, prunable_time=prunable, layer_times=rows,
                                  meta={"synthetic": "tests/golden/make_golden.py"})


def table_record(table) -> dict:
    return dict(dense_time=table.dense_time, prunable_time=table.prunable_time,
                layer_times={n: {str(k): t for k, t in row.items()} for n, row in table.layer_times.items()})


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def param_record(model: torch.nn.Module) -> dict[str, dict]:
    """Shape, dtype and sha256 of every parameter (tied ones under each name)."""
    return {name: dict(shape=list(p.shape), dtype=str(p.dtype).replace("torch.", ""), sha256=tensor_sha256(p))
            for name, p in model.named_parameters(remove_duplicate=False)}


def run_prune(family: str):
    """The golden prune of one family. Returns (family result, dense model)."""
    model = build_model(family)
    ids = calibration_ids(family)
    with one_thread():
        fam = ziplm_ext.prune(model, ids, targets=list(TARGETS), env=env(), latency_table=synthetic_table(family),
                              measure=False, seed=0, progress=False, spdy_evaluations=SPDY_EVALUATIONS,
                              baselines=BASELINES)
    return fam, model


def record(family: str, fam, dense_model) -> dict:
    results = []
    for r in fam.results:
        results.append(dict(target=r.target, levels=dict(r.widths), predicted_speedup=r.predicted_speedup,
                            calibration_loss=r.calibration_loss, num_parameters=r.num_parameters,
                            params=param_record(r.model)))
    baselines = {kind: [dict(target=row["target"], levels=dict(row["widths"]),
                             predicted_speedup=row["predicted_speedup"], calibration_loss=row["calibration_loss"],
                             num_parameters=row["num_parameters"]) for row in rows]
                 for kind, rows in fam.baselines.items()}
    return dict(
        dense_params=param_record(dense_model),   # inputs check: same random model as when generated
        calibration_sha256=tensor_sha256(calibration_ids(family)),
        table=table_record(synthetic_table(family)),
        dense_calibration_loss=fam.dense_calibration_loss,
        dense_num_parameters=fam.dense_num_parameters,
        results=results,
        baselines=baselines,
    )


def run_case(family: str) -> dict:
    fam, dense = run_prune(family)
    return record(family, fam, dense)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=GOLDEN_PATH, help="where to write (default: %(default)s)")
    path = ap.parse_args(argv).out
    out = dict(
        format=FORMAT,
        generated_with=dict(torch=torch.__version__, transformers=transformers.__version__,
                            ziplm_ext=getattr(ziplm_ext, "__version__", "?")),
        settings=dict(targets=list(TARGETS), env=ENV, spdy_evaluations=SPDY_EVALUATIONS, seed=0,
                      baselines=list(BASELINES), num_calibration=N_CALIB, threads=1),
        cases={f: run_case(f) for f in FAMILIES},
    )
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes) using {ziplm_ext.__file__}")
    for f, case in out["cases"].items():
        for r in case["results"]:
            print(f"  {f} {r['target']:g}x: speedup {r['predicted_speedup']:.4f} loss {r['calibration_loss']:.6g} "
                  f"levels {r['levels']}")
        for kind, rows in case["baselines"].items():
            for row in rows:
                print(f"    {kind} {row['target']:g}x: {row['levels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
