"""Wall time of calibration + OBS database on SmolLM2-135M at 1 and N ranks (torch.distributed).

    python scripts/dist_timing.py                       # 1 and 2 ranks, 32 x 128 calibration tokens
    python scripts/dist_timing.py --ranks 1 2 4 --num-blocks 64 --out bench/results/dist_timing.json

Each setting is launched with ``torchrun --standalone --nproc_per_node=N`` (gloo on the CPU, NCCL
when CUDA is present); every rank is pinned to ``--threads`` intra-op threads (default 1), the
single-rank baseline included. Timed per run: :func:`build_database` from the first calibration
forward to the moment every rank holds the whole database (model loading excluded), between two
barriers, and the CPU seconds each rank spent in it (a check of the split that load on a shared
machine disturbs less than wall time). Every run's removal orders are hashed: the script fails if they differ between settings
(the distributed database must equal the single-process one). Take the figures on a quiet machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from ziplm_ext import dist
    from ziplm_ext.eval.data import token_blocks, wiki_split
    from ziplm_ext.io.models import load_smollm2
    from ziplm_ext.stages.calibrate import make_batches
    from ziplm_ext.stages.database import build_database

    dist.init_from_env()
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    ids = token_blocks(wiki_split("train"), tok, args.seq_len, args.num_blocks, seed=0)
    load_s = time.perf_counter() - t0
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    db = build_database(model, make_batches(ids, None, batch_size=8), progress=False)
    cpu = time.process_time() - c0
    dist.barrier()
    elapsed = time.perf_counter() - t0
    h = hashlib.sha256()
    for n in db.names():
        h.update(n.encode() + db[n].history.order.cpu().numpy().tobytes())
    losses = {n: float(db[n].history.losses[-2]) for n in db.names()}  # the loss one step before empty
    times = dist.all_gather_object(elapsed)
    cpus = dist.all_gather_object(cpu)
    if dist.rank() == 0:
        Path(args.result).write_text(json.dumps(dict(
            ranks=dist.world_size(), threads_per_rank=args.threads, calibration_plus_database_s=max(times),
            per_rank_s=times, per_rank_cpu_s=cpus, load_s=load_s, orders_sha256=h.hexdigest(), losses=losses,
            tokens=int(ids.numel()), device="cuda" if torch.cuda.is_available() else "cpu")))
    if dist.is_distributed():
        dist.dist.destroy_process_group()


def launch(n: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(Path(__file__).resolve()), "--worker", "--result", str(result), "--threads", str(args.threads),
               "--num-blocks", str(args.num_blocks), "--seq-len", str(args.seq_len)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        subprocess.run(cmd, check=True, env=env)
        return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--num-blocks", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = [launch(n, args) for n in args.ranks]
    base = rows[0]["calibration_plus_database_s"]
    print(f"{'ranks':>5} {'threads/rank':>12} {'calib+db s':>11} {'speedup':>8} {'max CPU s/rank':>15}  orders")
    for r in rows:
        same = "same" if r["orders_sha256"] == rows[0]["orders_sha256"] else "DIFFERENT"
        print(f"{r['ranks']:>5} {r['threads_per_rank']:>12} {r['calibration_plus_database_s']:>11.1f} "
              f"{base / r['calibration_plus_database_s']:>7.2f}x {max(r['per_rank_cpu_s']):>15.1f}  {same}")
    worst = max(abs(r["losses"][n] - rows[0]["losses"][n]) / max(abs(rows[0]["losses"][n]), 1e-30)
                for r in rows for n in r["losses"])
    print(f"largest relative difference of a layer loss between settings: {worst:.2e}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    if any(r["orders_sha256"] != rows[0]["orders_sha256"] for r in rows):
        sys.exit("the removal orders differ between settings")


if __name__ == "__main__":
    main()
