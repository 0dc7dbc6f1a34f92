"""Every native op against its pure-PyTorch oracle at real layer shapes, and against the floor.

Prints a table (oracle time, native time, ratio, achieved GFLOP/s, native time over the floor) and
writes JSON to bench/results/ops_<device>.json.

Arithmetic floor (the definition used for every row): the op's flop count divided by the GEMM rate
this machine reaches in the same run, measured as the best of five 3072x3072x3072 torch.matmul in
the op's dtype (`matmul_peak`). It is the time the op would take if all its arithmetic ran as one
large GEMM; `native_over_floor` = native seconds / floor seconds (1.0 would be perfect). The flop
counts are the least arithmetic each op needs (see `obs_floor_flops`, `attention_flops`,
`ffn_flops`); memory traffic, selection and bookkeeping are not counted. Greedy OBS rows also
report `native_over_floor_with_saliency`, against the larger floor that adds the saliency refresh
exact greedy selection needs (`obs_floor_flops_with_saliency`); the targets are checked against
the smaller one.

    python bench/bench_ops.py            # everything, including the naive FFN oracle (minutes)
    python bench/bench_ops.py --quick    # the naive FFN oracle on its first 256 steps, extrapolated
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch.utils import benchmark

from ziplm_ext.io.fileio import atomic_write_bytes
from ziplm_ext.native import ops
from ziplm_ext.native import timing
from ziplm_ext.native import reference as ref


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        model = platform.processor() or "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, min_runs=1, min_time=0.5) -> float:
    """Median seconds of fn() after one warm-up run (torch.utils.benchmark for short ops)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = time.perf_counter() - t0
    if once > min_time:  # long-running: a few plain runs
        runs = [once]
        for _ in range(max(0, min_runs - 1)):
            t0 = time.perf_counter()
            fn()
            sync(device)
            runs.append(time.perf_counter() - t0)
        return sorted(runs)[len(runs) // 2]
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time)
    return m.median


