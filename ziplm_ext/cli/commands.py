"""Command line interface: ``ziplm prune | latency | eval`` (also ``python -m ziplm_ext``).

Every heavy module (torch models, prune, latency, data) is imported lazily
inside the command functions, so ``ziplm --help`` is fast and this module
imports even while other parts of the package are missing.

Errors from our own code (``ValueError`` and subclasses such as
``UnsupportedArchitectureError``, ``OSError`` incl. ``FileNotFoundError``,
``ImportError`` for a missing optional dependency) are printed as one line
``ziplm: error: <message>`` on stderr with exit code 2; Ctrl-C gives 130.
Set ``ZIPLM_DEBUG=1`` to get the traceback instead.

``ziplm prune`` validates everything cheap (targets, environment, the output
directory, the data file, the model and tokenizer, the evaluation data) before
any heavy work, and never creates ``--out`` itself: the directory appears only
through ``PrunedFamily.save`` (atomic), after which the report is added.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import tempfile
from pathlib import Path

PROG = "ziplm"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIError(ValueError):
    """A user error detected by the CLI itself (one-line message)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``ziplm: error: ...``), exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


# --------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="ZipLM inference-aware structured pruning of Hugging Face transformer LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # ---- prune
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
    p.add_argument("--num-calibration", type=_positive_int, default=32, metavar="N",
                   help="calibration blocks/sentences (default: 32)")
    p.add_argument("--num-eval", type=_positive_int, default=16, metavar="N",
                   help="evaluation blocks (causal LM) from the Wikipedia eval split; encoders use 8x as many "
                        "sentences (default: 16)")
    p.add_argument("--spdy-evaluations", type=_positive_int, default=60, metavar="N",
                   help="SPDY search evaluations per target (default: 60)")
    p.add_argument("--baselines", nargs="*", default=[], choices=("uniform", "magnitude"),
                   help="baselines to build at the same targets")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="cache directory for the OBS database (re-running resumes from it)")
    p.add_argument("--damp", type=_float, default=0.01, help="Hessian dampening (relative) (default: 0.01)")
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
    p.set_defaults(func=cmd_prune)

    # ---- latency
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
    p.set_defaults(func=cmd_latency)

    # ---- eval
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
    p.set_defaults(func=cmd_eval)
    return parser


