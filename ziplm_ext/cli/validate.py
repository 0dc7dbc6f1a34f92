"""Cheap checks of the command line, run before any heavy work (model loading, calibration).

Each failure is a :class:`CLIError` with a one-line message naming the flag; ``main`` prints it as
``ziplm: error: <message>`` with exit code 2.  Nothing here creates a file that outlives the check.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

__all__ = ["CLIError", "validate_targets", "validate_out_dir", "validate_out_file", "validate_workdir",
           "validate_prune_options", "validate_device", "make_env", "load_latency_table"]


class CLIError(ValueError):
    """A user error detected by the CLI itself (one-line message)."""


def validate_targets(targets) -> list[float]:
    """``--targets``: sorted distinct finite speedups > 1."""
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
    """``--out`` of ``ziplm latency``: a file name (not a directory) whose directory can be written."""
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


def validate_workdir(workdir, out: Path) -> Path | None:
    """``--workdir``: a directory (or absent) outside ``--out`` (which is written atomically)."""
    if not workdir:
        return None
    p = Path(workdir).expanduser()
    if p.exists() and not p.is_dir():
        raise CLIError(f"--workdir {p} exists and is not a directory")
    if _is_within(p, out):
        raise CLIError("--workdir must not be inside --out (the output directory is written atomically)")
    return p


def validate_prune_options(args) -> None:
    """Combinations of ``ziplm prune`` flags that cannot work together, and ``--damp``."""
    if not (math.isfinite(args.damp) and args.damp >= 0):
        raise CLIError(f"--damp must be a finite number >= 0, got {args.damp:g}")
    if args.gradual and args.method == "flop":
        raise CLIError("--gradual applies to --method ziplm only")
    if (args.gradual or args.method == "flop") and args.baselines:
        raise CLIError("--baselines are built by one-shot ZipLM runs only")
    if args.latency_table and args.method == "flop":
        raise CLIError("--latency-table applies to --method ziplm only (FLOP measures a speedup curve)")


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
    """The :class:`~ziplm_ext.env.InferenceEnv` of the environment flags (device checked first)."""
    from ziplm_ext.env import InferenceEnv

    validate_device(args.device)
    engine, quant = getattr(args, "engine", "torch"), getattr(args, "quant", None)
    if quant is not None and engine != "llama.cpp":
        raise ValueError(f"--quant {quant} needs --engine llama.cpp (it is a llama.cpp weight format)")
    return InferenceEnv(device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                        seq_len=args.seq_len, mode=getattr(args, "mode", "prefill"), engine=engine,
                        threads=getattr(args, "threads", None), quant=quant)


def load_latency_table(path, env):
    """``--latency-table``: the saved table, checked against the environment (before the model loads)."""
    if not path:
        return None
    from ziplm_ext.stages.latency.table import LatencyTable

    p = Path(path).expanduser()
    if not p.is_file():
        raise CLIError(f"--latency-table {p} does not exist")
    table = LatencyTable.load(p)
    table.check_env(env)
    return table