def matmul_peak(device, dtype) -> float:
    """Best-of GEMM rate at n = 3072 (the largest square the OBS updates reach): the floor is then
    the least time the arithmetic could take on this machine, not a typical one."""
    n = 3072
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def problem(r, c, device, dtype, tokens_per_col=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(c) + 0.5 * torch.randn(c, c, generator=g) / c**0.5
    X = torch.randn(tokens_per_col * c, c, generator=g) @ mix
    H = (X.double().T @ X.double()).to(device)
    W = torch.randn(r, c, generator=g).to(device=device, dtype=dtype)
    return X.to(device), W, H


def obs_floor_flops(r, c, g):
    """Arithmetic that greedy OBS really needs: the damped inverse (~c^3: Cholesky, triangular
    inverse, L^-T L^-1) plus, per removed structure, rank-g updates of W and H^-1 restricted to
    the columns still present: sum over m of 2 g (r m + m^2), m = c, c-g, ..., g."""
    upd = sum(2 * g * (r * m + m * m) for m in range(c, 0, -g))
    return c**3 + upd


def obs_floor_flops_with_saliency(r, c, g):
    """obs_floor_flops plus the saliency refresh that exact greedy selection cannot skip: after
    each rank-g update W <- W - U G^T every remaining structure's saliency depends on its block of
    W^T U, 2 r g m flops per step (g = 1: the column norms need W^T u)."""
    return obs_floor_flops(r, c, g) + sum(2 * g * r * m for m in range(c, 0, -g))


def attention_flops(B, T, d, nq, nkv, hd, kv_len=None):
    """q/k/v/o projections plus scores and weighted values (full T x L, causal or not)."""
    L = T if kv_len is None else kv_len
    return 2 * B * T * d * hd * (2 * nq + 2 * nkv) + 4 * B * nq * T * L * hd


def ffn_flops(B, T, d, m, gated):
    return 2 * B * T * d * m * (3 if gated else 2)


def naive_oracle_time(W, H, g, steps):
    """Seconds of the naive oracle; with steps < all, time the first `steps` removals and scale up
    (the naive loop pays the same full-matrix updates at every step)."""
    S = W.shape[1] // g
    t0 = time.perf_counter()
    ref.greedy_obs(W, H, g, max_steps=steps)
    t = time.perf_counter() - t0
    return t * S / min(steps, S), steps < S


# Speed targets of issue 13 (CPU): (op, shape prefix) -> (min ratio to the oracle, max floor ratio).
TARGETS = {("greedy_obs attn", "768x768"): (4.0, 2.0), ("greedy_obs attn", "576x576"): (4.0, 2.0),
           ("greedy_obs ffn", "768x3072"): (150.0, 1.5)}


class Table:
    def __init__(self, peaks):
        self.peaks, self.rows = peaks, []

    def add(self, name, shape, t_oracle, t_native, flops, dtype, note="", flops_with_saliency=None):
        peak = self.peaks[str(dtype)[6:]]
        floor = flops / (peak * 1e9)
        row = dict(op=name, shape=shape, oracle_s=t_oracle, native_s=t_native, ratio=t_oracle / t_native,
                   note=note, flops=flops, gflops=flops / t_native / 1e9, peak_gflops=peak, floor_s=floor,
                   native_over_floor=t_native / floor)
        if flops_with_saliency:
            row["native_over_floor_with_saliency"] = t_native / (flops_with_saliency / (peak * 1e9))
            note = f"({row['native_over_floor_with_saliency']:.2f}x incl. saliency) {note}"
        target = next((v for (op, sh), v in TARGETS.items() if op == name and shape.startswith(sh)), None)
        if target:
            row.update(target_ratio=target[0], target_floor=target[1],
                       meets_target=row["ratio"] >= target[0] and row["native_over_floor"] <= target[1])
        self.rows.append(row)
        met = "" if target is None else ("  target met" if row["meets_target"] else
                                        f"  TARGET MISSED (>= {target[0]}x oracle, <= {target[1]}x floor)")
        print(f"{name:<34}{shape:<24}oracle {t_oracle:9.4f}s  native {t_native:9.4f}s  ratio {row['ratio']:8.1f}x"
              f"  {row['gflops']:6.1f} GFLOP/s  {row['native_over_floor']:5.2f}x floor {note}{met}", flush=True)


def bench_obs(tab, device, quick):
    cases = [("greedy_obs ffn", 768, 3072, 1), ("greedy_obs attn", 768, 768, 64),
             ("greedy_obs ffn", 576, 1536, 1), ("greedy_obs attn", 576, 576, 64)]
    for name, r, c, g in cases:
        dtype = torch.float32
        X, W, H = problem(r, c, device, dtype)
        t_nat = timeit(lambda: ops.greedy_obs(W, H, g), device, min_runs=3)
        if device.type == "cpu":
            steps = 256 if (quick and g == 1) else c // g
            t_orc, extrap = naive_oracle_time(W, H, g, steps)
        else:
            t_orc, extrap = timeit(lambda: ref.greedy_obs(W.cpu(), H.cpu(), g), torch.device("cpu")), False
        floors = dict(flops=obs_floor_flops(r, c, g), flops_with_saliency=obs_floor_flops_with_saliency(r, c, g))
        tab.add(name, f"{r}x{c} g={g} {str(dtype)[6:]}", t_orc, t_nat, dtype=dtype,
                note="(oracle extrapolated)" if extrap else "", **floors)
        if g > 1:  # the device-generic ATen loop (the CUDA fallback) on the same problem
            t_gen = timeit(lambda: ops.greedy_obs(W, H, g, generic=True), device, min_runs=3)
            tab.add("greedy_obs_generic attn", f"{r}x{c} g={g} {str(dtype)[6:]}", t_orc, t_gen, dtype=dtype,
                    note="(same oracle)", **floors)


def bench_linear_algebra(tab, device):
    # Hessian accumulation: 16 x 128 tokens of a 3072-wide input into float64 H
    Xa = torch.randn(16, 128, 3072, device=device)
    mask = torch.rand(16, 128, device=device) > 0.1
    H1 = torch.zeros(3072, 3072, dtype=torch.float64, device=device)
    H2 = H1.clone()
    flops = 2 * int(mask.sum()) * 3072**2
    tab.add("hessian_accumulate", "2048x3072 ->f64", timeit(lambda: ref.hessian_accumulate(H2, Xa, mask), device),
            timeit(lambda: ops.hessian_accumulate(H1, Xa, mask), device), flops, torch.float64)
    # damped inverse: full FFN and attention Hessians and a batch of attention-head blocks
    for shape in ((3072, 3072), (768, 768), (12, 64, 64)):
        g = shape[-1]
        A = torch.randn(*shape[:-2], 2 * g, g, device=device, dtype=torch.float64)
        Hs = (A.transpose(-1, -2) @ A).float()
        B = Hs.numel() // (g * g)
        tab.add("damped_inverse", "x".join(map(str, shape)) + " f32",
                timeit(lambda: ref.damped_inverse(Hs, 0.01), device),
                timeit(lambda: ops.damped_inverse(Hs, 0.01), device), B * g**3, torch.float32)


def bench_timing_ops(tab, device):
    """Slice-timing ops: median per-rep seconds of the native timed loop vs the perf_counter oracle
    (the same block maths). A BERT-base-like block, float32."""
    gen = torch.Generator().manual_seed(0)
    B, T, d, hd, nq, nkv, m, L = 1, 128, 768, 64, 12, 12, 3072, 128
    r = lambda *s: (torch.randn(*s, generator=gen) * 0.05).to(device)  # noqa: E731
    x, wq, wk, wv, wo = r(B, T, d), r(nq * hd, d), r(nkv * hd, d), r(nkv * hd, d), r(d, nq * hd)
    up, gate, down = r(m, d), r(m, d), r(d, m)
    xd, kc, vc = r(B, 1, d), r(B, nkv, L, hd), r(B, nkv, L, hd)
    f32, med = torch.float32, lambda t: float(t.median())  # noqa: E731
    reps = dict(warmup=3, reps=30)
    tab.add("time_attention", f"{B}x{T}x{d} h={nq}", med(timing.reference_time_attention(x, wq, wk, wv, wo, hd, **reps)),
            timing.time_attention(x, wq, wk, wv, wo, hd, **reps).median, attention_flops(B, T, d, nq, nkv, hd), f32)
    tab.add("time_attention_decode", f"{B}x1x{d} L={L}",
            med(timing.reference_time_attention_decode(xd, wq, wk, wv, wo, kc, vc, hd, **reps)),
            timing.time_attention_decode(xd, wq, wk, wv, wo, kc, vc, hd, **reps).median,
            attention_flops(B, 1, d, nq, nkv, hd, kv_len=L + 1), f32)
    for g_, name in ((gate, "gated"), (None, "gelu")):
        tab.add("time_ffn", f"{B}x{T}x{d} m={m} {name}", med(timing.reference_time_ffn(x, up, g_, down, **reps)),
                timing.time_ffn(x, up, g_, down, **reps).median, ffn_flops(B, T, d, m, g_ is not None), f32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="extrapolate the naive FFN oracle from 256 steps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    peaks = dict(float32=matmul_peak(device, torch.float32), float64=matmul_peak(device, torch.float64))
    print(f"device: {device_name(device)}; matmul peak f32 {peaks['float32']:.0f} GFLOP/s, "
          f"f64 {peaks['float64']:.0f} GFLOP/s; load average {load_before}")
    tab = Table(peaks)
    bench_obs(tab, device, args.quick)
    # memory of the compact history vs 44 per-level copies, 768x3072
    X, W, H = problem(768, 3072, device, torch.float32)
    res = ops.greedy_obs(W, H, 1)
    mem = dict(compact_bytes=res.nbytes(), per_level_copies_bytes=44 * W.numel() * W.element_size())
    mem["ratio"] = mem["compact_bytes"] / mem["per_level_copies_bytes"]
    print(f"compact history {mem['compact_bytes'] / 2**20:.1f} MiB vs 44 copies "
          f"{mem['per_level_copies_bytes'] / 2**20:.1f} MiB: ratio {mem['ratio']:.3f}")
    bench_linear_algebra(tab, device)
    bench_timing_ops(tab, device)
    peaks_after = dict(float32=matmul_peak(device, torch.float32), float64=matmul_peak(device, torch.float64))
    out = Path(args.out or Path(__file__).parent / "results" / f"ops_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(device=device_name(device), torch=torch.__version__, threads=torch.get_num_threads(),
                   date=time.strftime("%Y-%m-%d %H:%M"), floor_definition=__doc__.split("\n\n")[2],
                   matmul_peak_gflops=peaks, matmul_peak_gflops_at_end=peaks_after, rows=tab.rows, memory=mem,
                   quick=args.quick, host_load_before=load_before, host_load_after=os.getloadavg(),
                   targets_met=all(r["meets_target"] for r in tab.rows if "meets_target" in r))
    atomic_write_bytes(out, json.dumps(payload, indent=2).encode())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
