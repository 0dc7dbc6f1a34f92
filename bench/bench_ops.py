"""Native ops against their pure-PyTorch oracles at real layer shapes.

Prints a table (oracle time, native time, ratio, achieved GFLOP/s vs a matmul peak measured in the
same run) and writes JSON to bench/results/ops_<device>.json.

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

from ziplm_ext.native import ops
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


def naive_oracle_time(W, H, g, steps):
    """Seconds of the naive oracle; with steps < all, time the first `steps` removals and scale up
    (the naive loop pays the same full-matrix updates at every step)."""
    S = W.shape[1] // g
    t0 = time.perf_counter()
    ref.greedy_obs(W, H, g, max_steps=steps)
    t = time.perf_counter() - t0
    return t * S / min(steps, S), steps < S


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="extrapolate the naive FFN oracle from 256 steps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    peak32 = matmul_peak(device, torch.float32)
    peak64 = matmul_peak(device, torch.float64)
    print(f"device: {device_name(device)}; matmul peak f32 {peak32:.0f} GFLOP/s, f64 {peak64:.0f} GFLOP/s")

    def add(name, shape, t_oracle, t_native, flops=None, peak=None, note=""):
        row = dict(op=name, shape=shape, oracle_s=t_oracle, native_s=t_native,
                   ratio=t_oracle / t_native if t_oracle else None, note=note)
        if flops:
            row.update(gflops=flops / t_native / 1e9, peak_gflops=peak, floor_s=flops / (peak * 1e9),
                       native_over_floor=t_native / (flops / (peak * 1e9)))
        rows.append(row)
        extra = f"  {row['gflops']:.0f} GFLOP/s, {row['native_over_floor']:.1f}x floor" if flops else ""
        print(f"{name:<22}{shape:<22}oracle {t_oracle:9.4f}s  native {t_native:9.4f}s  "
              f"ratio {row['ratio']:8.1f}x{extra} {note}", flush=True)

    # greedy OBS: FFN down projections (g=1) and attention out projections (heads)
    cases = [("greedy_obs ffn", 768, 3072, 1), ("greedy_obs attn", 768, 768, 64),
             ("greedy_obs ffn", 576, 1536, 1), ("greedy_obs attn", 576, 576, 64)]
    for name, r, c, g in cases:
        for dtype, peak in ((torch.float32, peak32),):
            X, W, H = problem(r, c, device, dtype)
            t_nat = timeit(lambda: ops.greedy_obs(W, H, g), device, min_runs=3)
            if device.type == "cpu":
                steps = 256 if (args.quick and g == 1) else c // g
                t_orc, extrap = naive_oracle_time(W, H, g, steps)
            else:
                t_orc, extrap = timeit(lambda: ref.greedy_obs(W.cpu(), H.cpu(), g), torch.device("cpu")), False
            add(name, f"{r}x{c} g={g} {str(dtype)[6:]}", t_orc, t_nat, obs_floor_flops(r, c, g), peak,
                "(oracle extrapolated)" if extrap else "")
    # memory of the compact history vs 44 per-level copies, 768x3072
    X, W, H = problem(768, 3072, device, torch.float32)
    res = ops.greedy_obs(W, H, 1)
    mem = dict(compact_bytes=res.nbytes(), per_level_copies_bytes=44 * W.numel() * W.element_size())
    mem["ratio"] = mem["compact_bytes"] / mem["per_level_copies_bytes"]
    print(f"compact history {mem['compact_bytes'] / 2**20:.1f} MiB vs 44 copies "
          f"{mem['per_level_copies_bytes'] / 2**20:.1f} MiB: ratio {mem['ratio']:.3f}")

    # Hessian accumulation: 16 x 128 tokens of a 3072-wide input into float64 H
    Xa = torch.randn(16, 128, 3072, device=device)
    mask = torch.rand(16, 128, device=device) > 0.1
    H1 = torch.zeros(3072, 3072, dtype=torch.float64, device=device)
    H2 = H1.clone()
    flops = 2 * int(mask.sum()) * 3072**2
    add("hessian_accumulate", "2048x3072 ->f64", timeit(lambda: ref.hessian_accumulate(H2, Xa, mask), device),
        timeit(lambda: ops.hessian_accumulate(H1, Xa, mask), device), flops, peak64)
    # damped inverse: full FFN Hessian and a batch of attention-head blocks
    for shape in ((3072, 3072), (12, 64, 64)):
        g = shape[-1]
        A = torch.randn(*shape[:-2], 2 * g, g, device=device, dtype=torch.float64)
        Hs = (A.transpose(-1, -2) @ A).float()
        B = Hs.numel() // (g * g)
        add("damped_inverse", "x".join(map(str, shape)) + " f32",
            timeit(lambda: ref.damped_inverse(Hs, 0.01), device),
            timeit(lambda: ops.damped_inverse(Hs, 0.01), device), B * g**3, peak32)

    out = Path(args.out or Path(__file__).parent / "results" / f"ops_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(device=device_name(device), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
                   matmul_peak_gflops=dict(float32=peak32, float64=peak64), rows=rows, memory=mem,
                   quick=args.quick, host_load=os.getloadavg())
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
