"""torch.distributed helpers with no model knowledge: ranks, sharding, reductions, load balancing.

Launch with ``torchrun --nproc_per_node=N`` (gloo on CPUs, NCCL on GPUs); a plain single process is
the world of size 1 and every helper then degenerates to a no-op.

* :func:`shard_bounds` -- a deterministic, contiguous split of N items (calibration sequences or
  batches) over the ranks; shards may be uneven and a rank may hold none.
* :func:`reduce_hessian` -- SUM of the unnormalised float64 ``XᵀX`` and of the int64 token counts.
  A mean is taken once, after the sum (:func:`mean_hessian`): averaging per-rank running means with
  ``ReduceOp.AVG`` weights every rank equally and is wrong as soon as shards hold different numbers
  of tokens.
* :func:`assign_by_cost` -- deterministic longest-processing-time bin packing of jobs (per-layer
  OBS solves, cost ≈ columns² × steps) onto ranks.
* :func:`broadcast_object`, :func:`broadcast_tensors`, :func:`all_gather_object`, :func:`barrier`.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "init_from_env", "shutdown", "shard_bounds", "shard_of",
           "comm_device", "reduce_hessian", "sum_count", "mean_hessian", "solve_cost", "assign_by_cost",
           "broadcast_object", "broadcast_tensors", "all_gather_object", "barrier"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(backend: Optional[str] = None, timeout_s: float = 4 * 3600) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment).

    Returns True when running distributed. backend: "nccl" when CUDA is available, else "gloo".
    Each rank of a CUDA run is bound to the GPU ``LOCAL_RANK``. timeout_s: how long a collective may
    wait (long: the other ranks wait while rank 0 alone times the latency table or searches).
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None
    if world <= 1:
        return False
    if not dist.is_available():
        raise ImportError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return is_distributed()


def shutdown() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges of n items over `world` ranks, one per rank.

    The first ``n % world`` ranks hold one item more; when n < world the last ranks hold none. The
    split depends only on (n, world), so every rank computes the same one without communicating.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"number of items to shard must be an int >= 0, got {n!r}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be an int >= 1, got {world!r}")
    base, extra = divmod(n, world)
    out, start = [], 0
    for r in range(world):
        end = start + base + (1 if r < extra else 0)
        out.append((start, end))
        start = end
    return out


def shard_of(items: Sequence, rank_: Optional[int] = None, world: Optional[int] = None) -> list:
    """This rank's contiguous shard of `items` (see :func:`shard_bounds`)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside a world of {w}")
    start, end = shard_bounds(len(items), w)[r]
    return list(items[start:end])


def comm_device() -> torch.device:
    """Where tensors must live for the current backend (CUDA for NCCL, CPU otherwise)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_hessian(H: torch.Tensor, count: int, dst: int) -> tuple[Optional[torch.Tensor], int]:
    """SUM this rank's unnormalised ``Σ xxᵀ`` (float64) onto rank `dst`, and the token counts onto all.

    Returns ``(ΣH over ranks, total tokens)`` on `dst` and ``(None, total tokens)`` elsewhere. `H` is
    used as the communication buffer (overwritten). Outside a process group: ``(H, count)``.
    """
    if H.dtype != torch.float64 or H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise TypeError(f"reduce_hessian needs a square float64 Hessian, got {H.dtype} {tuple(H.shape)}")
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"token count must be an int >= 0, got {count!r}")
    if not is_distributed():
        return H, count
    if not 0 <= dst < world_size():
        raise ValueError(f"destination rank {dst} outside a world of {world_size()}")
    dev = comm_device()
    buf = H.contiguous() if H.device == dev else H.to(dev).contiguous()
    dist.reduce(buf, dst=dst, op=dist.ReduceOp.SUM)
    total = sum_count(count)
    if rank() != dst:
        return None, total
    return (buf if buf.device == H.device else buf.to(H.device)), total


def sum_count(count: int) -> int:
    """The SUM over all ranks of an integer count, exact (int64)."""
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    if not is_distributed():
        return count
    n = torch.tensor([count], dtype=torch.int64, device=comm_device())
    dist.all_reduce(n, op=dist.ReduceOp.SUM)
    return int(n.item())


def mean_hessian(H_sum: torch.Tensor, count: int) -> torch.Tensor:
    """The mean ``XᵀX / tokens``, divided once after the SUM over all ranks."""
    if count <= 0:
        raise ValueError("cannot average a Hessian over zero tokens (calibration data has no non-padding tokens)")
    return H_sum / count


def solve_cost(columns: int, steps: int) -> int:
    """Relative cost of one greedy OBS solve: each of `steps` removals downdates a columns² inverse."""
    return int(columns) ** 2 * int(steps)


def assign_by_cost(costs: Sequence[float], world: int) -> list[int]:
    """The owning rank of each job: longest processing time first onto the least loaded rank.

    Deterministic: jobs are taken by descending cost, ties by index; load ties go to the lowest
    rank. The largest rank load is at most 4/3 of the optimum (Graham's bound).
    """
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be an int >= 1, got {world!r}")
    if any(not (c >= 0) for c in costs):
        raise ValueError(f"job costs must be finite and >= 0, got {list(costs)}")
    load = [0.0] * world
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += costs[j]
    return owner


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank (identity outside a process group)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=comm_device() if comm_device().type == "cuda" else None)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's picklable object, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_tensors(tensors: Optional[Sequence[torch.Tensor]], specs: Sequence[tuple], src: int,
                      device: Optional[torch.device] = None) -> list[torch.Tensor]:
    """Rank `src`'s tensors on every rank, bit for bit.

    specs: ``(shape, dtype)`` of each tensor, known to every rank beforehand (e.g. from
    :func:`all_gather_object`). tensors: the data on `src` (ignored elsewhere). Received tensors
    are placed on `device` (default: CPU).
    """
    if not is_distributed():
        return list(tensors)
    dev = comm_device()
    out = []
    for i, (shape, dtype) in enumerate(specs):
        if rank() == src:
            t = tensors[i]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"tensor {i} is {t.dtype} {tuple(t.shape)}, spec says {dtype} {tuple(shape)}")
            buf = t.detach().to(dev).contiguous()
        else:
            buf = torch.empty(tuple(shape), dtype=dtype, device=dev)
        if buf.numel():
            dist.broadcast(buf, src=src)
        out.append(tensors[i] if rank() == src else buf.to(device or torch.device("cpu")))
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()
