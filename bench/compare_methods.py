"""Compare structured-pruning methods at the same measured speedups, with the same training budget.

Methods (ISSUE 4, "README comparison"):
  oneshot    one-shot ZipLM (no training)
  gradual    gradual ZipLM: per target, prune the previous model with fresh Hessians, then fine-tune
             with token-level distillation from the dense model for --steps steps
  magnitude  magnitude (L2) structured pruning at the one-shot ZipLM model's widths (so the same
             shapes and speed), then the same distillation fine-tuning
  flop       FLOP: SVD factorisation with hard-concrete gates, trained with the same distillation
             objective plus its Lagrangian, exported to thin matrices

Same budget: the model delivered for the i-th target (1-based, increasing) has seen i * --steps
fine-tuning steps in every method that trains (gradual: --steps per stage, i stages; magnitude and
FLOP: i * --steps steps from the dense model), on the same training blocks, batch size, learning rate
and loss weights.  All delivered models are finally timed together, interleaved, against the dense
model in the same environment, and evaluated on the same held-out split.

    python bench/compare_methods.py --model smollm2 --targets 1.5 2 --steps 24 \
        --out bench/results/compare_smollm2_cpu

Writes results.json, comparison.md and quality_vs_speedup.png into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import ziplm_ext
from ziplm_ext.eval import data as D
from ziplm_ext.io import models as M
from ziplm_ext.stages.distill import DistillConfig, finetune
from ziplm_ext.eval.evaluate import evaluate_model
from ziplm_ext.stages.latency.build import measure_speedups
from ziplm_ext.adapters import is_causal_lm
from ziplm_ext.config import (CalibrationConfig, MeasureConfig, PruneConfig, SearchConfig,
                              TrainConfig)
from ziplm_ext.results import num_parameters
from ziplm_ext.stages.slicing import build_magnitude_model

METHODS = ("oneshot", "gradual", "magnitude", "flop")
LABELS = {"oneshot": "ZipLM one-shot", "gradual": "ZipLM gradual + distillation",
          "magnitude": "magnitude + distillation", "flop": "FLOP + distillation"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 | minilm | a model directory")
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=24, help="fine-tuning steps per target stage")
    ap.add_argument("--train-batch-size", type=int, default=2)
    ap.add_argument("--train-blocks", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--num-calibration", type=int, default=32)
    ap.add_argument("--num-eval", type=int, default=16)
    ap.add_argument("--spdy-evaluations", type=int, default=40)
    ap.add_argument("--measure-rounds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    model, tok = M.load_model(args.model)
    model.eval()
    causal = is_causal_lm(model)
    env = ziplm_ext.InferenceEnv(device="cpu", batch_size=1, seq_len=args.seq_len)
    train_texts, eval_texts = D.wiki_split("train"), D.wiki_split("eval")
    if causal:
        train = D.token_blocks(train_texts, tok, args.seq_len, args.train_blocks, seed=args.seed + 1)
        ev = D.token_blocks(eval_texts, tok, args.seq_len, args.num_eval, seed=args.seed)
    else:
        train = D.sentence_batches(train_texts, tok, args.seq_len, args.train_blocks, seed=args.seed + 1)
        ev = D.sentence_batches(eval_texts, tok, args.seq_len, 8 * args.num_eval, seed=args.seed)
    cfg = DistillConfig(lr=args.lr, batch_size=args.train_batch_size, seed=args.seed)
    common = dict(tokenizer=tok, eval_data=ev, model_name=args.model)
    base_cfg = PruneConfig(calibration=CalibrationConfig(num_blocks=args.num_calibration),
                           search=SearchConfig(spdy_evaluations=args.spdy_evaluations),
                           measure=MeasureConfig(rounds=args.measure_rounds), seed=args.seed)
    targets = sorted(args.targets)
    rows: list[dict] = []      # one per delivered model
    models: list = []          # the delivered models, in `rows` order
    seconds: dict[str, float] = {}

    def deliver(method, target, m, training=None, extra=None):
        rows.append(dict(method=method, target=target, num_parameters=num_parameters(m), training=training or {},
                         **(extra or {})))
        models.append(m)

    log(f"{args.model}: one-shot ZipLM {targets}")
    t0 = time.perf_counter()
    oneshot = ziplm_ext.prune(model, train_texts, targets, env, base_cfg, **common)
    seconds["oneshot"] = time.perf_counter() - t0
    table = oneshot.latency_table
    if "oneshot" in args.methods:
        for r in oneshot.results:
            deliver("oneshot", r.target, r.model, extra=dict(widths=r.widths, run_speedup=r.measured_speedup))

    if "gradual" in args.methods:
        log("gradual ZipLM + distillation")
        t0 = time.perf_counter()
        gradual_cfg = dataclasses.replace(base_cfg, mode="gradual", workdir=str(out / "work_gradual"),
                                          train=TrainConfig(steps_per_target=args.steps, distill=cfg))
        fam = ziplm_ext.prune(model, train_texts, targets, env, gradual_cfg, train_data=train, latency_table=table,
                              **common)
        seconds["gradual"] = time.perf_counter() - t0
        for r in fam.results:
            deliver("gradual", r.target, r.model, r.training, dict(widths=r.widths, run_speedup=r.measured_speedup))

    if "magnitude" in args.methods:
        log("magnitude + distillation")
        t0 = time.perf_counter()
        for i, r in enumerate(oneshot.results):
            m = build_magnitude_model(model, r.widths)
            st = finetune(m, model, train, (i + 1) * args.steps, dataclasses.replace(cfg, seed=args.seed + 100 + i),
                          desc=f"magnitude {r.target:g}x")
            m.eval()
            deliver("magnitude", r.target, m, dict(steps=st.steps, tokens=st.tokens,
                                                   tokens_per_second=st.tokens_per_second, final=st.final),
                    dict(widths=r.widths))
        seconds["magnitude"] = time.perf_counter() - t0

    if "flop" in args.methods:
        from ziplm_ext.methods.flop import FlopConfig, flop_prune

        log("FLOP + distillation")
        t0 = time.perf_counter()
        curve = None  # the speedup-to-size curve is measured once and reused for every target
        for i, t in enumerate(targets):
            options = FlopConfig(steps=(i + 1) * args.steps, seed=args.seed, measure_rounds=args.measure_rounds)
            fam = flop_prune(model, train, [t], env, options, distill=cfg, eval_data=None, model_name=args.model,
                             curve=curve)
            curve = fam.speedup_curve
            (r,) = fam.results
            deliver("flop", t, r.model, dict(steps=(i + 1) * args.steps, **r.metrics),
                    dict(run_speedup=r.measured_speedup))
        seconds["flop"] = time.perf_counter() - t0

    log(f"final interleaved timing of {len(models)} models")
    speeds = measure_speedups(model, models, env, rounds=2 * args.measure_rounds)
    dense_metrics = evaluate_model(model, model, ev)
    for row, m, s in zip(rows, models, speeds):
        row["measured_speedup"] = s
        row["metrics"] = evaluate_model(m, model, ev)
    result = dict(model=args.model, env=env.to_dict(), targets=targets, steps_per_stage=args.steps,
                  distill=dataclasses.asdict(cfg), train_blocks=args.train_blocks, dense_metrics=dense_metrics,
                  dense_num_parameters=num_parameters(model), seconds=seconds, rows=rows,
                  host=table.meta.get("host"), date=time.strftime("%Y-%m-%d"))
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "comparison.md").write_text(render_markdown(result))
    plot(result, out / "quality_vs_speedup.png")
    print(render_markdown(result))
    return 0


def _quality_key(result) -> str:
    return "perplexity" if "perplexity" in result["dense_metrics"] else "embedding_cosine"


def render_markdown(result) -> str:
    key = _quality_key(result)
    label = "held-out perplexity (lower is better)" if key == "perplexity" else "embedding cosine to dense (higher is better)"
    env = result["env"]
    L = [f"# Method comparison: {result['model']}", "",
         f"- Environment: {env['device']} {env['dtype']}, batch {env['batch_size']} x {env['seq_len']} tokens "
         f"({env['mode']}); host {result.get('host')}; {result.get('date')}",
         f"- Training budget: {result['steps_per_stage']} steps per target stage (target i: i x that many "
         f"steps in total), batch {result['distill']['batch_size']}, lr {result['distill']['lr']:g}, "
         f"{result['train_blocks']} training blocks, same distillation loss for every trained method",
         f"- Quality: {label}; dense: {result['dense_metrics'][key]:.4g}, "
         f"{result['dense_num_parameters'] / 1e6:.1f}M parameters", "",
         "| target | method | measured speedup (final, interleaved) | parameters | quality | train tokens/s |",
         "|---|---|---|---|---|---|"]
    for t in result["targets"]:
        for row in [r for r in result["rows"] if r["target"] == t]:
            tps = row["training"].get("tokens_per_second") or row["training"].get("train_tokens_per_second")
            L.append(f"| {t:g}x | {LABELS[row['method']]} | {row['measured_speedup']:.2f}x | "
                     f"{row['num_parameters'] / 1e6:.1f}M | {row['metrics'][key]:.4g} | "
                     f"{'-' if tps is None else format(tps, '.0f')} |")
    L += ["", "Wall-clock seconds per method: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items())]
    return "\n".join(L) + "\n"


def plot(result, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key = _quality_key(result)
    fig = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for method in METHODS:
        pts = sorted((r["measured_speedup"], r["metrics"][key]) for r in result["rows"] if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=LABELS[method])
    ax.scatter([1.0], [result["dense_metrics"][key]], marker="*", s=120, color="black", label="dense", zorder=5)
    if key == "perplexity":
        ax.set_yscale("log")
    ax.set_xlabel("measured speedup over dense")
    ax.set_ylabel("held-out perplexity" if key == "perplexity" else "embedding cosine to dense")
    ax.set_title(f"{result['model']}: quality vs measured speedup")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
