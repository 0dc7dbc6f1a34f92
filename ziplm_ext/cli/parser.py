"""The ``ziplm`` argument parser: ``prune | latency | eval | export``, one-line usage errors (exit code 2).

No command logic here: :func:`ziplm_ext.cli.commands.main` dispatches on ``args.command``.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["PROG", "EXIT_USAGE", "EXIT_INTERRUPTED", "build_parser"]

PROG = "ziplm"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``ziplm: error: ...``), exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    return v


def _add_env_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference environment (what the latency table is measured for)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda[:N] (default: cpu)")
    g.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="inference dtype (default: float32)")
    g.add_argument("--batch-size", type=_positive_int, default=1, help="inference batch size (default: 1)")
    g.add_argument("--seq-len", type=_positive_int, default=128,
                   help="sequence length (prefill) or KV-cache length (decode) (default: 128)")
    g.add_argument("--mode", default="prefill", choices=("prefill", "decode"), help="(default: prefill)")
    g.add_argument("--engine", default="torch", choices=("torch", "llama.cpp", "onnxruntime"),
                   help="runtime the speedups are measured and guaranteed in: torch (eager), llama.cpp (GGUF, "
                        "LLaMA family; needs the llamacpp extra), onnxruntime (BERT family; needs the onnx extra) "
                        "(default: torch)")
    g.add_argument("--threads", type=_positive_int, default=None, help="CPU threads of the engine (default: its own)")
    g.add_argument("--quant", default=None, choices=("q8_0", "q4_k_m"),
                   help="llama.cpp only: deliver and time the models quantised this way (targets are speedups over "
                        "the dense model quantised the same way)")


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model to one or more speedup targets",
                       description="Prune a model to a family of speedup targets for one inference environment, "
                                   "save one pruned model per target plus latency_table.json, family.json, "
                                   "report.md and quality_vs_speedup.png in --out.")
    p.add_argument("--model", required=True, metavar="PATH|minilm|smollm2",
                   help="built-in model name, Hugging Face model directory or GGUF directory")
    p.add_argument("--data", default="wiki", metavar="TEXTFILE|wiki",
                   help="calibration text: 'wiki' (built-in Wikipedia train split) or a UTF-8 text file (default: wiki)")
    p.add_argument("--targets", type=_float, nargs="+", required=True, metavar="SPEEDUP",
                   help="speedup targets, each > 1 (e.g. 1.5 2 3)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    _add_env_args(p)
    p.add_argument("--num-calibration", type=_positive_int, default=64, metavar="N",
                   help="calibration blocks/sentences (default: 64)")
    p.add_argument("--num-eval", type=_positive_int, default=16, metavar="N",
                   help="evaluation blocks (causal LM) from the Wikipedia eval split; encoders use 8x as many "
                        "sentences (default: 16)")
    p.add_argument("--spdy-evaluations", type=_positive_int, default=200, metavar="N",
                   help="search evaluations per target: uniform seeds, SPDY, local moves (default: 200)")
    p.add_argument("--baselines", nargs="*", default=[], choices=("uniform", "magnitude"),
                   help="baselines to build at the same targets")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="cache directory for the OBS database (re-running resumes from it)")
    p.add_argument("--damp", type=_float, default=0.01, help="Hessian dampening (relative) (default: 0.01)")
    p.add_argument("--no-resolve", action="store_true",
                   help="one-shot: skip the sequential least-squares re-fit of the delivered models")
    p.add_argument("--ffn-multiple", type=_positive_int, default=1, metavar="K",
                   help="round FFN widths to multiples of K, e.g. 16 for hardware-friendly shapes (default: 1)")
    p.add_argument("--latency-table", default=None, metavar="TABLE.json",
                   help="use a table written by 'ziplm latency' (same model and environment) instead of measuring one; "
                        "its level grid is used")
    p.add_argument("--no-measure", action="store_true",
                   help="skip the end-to-end measurements and table corrections (measured speedups are not reported; "
                        "with --latency-table the run is deterministic for a fixed --seed)")
    p.add_argument("--measure-rounds", type=_positive_int, default=15, metavar="N",
                   help="interleaved rounds of every end-to-end timing (module overheads, delivered models) "
                        "(default: 15)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_training_args(p)


def _add_training_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("training (gradual ZipLM and FLOP)")
    t.add_argument("--method", default="ziplm", choices=("ziplm", "flop"),
                   help="ziplm (OBS structured pruning, default) or flop (low-rank factorisation with L0 gates, trains)")
    t.add_argument("--gradual", action="store_true",
                   help="gradual ZipLM: prune the targets in increasing order, fine-tuning with distillation from "
                        "the dense model after each (resumable with --workdir)")
    t.add_argument("--train-steps", type=_positive_int, default=100, metavar="N",
                   help="fine-tuning steps per target (gradual) / training steps per target (flop) (default: 100)")
    t.add_argument("--train-blocks", type=_positive_int, default=256, metavar="N",
                   help="training blocks (causal LM) or sentences (encoders) from the training text (default: 256)")
    t.add_argument("--train-batch-size", type=_positive_int, default=8, metavar="N", help="(default: 8)")
    t.add_argument("--lr", type=_float, default=1e-4, help="fine-tuning learning rate (default: 1e-4)")
    t.add_argument("--temperature", type=_float, default=2.0, help="distillation temperature (default: 2)")
    t.add_argument("--task-weight", type=_float, default=1.0, help="LM cross-entropy weight (default: 1)")
    t.add_argument("--logit-weight", type=_float, default=1.0, help="logit KL weight (default: 1)")
    t.add_argument("--hidden-weight", type=_float, default=1.0, help="per-layer hidden-state MSE weight (default: 1)")


def _add_latency(sub) -> None:
    p = sub.add_parser("latency", help="measure and save a latency table",
                       description="Measure per-layer times at every kept structure count for one environment.")
    p.add_argument("--model", required=True, metavar="PATH|minilm|smollm2")
    p.add_argument("--out", required=True, metavar="TABLE.json", help="output JSON file")
    _add_env_args(p)
    p.add_argument("--reps", type=_positive_int, default=30, help="timed repetitions per level (default: 30, as prune)")
    p.add_argument("--rounds", type=_positive_int, default=15,
                   help="interleaved rounds of the module-overhead measurement (default: 15, as prune)")
    p.add_argument("--ffn-multiple", type=_positive_int, default=1, metavar="K",
                   help="round FFN widths to multiples of K (default: 1)")
    p.add_argument("--no-progress", action="store_true")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a (pruned) model",
                       description="Perplexity on held-out text for causal LMs; for encoders the mean cosine "
                                   "between its sentence embeddings and those of --reference (required).")
    p.add_argument("--model", required=True, metavar="DIR|minilm|smollm2")
    p.add_argument("--reference", default=None, metavar="DENSE",
                   help="dense reference model (required for encoders; for causal LMs its perplexity is shown too; "
                        "its tokenizer is used if --model has none)")
    p.add_argument("--data", default="wiki", metavar="wiki|TEXTFILE",
                   help="'wiki' (built-in Wikipedia eval split) or a UTF-8 text file (default: wiki)")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="(default: 128)")
    p.add_argument("--num-blocks", type=_positive_int, default=16,
                   help="evaluation blocks (causal LM) / 8x as many sentences (encoder) (default: 16)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="evaluation batch size (default: 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model for an inference engine",
                       description="Write a (pruned or dense) model as GGUF for llama.cpp (LLaMA family, 'deci' "
                                   "architecture with per-layer widths), ONNX for ONNX Runtime (BERT family), or a "
                                   "self-contained Hugging Face directory (trust_remote_code=True, no ziplm_ext needed).")
    p.add_argument("model", metavar="MODEL", help="pruned model directory, built-in name (smollm2, minilm) or "
                                                  "Hugging Face model directory")
    p.add_argument("--format", required=True, choices=("gguf", "onnx", "hf"))
    p.add_argument("--out", required=True, metavar="PATH", help="output file (gguf, onnx) or directory (hf)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                   help="gguf: tensor type of the weights (default: float32)")
    p.add_argument("--quant", default=None, choices=("q8_0", "q4_k_m"),
                   help="gguf: quantise with llama.cpp's own quantiser")


def build_parser() -> argparse.ArgumentParser:
    """The ``ziplm`` parser; ``args.command`` is the sub-command (None when none was given)."""
    parser = _Parser(prog=PROG, description="ZipLM inference-aware structured pruning of Hugging Face transformer LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_prune(sub)
    _add_latency(sub)
    _add_eval(sub)
    _add_export(sub)
    return parser