# --------------------------------------------------------------------------
# validation helpers (cheap; run before any heavy work)
# --------------------------------------------------------------------------
def validate_targets(targets) -> list[float]:
    out = []
    for t in targets:
        if not math.isfinite(t) or t <= 1.0:
            raise CLIError(f"every --targets value must be a finite speedup > 1, got {t:g}")
        if t not in out:
            out.append(float(t))
    return sorted(out)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe_writable(directory: Path, what: str) -> None:
    """Create and delete a temp file in ``directory`` (works for root too, unlike os.access)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ziplm_probe_", dir=str(directory))
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise CLIError(f"{what}: cannot write to {directory} ({e.strerror or e})") from None


def validate_out_dir(out) -> Path:
    """``--out`` must be absent (with a writable existing ancestor) or an empty writable directory.

    Creates nothing that outlives the check.
    """
    p = Path(out).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CLIError(f"--out {p} exists and is not a directory")
        if any(p.iterdir()):
            raise CLIError(f"--out {p} is not empty; choose a new directory")
        _probe_writable(p, "--out")
        return p
    anc = _nearest_existing(p.parent if p.parent != p else p)
    if not anc.is_dir():
        raise CLIError(f"--out {p} cannot be created: {anc} is not a directory")
    _probe_writable(anc, f"--out {p} cannot be created")
    return p


def validate_out_file(out) -> Path:
    p = Path(out).expanduser()
    if p.is_dir():
        raise CLIError(f"--out {p} is a directory; give a file name such as latency_table.json")
    anc = _nearest_existing(p.parent)
    if not anc.is_dir():
        raise CLIError(f"--out {p} cannot be created: {anc} is not a directory")
    _probe_writable(anc, f"--out {p} cannot be created")
    return p


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def validate_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"bad --device {device!r}: {str(e).splitlines()[0] if str(e) else e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def make_env(args):
    from ziplm_ext.env import InferenceEnv

    validate_device(args.device)
    return InferenceEnv(device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                        seq_len=args.seq_len, mode=getattr(args, "mode", "prefill"))


def load_texts(data: str, split: str) -> list[str]:
    """``'wiki'`` -> Wikipedia ``split``; anything else -> a UTF-8 text file."""
    from ziplm_ext.eval import data as D

    if data.strip().lower() == "wiki":
        return D.wiki_split(split)
    return D.read_text_file(data)


def is_causal_lm(model) -> bool:
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def _load(name: str, dtype: str = "float32", device: str = "cpu"):
    import torch

    from ziplm_ext.io import models as M

    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    model, tok = M.load_model(name, dtype=dt)
    if device != "cpu":
        model = model.to(device)
    return model, tok


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------
def cmd_prune(args) -> int:
    quiet = args.no_progress
    targets = validate_targets(args.targets)
    env = make_env(args)
    out = validate_out_dir(args.out)
    workdir = None
    if args.workdir:
        workdir = Path(args.workdir).expanduser()
        if workdir.exists() and not workdir.is_dir():
            raise CLIError(f"--workdir {workdir} exists and is not a directory")
        if _is_within(workdir, out):
            raise CLIError("--workdir must not be inside --out (the output directory is written atomically)")
    if not (math.isfinite(args.damp) and args.damp >= 0):
        raise CLIError(f"--damp must be a finite number >= 0, got {args.damp:g}")
    if args.gradual and args.method == "flop":
        raise CLIError("--gradual applies to --method ziplm only")
    if (args.gradual or args.method == "flop") and args.baselines:
        raise CLIError("--baselines are built by one-shot ZipLM runs only")
    table = None
    if args.latency_table:
        if args.method == "flop":
            raise CLIError("--latency-table applies to --method ziplm only (FLOP measures a speedup curve)")
        from ziplm_ext.stages.latency.table import LatencyTable

        path = Path(args.latency_table).expanduser()
        if not path.is_file():
            raise CLIError(f"--latency-table {path} does not exist")
        table = LatencyTable.load(path)
        table.check_env(env)  # before the model loads

    from ziplm_ext.io import models as M

    texts = load_texts(args.data, "train")  # missing / empty / non-UTF-8 file fails here, before the model loads
    _log(f"{PROG}: loading {args.model} ...", quiet)
    # Pruning math (Hessians, OBS updates) runs in float32; the environment's dtype is what latency is measured in.
    model, tok = _load(args.model, "float32", args.device)
    if tok is None:
        raise CLIError(f"model {args.model} has no tokenizer files; cannot tokenize the calibration text")
    M.check_tokenizer(model, tok)
    from ziplm_ext.adapters import get_adapter

    get_adapter(model)  # UnsupportedArchitectureError before any heavy work

    from ziplm_ext.eval import data as D

    eval_texts = D.wiki_split("eval")
    if is_causal_lm(model):
        eval_data = D.token_blocks(eval_texts, tok, args.seq_len, args.num_eval, seed=args.seed)
    else:
        eval_data = D.sentence_batches(eval_texts, tok, args.seq_len, 8 * args.num_eval, seed=args.seed)

    training = {}
    if args.gradual or args.method == "flop":
        from ziplm_ext.stages.distill import DistillConfig

        distill = DistillConfig(task_weight=args.task_weight, logit_weight=args.logit_weight,
                                hidden_weight=args.hidden_weight, temperature=args.temperature, lr=args.lr,
                                batch_size=args.train_batch_size, seed=args.seed)
        if is_causal_lm(model):
            train = D.token_blocks(texts, tok, args.seq_len, args.train_blocks, seed=args.seed + 1)
        else:
            train = D.sentence_batches(texts, tok, args.seq_len, args.train_blocks, seed=args.seed + 1)
        training = dict(mode="gradual" if args.gradual else "oneshot", train_data=train,
                        steps_per_target=args.train_steps, distill=distill)
    P = importlib.import_module("ziplm_ext.methods.ziplm_oneshot")
    family = P.prune(model, texts, targets, env, tokenizer=tok, num_calibration_blocks=args.num_calibration,
                     damp=args.damp, spdy_evaluations=args.spdy_evaluations,
                     workdir=str(workdir) if workdir is not None else None, seed=args.seed,
                     progress=not args.no_progress, baselines=tuple(args.baselines), eval_data=eval_data,
                     model_name=str(args.model), ffn_multiple=args.ffn_multiple, method=args.method,
                     latency_table=table, measure=not args.no_measure, measure_rounds=args.measure_rounds,
                     **training)
    family.save(str(out))
    from ziplm_ext.report import write_report

    try:
        md_path, png_path = write_report(family, out)
    except (OSError, ValueError) as e:
        raise CLIError(f"pruned models were saved to {out}, but the report failed: {e}") from None
    print(summary_table(family))
    print(f"\nsaved to {out}  (report: {md_path.name}" + (f", plot: {png_path.name})" if png_path else ")"))
    return 0


def summary_table(family) -> str:
    """Short fixed-width table: one line per target (+ baselines)."""
    from ziplm_ext.report import _rows, quality_key

    key = quality_key(family)
    label = {"perplexity": "ppl", "embedding_cosine": "emb_cos", "calibration_loss": "calib_loss"}.get(key, key)

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [f"{'method':<10} {'target':>7} {'pred':>7} {'measured':>9} {'params':>12} {label:>11}"]
    dq = getattr(family, "dense_calibration_loss", None) if key == "calibration_loss" else (getattr(family, "dense_metrics", None) or {}).get(key)
    lines.append(f"{'dense':<10} {'-':>7} {'1.00x':>7} {'1.00x':>9} "
                 f"{f(getattr(family, 'dense_num_parameters', None), ','):>12} {f(dq, '.4g'):>11}")
    for r in sorted(_rows(family), key=lambda r: (r["target"] or 0, not r.get("main"), r["method"])):
        q = r["calibration_loss"] if key == "calibration_loss" else r["metrics"].get(key)
        params = None if r["num_parameters"] is None else int(r["num_parameters"])
        lines.append(f"{r['method'][:10]:<10} {f(r['target'], '.2f') + 'x':>7} "
                     f"{(f(r['predicted_speedup'], '.2f') + 'x') if r['predicted_speedup'] else '-':>7} "
                     f"{(f(r['measured_speedup'], '.2f') + 'x') if r['measured_speedup'] else '-':>9} "
                     f"{f(params, ','):>12} {f(q, '.4g'):>11}")
    return "\n".join(lines)


def cmd_latency(args) -> int:
    env = make_env(args)
    out = validate_out_file(args.out)
    # As in prune: the model stays in float32, the timings run in the environment's dtype.
    model, _tok = _load(args.model, "float32", args.device)
    from ziplm_ext.adapters import get_adapter

    get_adapter(model)
    P = importlib.import_module("ziplm_ext.methods.ziplm_oneshot")
    table = P.build_environment_table(model, env, ffn_multiple=args.ffn_multiple, reps=args.reps, rounds=args.rounds,
                                      progress=not args.no_progress)
    table.save(out)
    print(f"dense time {table.dense_time * 1e3:.3f} ms ({env.describe()}), {len(table.layer_times)} prunable layers; "
          f"max speedup {table.max_speedup():.2f}x")
    print(f"saved to {out}")
    return 0


def cmd_eval(args) -> int:
    validate_device(args.device)
    texts = load_texts(args.data, "eval")
    from ziplm_ext.eval import data as D
    from ziplm_ext.eval import metrics as MET
    from ziplm_ext.io import models as M

    model, tok = _load(args.model, args.dtype, args.device)
    ref = ref_tok = None
    if args.reference:
        ref, ref_tok = _load(args.reference, args.dtype, args.device)
    causal = is_causal_lm(model)
    if not causal and ref is None:
        raise CLIError("--reference DENSE is required to evaluate an encoder (embedding cosine against the dense model)")
    if ref is not None and is_causal_lm(ref) != causal:
        raise CLIError("--model and --reference must both be causal LMs or both encoders")
    tok = tok if tok is not None else ref_tok
    if tok is None:
        raise CLIError(f"model {args.model} has no tokenizer files; pass --reference with the dense model to use its tokenizer")
    M.check_tokenizer(model, tok)
    if ref is not None:
        M.check_tokenizer(ref, tok)

    if causal:
        ids = D.token_blocks(texts, tok, args.seq_len, args.num_blocks, seed=args.seed)
        ppl = MET.perplexity(model, ids, batch_size=args.batch_size)
        print(f"perplexity: {ppl:.4f}  ({args.num_blocks} blocks x {args.seq_len} tokens)")
        if ref is not None:
            rppl = MET.perplexity(ref, ids, batch_size=args.batch_size)
            print(f"reference perplexity: {rppl:.4f}")
    else:
        ids, mask = D.sentence_batches(texts, tok, args.seq_len, 8 * args.num_blocks, seed=args.seed)
        cos = MET.embedding_cosine(model, ref, ids, mask, batch_size=args.batch_size)
        print(f"embedding cosine: {cos:.6f}  ({ids.shape[0]} sentences)")
    return 0


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    if isinstance(e, KeyError) and msg.startswith(("'", '"')):
        msg = msg[1:-1]
    first = msg.splitlines()[0] if msg else type(e).__name__
    return first


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    except (ValueError, OSError, ImportError) as e:
        if os.environ.get("ZIPLM_DEBUG"):
            raise
        sys.stderr.write(f"{PROG}: error: {_one_line(e)}\n")
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
