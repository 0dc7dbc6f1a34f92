"""Benchmark: native slice timing ops vs the pure-PyTorch perf_counter oracle at real shapes.

Times one attention and one FFN block of BERT-base and SmolLM2-135M (dense and with half the
heads / FFN columns pruned) with ``torch.ops.ziplm.time_*`` (C++ timed loop) and with
``ziplm_ext.native.timing.reference_time_*`` (Python loop), prints a table and writes
``bench/results/slice_timing_<device>.json``.

    python bench/bench_slice_timing.py                 # CPU, float32, B=1, T=128
    python bench/bench_slice_timing.py --device cuda --dtype float16

On CPU it takes well under a minute with the defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

import ziplm_ext
from ziplm_ext.engines.torch_eager import host_name
from ziplm_ext.native.timing import Timing, reference_time_attention, reference_time_ffn, time_attention, time_ffn

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    model: str
    block: str  # "attention" | "ffn"
    d: int
    # attention
    nq: int = 0
    nkv: int = 0
    head_dim: int = 64
    causal: bool = False
    # ffn
    m: int = 0
    gated: bool = False

    @property
    def label(self) -> str:
        if self.block == "attention":
            kv = f"/{self.nkv}kv" if self.nkv != self.nq else ""
            return f"{self.model} attn {self.nq}h{kv}x{self.head_dim}{' causal' if self.causal else ''}"
        return f"{self.model} ffn m={self.m}{' gated' if self.gated else ' gelu'}"


CASES = [
    # BERT-base: d=768, 12 heads of 64, bidirectional; d_ff 3072 GELU.
    Case("bert-base", "attention", 768, nq=12, nkv=12, causal=False),
    Case("bert-base", "attention", 768, nq=6, nkv=6, causal=False),
    Case("bert-base", "ffn", 768, m=3072, gated=False),
    Case("bert-base", "ffn", 768, m=1536, gated=False),
    # SmolLM2-135M: d=576, 9 query / 3 kv heads of 64 (GQA), causal; d_ff 1536 gated SiLU.
    Case("smollm2-135m", "attention", 576, nq=9, nkv=3, causal=True),
    Case("smollm2-135m", "attention", 576, nq=3, nkv=3, causal=True),
    Case("smollm2-135m", "ffn", 576, m=1536, gated=True),
    Case("smollm2-135m", "ffn", 576, m=768, gated=True),
]


def make_inputs(case: Case, B: int, T: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def w(out_f: int, in_f: int) -> torch.Tensor:
        return (torch.randn(out_f, in_f, generator=g) / max(in_f, 1) ** 0.5).to(device, dtype)

    x = torch.randn(B, T, case.d, generator=g).to(device, dtype)
    if case.block == "attention":
        hd = case.head_dim
        return x, w(case.nq * hd, case.d), w(case.nkv * hd, case.d), w(case.nkv * hd, case.d), w(case.d, case.nq * hd)
    return x, w(case.m, case.d), (w(case.m, case.d) if case.gated else None), w(case.d, case.m)


def run_case(case: Case, args, device: torch.device, dtype: torch.dtype) -> dict:
    """Native and oracle, interleaved in ``args.rounds`` rounds (alternating which goes first) so
    that a burst of other load on the machine hits both alike; each round uses the op's own
    warmup + repetitions, and the per-rep times of all rounds are pooled."""
    inputs = make_inputs(case, args.batch, args.seq, device, dtype)
    per_round = max(1, args.reps // args.rounds)
    if case.block == "attention":
        run_native = lambda: time_attention(*inputs, case.head_dim, case.causal, args.warmup, per_round).times
        run_oracle = lambda: reference_time_attention(*inputs, case.head_dim, case.causal, args.warmup, per_round)
    else:
        run_native = lambda: time_ffn(*inputs, args.warmup, per_round).times
        run_oracle = lambda: reference_time_ffn(*inputs, args.warmup, per_round)
    native_t, oracle_t = [], []
    for r in range(args.rounds):
        if r % 2 == 0:
            native_t.append(run_native())
            oracle_t.append(run_oracle())
        else:
            oracle_t.append(run_oracle())
            native_t.append(run_native())
    native = Timing.from_times(torch.cat(native_t))
    oracle = Timing.from_times(torch.cat(oracle_t))
    return {
        "case": case.label,
        "config": asdict(case),
        "oracle_median_s": oracle.median,
        "oracle_spread": oracle.spread,
        "native_median_s": native.median,
        "native_spread": native.spread,
        "native_over_oracle": native.median / oracle.median,
        "native_times_s": native.times.tolist(),
        "oracle_times_s": oracle.times.tolist(),
    }


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=24, help="timed repetitions per block and method (all rounds)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved native/oracle rounds (default 4)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/slice_timing_<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_slice_timing: --device cuda but torch.cuda.is_available() is False")
    dtype = getattr(torch, args.dtype)
    name = host_name(device)
    print(f"device: {name} ({device}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"dtype {args.dtype}, B={args.batch} T={args.seq}, warmup {args.warmup} reps {args.reps} "
          f"in {args.rounds} interleaved rounds")

    t0 = time.perf_counter()
    rows = [run_case(c, args, device, dtype) for c in CASES]
    elapsed = time.perf_counter() - t0

    w = max(len(r["case"]) for r in rows)
    print(f"\n{'block':<{w}}  {'oracle ms':>10}  {'native ms':>10}  {'native/oracle':>13}  {'spread n/o':>11}")
    for r in rows:
        print(f"{r['case']:<{w}}  {r['oracle_median_s'] * 1e3:>10.3f}  {r['native_median_s'] * 1e3:>10.3f}  "
              f"{r['native_over_oracle']:>13.3f}  {r['native_spread']:>5.2f}/{r['oracle_spread']:<5.2f}")
    print(f"\n(spread = (p90 - p10) / median of the per-rep times; total {elapsed:.1f}s)")

    result = {
        "benchmark": "slice_timing",
        "device": str(device),
        "device_name": name,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "ziplm_ext_version": ziplm_ext.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "warmup": args.warmup,
        "reps": args.reps,
        "rounds": args.rounds,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": elapsed,
        "rows": rows,
    }
    out = args.out or RESULTS / f"slice_timing_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
