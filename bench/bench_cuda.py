"""CUDA kernels of ziplm_ext against pure PyTorch on the same GPU.

    python bench/bench_cuda.py            # everything (the naive loops extrapolated from a prefix)
    python bench/bench_cuda.py --full     # the naive FFN loops over every step (slow at 4096x14336)

Cases (float32 unless noted):
  - greedy OBS, single columns, full removal order: 768x3072 (BERT-base FFN down projection) and
    4096x14336 (LLaMA-8B down projection); the baseline is the naive loop of
    ziplm_ext.native.reference.greedy_obs (full rank-g updates of W and H^-1 each step) on the GPU;
  - greedy OBS over attention heads / KV groups, g = 64, 128, 192;
  - the batched damped inverse of 1000 64x64 SPD matrices against torch.linalg.cholesky +
    torch.cholesky_inverse (batched cuSOLVER), float32 and float64.
Writes bench/results/cuda_<device>.json holding the device name, the torch version and every row.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from ziplm_ext import native
from ziplm_ext.io.fileio import atomic_write_bytes
from ziplm_ext.native import ops

FFN_SHAPES = [(768, 3072), (4096, 14336)]
HEAD_SHAPES = [(768, 768, 64), (576, 576, 64), (4096, 4096, 128), (3072, 3072, 192)]


def sync():
    torch.cuda.synchronize()


def seconds(fn, runs=3) -> float:
    """Median wall time of fn() over `runs` runs after one warm-up, the GPU synchronised."""
    fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def problem(r, c, dtype=torch.float32, seed=0):
    """Correlated calibration inputs (as real activations are) and random weights, on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    mix = torch.eye(c, device="cuda") + 0.5 * torch.randn(c, c, generator=g, device="cuda") / c**0.5
    X = torch.randn(c + c // 4, c, generator=g, device="cuda") @ mix
    H = X.double().T @ X.double()
    W = torch.randn(r, c, generator=g, device="cuda").to(dtype)
    return W, H


def naive_greedy_obs(W, H, g, damp=0.01, max_steps=None):
    """The maths of reference.greedy_obs in pure PyTorch on W's device (history not recorded)."""
    dev, dt = W.device, W.dtype
    rows, cols = W.shape
    S = cols // g
    Hd = H.to(dt).clone()
    diag = Hd.diagonal()
    dead = diag == 0
    diag[dead] = 1
    Hd += damp * diag.mean() * torch.eye(cols, dtype=dt, device=dev)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
    W = W.clone()
    W[:, dead] = 0
    removed = torch.zeros(S, dtype=torch.bool, device=dev)
    eye = torch.eye(g, dtype=dt, device=dev)
    for _ in range(S if max_steps is None else min(S, max_steps)):
        Wg = W.reshape(rows, S, g).permute(1, 0, 2)
        B = torch.diagonal(Hinv.reshape(S, g, S, g), dim1=0, dim2=2).permute(2, 0, 1)
        B = torch.where(removed[:, None, None], eye, B)
        rho = torch.einsum("srg,sgh,srh->s", Wg, torch.linalg.inv(B), Wg)
        rho[removed] = float("inf")
        k = int(rho.argmin())
        M = slice(k * g, (k + 1) * g)
        L = torch.linalg.cholesky(Hinv[M, M])
        Gn = torch.linalg.solve_triangular(L, Hinv[M], upper=False).T
        Un = torch.linalg.solve_triangular(L, W[:, M].T, upper=False).T
        Gn[removed.repeat_interleave(g)] = 0
        W -= Un @ Gn.T
        Hinv -= Gn @ Gn.T
        W[:, M] = 0
        removed[k] = True
    return W


def naive_seconds(W, H, g, steps):
    """Seconds of the naive loop over all S steps; with steps < S, the first `steps` timed and scaled
    (each naive step pays the same full-matrix updates)."""
    S = W.shape[1] // g
    steps = min(steps, S)
    naive_greedy_obs(W, H, g, max_steps=min(steps, 8))  # warm-up: cuSOLVER/cuBLAS handles
    sync()
    t0 = time.perf_counter()
    naive_greedy_obs(W, H, g, max_steps=steps)
    sync()
    return (time.perf_counter() - t0) * S / steps, steps < S


def bench_obs(rows, full):
    cases = [(r, c, 1) for r, c in FFN_SHAPES] + HEAD_SHAPES
    for r, c, g in cases:
        W, H = problem(r, c)
        runs = 1 if r * c > 10**7 else 3
        t_nat = seconds(lambda: ops.greedy_obs(W, H, g), runs=runs)
        steps = c // g if (full or g > 1 or c <= 3072) else 512
        t_naive, extrap = naive_seconds(W, H, g, steps)
        add(rows, "greedy_obs" if g == 1 else "greedy_obs heads", f"{r}x{c} g={g} f32", t_naive, t_nat,
            "naive extrapolated from %d steps" % steps if extrap else "")
        del W, H
        torch.cuda.empty_cache()


def bench_inverse(rows):
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator(device="cuda").manual_seed(1)
        A = torch.randn(1000, 128, 64, generator=g, device="cuda", dtype=torch.float64)
        Hs = (A.transpose(-1, -2) @ A).to(dtype)
        t_torch = seconds(lambda: torch.cholesky_inverse(torch.linalg.cholesky(Hs)), runs=20)
        t_nat = seconds(lambda: ops.damped_inverse(Hs, 0.0), runs=20)
        add(rows, "damped_inverse", f"1000x64x64 {str(dtype)[6:]}", t_torch, t_nat,
            "baseline: torch.linalg.cholesky + cholesky_inverse")


def add(rows, op, shape, t_base, t_nat, note=""):
    row = dict(op=op, shape=shape, pytorch_s=t_base, native_s=t_nat, speedup=t_base / t_nat, note=note)
    rows.append(row)
    print(f"{op:<18}{shape:<22}pytorch {t_base:9.4f}s  native {t_nat:9.4f}s  {row['speedup']:7.1f}x  {note}",
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="run the naive FFN loops over every step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda: needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not native.cuda_kernels_built():
        raise SystemExit("bench_cuda: needs a CUDA build of ziplm_ext._C (pip install --no-build-isolation .)")
    name = torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda})")
    rows = []
    bench_inverse(rows)
    bench_obs(rows, args.full)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    out = Path(args.out or Path(__file__).parent / "results" / f"cuda_{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(device=name, torch=torch.__version__, cuda=torch.version.cuda,
                   date=time.strftime("%Y-%m-%d %H:%M"), full=args.full, rows=rows)
    atomic_write_bytes(out, json.dumps(payload, indent=2).encode())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
