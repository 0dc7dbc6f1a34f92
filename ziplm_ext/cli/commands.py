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
directory, the run configuration, the data file, the model and tokenizer, the
evaluation data) before any heavy work, builds a
:class:`~ziplm_ext.config.PruneConfig` and calls :func:`ziplm_ext.api.prune`.
It never creates ``--out`` itself: the directory appears only through
``PrunedFamily.save`` (atomic), after which the report is added.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from ziplm_ext.cli.parser import EXIT_INTERRUPTED, EXIT_USAGE, PROG, build_parser
from ziplm_ext.cli.validate import (CLIError, load_latency_table, make_env, validate_device, validate_out_dir,
                                    validate_out_file, validate_prune_options, validate_targets, validate_workdir)

__all__ = ["main", "cmd_prune", "cmd_latency", "cmd_eval", "prune_config", "CLIError", "build_parser"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def load_texts(data: str, split: str) -> list[str]:
    """``'wiki'`` -> Wikipedia ``split``; anything else -> a UTF-8 text file."""
    from ziplm_ext.eval import data as D

    if data.strip().lower() == "wiki":
        return D.wiki_split(split)
    return D.read_text_file(data)


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


def _is_causal_lm(model) -> bool:
    from ziplm_ext.adapters import is_causal_lm

    return is_causal_lm(model)


# --------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------
def prune_config(args, workdir: Path | None):
    """The :class:`~ziplm_ext.config.PruneConfig` of the ``ziplm prune`` flags (bad values: ValueError)."""
    from ziplm_ext.config import CalibrationConfig, MeasureConfig, PruneConfig, SearchConfig, TrainConfig
    from ziplm_ext.stages.distill import DistillConfig

    train = TrainConfig()
    if args.gradual or args.method == "flop":
        distill = DistillConfig(task_weight=args.task_weight, logit_weight=args.logit_weight,
                                hidden_weight=args.hidden_weight, temperature=args.temperature, lr=args.lr,
                                batch_size=args.train_batch_size, seed=args.seed)
        train = TrainConfig(steps_per_target=args.train_steps, distill=distill)
    return PruneConfig(
        method=args.method, mode="gradual" if args.gradual else "oneshot", baselines=tuple(args.baselines),
        calibration=CalibrationConfig(num_blocks=args.num_calibration, damp=args.damp, resolve=not args.no_resolve,
                                      ffn_multiple=args.ffn_multiple),
        search=SearchConfig(spdy_evaluations=args.spdy_evaluations),
        measure=MeasureConfig(measure=not args.no_measure, rounds=args.measure_rounds),
        train=train, seed=args.seed, progress=not args.no_progress,
        workdir=str(workdir) if workdir is not None else None)


def _load_for_pruning(args):
    """The model (float32: the pruning maths runs in float32; the environment's dtype is what latency is
    measured in) and its tokenizer, checked to match and to be a supported architecture."""
    from ziplm_ext.adapters import get_adapter
    from ziplm_ext.io import models as M

    _log(f"{PROG}: loading {args.model} ...", args.no_progress)
    model, tok = _load(args.model, "float32", args.device)
    if tok is None:
        raise CLIError(f"model {args.model} has no tokenizer files; cannot tokenize the calibration text")
    M.check_tokenizer(model, tok)
    get_adapter(model)  # UnsupportedArchitectureError before any heavy work
    return model, tok


def _prune_data(args, model, tok, texts: list[str]):
    """(evaluation data from the Wikipedia eval split, training data from ``texts`` or None): token blocks
    for causal LMs, (ids, mask) sentence batches (8x as many for evaluation) for encoders."""
    from ziplm_ext.eval import data as D

    causal = _is_causal_lm(model)
    eval_texts = D.wiki_split("eval")
    if causal:
        eval_data = D.token_blocks(eval_texts, tok, args.seq_len, args.num_eval, seed=args.seed)
    else:
        eval_data = D.sentence_batches(eval_texts, tok, args.seq_len, 8 * args.num_eval, seed=args.seed)
    train = None
    if args.gradual or args.method == "flop":
        if causal:
            train = D.token_blocks(texts, tok, args.seq_len, args.train_blocks, seed=args.seed + 1)
        else:
            train = D.sentence_batches(texts, tok, args.seq_len, args.train_blocks, seed=args.seed + 1)
    return eval_data, train


def _save_and_report(family, out: Path) -> None:
    from ziplm_ext.report import summary_table, write_report

    family.save(str(out))
    try:
        md_path, png_path = write_report(family, out)
    except (OSError, ValueError) as e:
        raise CLIError(f"pruned models were saved to {out}, but the report failed: {e}") from None
    print(summary_table(family))
    print(f"\nsaved to {out}  (report: {md_path.name}" + (f", plot: {png_path.name})" if png_path else ")"))


def cmd_prune(args) -> int:
    from ziplm_ext import dist

    # torchrun --nproc_per_node=N -m ziplm_ext prune ...: join the process group (gloo / NCCL);
    # every rank loads the model and the data, rank 0 alone reports and writes the family.
    if dist.init_from_env():
        if args.gradual or args.method == "flop":
            raise CLIError("torchrun runs one-shot ZipLM only (--gradual and --method flop run in one process)")
        args.no_progress = args.no_progress or dist.rank() != 0
    try:
        return _prune(args, dist.rank())
    finally:
        dist.shutdown()


def _prune(args, rank: int) -> int:
    targets = validate_targets(args.targets)
    env = make_env(args)
    out = validate_out_dir(args.out)
    workdir = validate_workdir(args.workdir, out)
    validate_prune_options(args)
    config = prune_config(args, workdir)
    table = load_latency_table(args.latency_table, env)  # before the model loads
    texts = load_texts(args.data, "train")  # missing / empty / non-UTF-8 file fails here, before the model loads
    model, tok = _load_for_pruning(args)
    eval_data, train_data = _prune_data(args, model, tok, texts)
    api = importlib.import_module("ziplm_ext.api")  # looked up at call time (the tests install a fake)
    family = api.prune(model, texts, targets, env=env, config=config, tokenizer=tok, train_data=train_data,
                       eval_data=eval_data, latency_table=table, model_name=str(args.model))
    if rank == 0:
        _save_and_report(family, out)
    return 0


# --------------------------------------------------------------------------
# latency / eval
# --------------------------------------------------------------------------
def cmd_latency(args) -> int:
    from ziplm_ext.adapters import get_adapter
    from ziplm_ext.stages.latency.build import build_environment_table

    env = make_env(args)
    out = validate_out_file(args.out)
    # As in prune: the model stays in float32, the timings run in the environment's dtype.
    model, _tok = _load(args.model, "float32", args.device)
    get_adapter(model)
    table = build_environment_table(model, env, ffn_multiple=args.ffn_multiple, reps=args.reps, rounds=args.rounds,
                                    progress=not args.no_progress)
    table.save(out)
    print(f"dense time {table.dense_time * 1e3:.3f} ms ({env.describe()}), {len(table.layer_times)} prunable layers; "
          f"max speedup {table.max_speedup():.2f}x")
    print(f"saved to {out}")
    return 0


def _eval_models(args):
    """(model, reference or None, tokenizer), checked: encoders need a reference of the same kind."""
    from ziplm_ext.io import models as M

    model, tok = _load(args.model, args.dtype, args.device)
    ref = ref_tok = None
    if args.reference:
        ref, ref_tok = _load(args.reference, args.dtype, args.device)
    causal = _is_causal_lm(model)
    if not causal and ref is None:
        raise CLIError("--reference DENSE is required to evaluate an encoder (embedding cosine against the dense model)")
    if ref is not None and _is_causal_lm(ref) != causal:
        raise CLIError("--model and --reference must both be causal LMs or both encoders")
    tok = tok if tok is not None else ref_tok
    if tok is None:
        raise CLIError(f"model {args.model} has no tokenizer files; pass --reference with the dense model to use its tokenizer")
    M.check_tokenizer(model, tok)
    if ref is not None:
        M.check_tokenizer(ref, tok)
    return model, ref, tok


def cmd_eval(args) -> int:
    validate_device(args.device)
    texts = load_texts(args.data, "eval")
    from ziplm_ext.eval import data as D
    from ziplm_ext.eval import metrics as MET

    model, ref, tok = _eval_models(args)
    if _is_causal_lm(model):
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


def cmd_export(args) -> int:
    from ziplm_ext.deploy.formats import export_model

    if args.format == "hf":
        out = validate_out_dir(args.out)
    else:
        out = validate_out_file(args.out)
        if out.exists():
            raise CLIError(f"--out {out} already exists; choose a new file name")
    model, tok = _load(args.model, "float32", "cpu")
    path = export_model(model, args.format, out, tokenizer=tok, dtype=args.dtype, quant=args.quant)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    print(f"exported {args.model} as {args.format} to {path} ({size / 2**20:.1f} MiB)")
    return 0


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------
COMMANDS = {"prune": cmd_prune, "latency": cmd_latency, "eval": cmd_eval, "export": cmd_export}


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
    if getattr(args, "command", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(COMMANDS[args.command](args) or 0)
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
