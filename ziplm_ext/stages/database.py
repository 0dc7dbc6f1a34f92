"""The per-layer OBS database: for every prunable layer, the full greedy removal order, the loss
after each removal and the compact factors from which the weights at any level are rebuilt
(ZipLM paper: structured OBS, removing one structure at a time with the optimal weight update).

On disk (``workdir/``) each layer is one ``.pt`` file written atomically, next to a manifest that
fingerprints the model, the calibration data and the settings; an interrupted build resumes by
skipping the layers already there. Every speedup target reuses the same database.

Under torch.distributed (``torchrun``; detected by :func:`build_database`) the calibration is data
parallel and the solves are spread over the ranks. The database's Hessians are those of the dense
model (every block runs on the outputs of the dense block before it, and no weight changes while
the database is built), so the per-layer solves are independent: each layer's Hessian is
SUM-reduced onto one owner rank (layers bin-packed by solve cost, columns² × steps), owners solve in
parallel and write their entries atomically to the shared workdir, then every owner broadcasts its
entries so that all ranks end with the same database, bit for bit.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ziplm_ext import dist
from ziplm_ext.native import ops
from ziplm_ext.io.fileio import atomic_write_bytes
from ziplm_ext.adapters import get_adapter
from ziplm_ext.adapters.base import Adapter, PrunableLayer
from ziplm_ext.stages.calibrate import CalibrationBatch, block_hessians, reduced_block_hessians
from ziplm_ext.stages.levels import layer_grid

FORMAT_VERSION = 2  # 2: the fingerprint covers every weight, the widths and the level grid


@dataclass
class LayerEntry:
    layer: PrunableLayer
    history: ops.GreedyOBSResult
    dense_error: float        # ||X Wᵀ||² = tr(W H Wᵀ) of the dense layer
    grid: list[int]           # candidate widths (kept-structure counts), descending, full width first, 0 last
    errors: list[float]       # relative reconstruction error at each level

    def kept(self, count: int) -> list[int]:
        """Sorted indices of the structures kept at `count` kept structures."""
        return self.history.kept(self.layer.num_structures - count).tolist()

    def relative_error(self, count: int) -> float:
        k = self.layer.num_structures - count
        return self.history.loss(k) / max(self.dense_error, 1e-30)


def fingerprint(model, batches: Sequence[CalibrationBatch], damp: float, layers: Sequence[PrunableLayer] = (),
                grid_fn: Optional[Callable] = None, block_size: int = 128) -> str:
    """A digest of everything a database entry depends on: the architecture, every parameter and
    buffer byte for byte (a change to one middle layer must invalidate the database), the current
    widths, the calibration tokens and mask, the damping, the level grid and the format."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # .view(uint8) hashes the exact bytes (bf16/fp16 have no numpy dtype)
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    for b in batches:
        h.update(b.input_ids.cpu().numpy().tobytes())
        if b.attention_mask is not None:
            h.update(b.attention_mask.cpu().numpy().tobytes())
    grid = {l.name: [l.num_structures, sorted(grid_fn(l)) if grid_fn is not None else None] for l in layers}
    h.update(json.dumps(grid, sort_keys=True).encode())
    h.update(f"{damp!r}:{block_size}:{FORMAT_VERSION}".encode())
    return h.hexdigest()[:32]


class ObsDatabase:
    def __init__(self, entries: dict[str, LayerEntry], cache_size: int = 256):
        self.entries = entries
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size

    def __getitem__(self, name: str) -> LayerEntry:
        return self.entries[name]

    def names(self) -> list[str]:
        return list(self.entries)

    def weights(self, name: str, count: int) -> torch.Tensor:
        """Out-projection weights (out, in) with `count` structures kept (removed columns zero)."""
        key = (name, count)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        e = self.entries[name]
        W = e.history.weights(e.layer.num_structures - count)
        self._cache[key] = W
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return W


def _save_entry(path: Path, e: LayerEntry) -> None:
    h = e.history
    payload = dict(order=h.order, losses=h.losses, U=h.U, R=h.R, W0=h.W0, group_size=h.group_size, damp=h.damp,
                   dense_error=e.dense_error, num_structures=e.layer.num_structures)
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def weights_from_order(W: torch.Tensor, H: torch.Tensor, order: torch.Tensor, k: int, group_size: int,
                       damp: float) -> torch.Tensor:
    """The weights after the first `k` removals of `order`, rebuilt from the Hessian alone.

    For layers too large to keep the full history (U, R), only the order and the losses need be
    stored. With the removed set fixed, the OBS-optimal weights of the kept columns K are the
    least-squares solution ``Ŵ_K = W H[:, K] H[K, K]⁻¹`` (ZipLM paper, structured OBS: the loss is
    quadratic, so the greedy sequence of rank-g updates arrives at the same point). H is damped as
    the solve damped it: dead inputs (zero diagonal) get ``H_ii = 1`` and their weights are zeroed,
    then ``damp · mean(diag H)`` is added (`damp`: :attr:`GreedyOBSResult.damp`, the value used).
    Returns (rows, cols) in W's dtype with removed columns zero.
    """
    rows, cols = W.shape
    if H.shape != (cols, cols) or cols % group_size or order.numel() != cols // group_size:
        raise ValueError(f"weights_from_order: W {tuple(W.shape)}, H {tuple(H.shape)}, group size {group_size} and "
                         f"{order.numel()} structures do not fit together")
    if not 0 <= k <= order.numel():
        raise ValueError(f"k must be in [0, {order.numel()}], got {k}")
    Hd = H.to(torch.float64).clone()
    dead = Hd.diagonal() == 0
    Hd.diagonal()[dead] = 1.0
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    W0 = W.to(torch.float64).clone()
    W0[:, dead] = 0
    removed = torch.zeros(cols, dtype=torch.bool)
    removed[(order[:k, None].cpu() * group_size + torch.arange(group_size)).reshape(-1)] = True
    keep = (~removed).nonzero().squeeze(1).to(W.device)
    out = torch.zeros(rows, cols, dtype=torch.float64, device=W.device)
    if keep.numel():
        # Ŵ_Kᵀ = H[K, K]⁻¹ H[K, :] Wᵀ, by a Cholesky solve of the damped (SPD) block
        L = torch.linalg.cholesky(Hd[keep][:, keep])
        out[:, keep] = torch.cholesky_solve(Hd[keep] @ W0.T, L).T
    return out.to(W.dtype)


def _load_entry(path: Path, layer: PrunableLayer, grid_fn) -> LayerEntry:
    p = torch.load(path, weights_only=True)
    if p["num_structures"] != layer.num_structures:
        raise ValueError(f"database entry {path} does not match layer {layer.name}")
    hist = ops.GreedyOBSResult(p["order"], p["losses"], p["U"], p["R"], p["W0"], p["group_size"], p["damp"])
    return _entry(layer, hist, p["dense_error"], grid_fn)


def _entry(layer: PrunableLayer, hist: ops.GreedyOBSResult, dense_error: float, grid_fn) -> LayerEntry:
    grid = sorted(set(grid_fn(layer)) | {layer.num_structures, 0}, reverse=True)
    e = LayerEntry(layer, hist, dense_error, grid, [])
    e.errors = [e.relative_error(k) for k in grid]
    return e


def _open_workdir(workdir, fp: str) -> Path:
    """``workdir/database``, created with a manifest holding `fp`, or checked against its manifest."""
    db_dir = Path(workdir) / "database"
    db_dir.mkdir(parents=True, exist_ok=True)
    manifest = db_dir / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old.get("fingerprint") != fp:
            raise ValueError(f"workdir {workdir} holds a database for another model, calibration set, damping or "
                             "level grid; use a fresh --workdir")
    else:
        atomic_write_bytes(manifest, json.dumps({"fingerprint": fp, "format_version": FORMAT_VERSION}).encode())
    return db_dir


def build_database(model, batches: Sequence[CalibrationBatch], *, damp: float = 0.01,
                   workdir: Optional[str | os.PathLike] = None, grid_fn: Callable = layer_grid,
                   progress: bool = True, block_size: int = 128) -> ObsDatabase:
    """Calibrate block by block and run greedy OBS on every prunable layer (resumable).

    Works on dense and on already pruned models: each entry's ``layer.num_structures`` is the
    layer's current count, levels and kept indices refer to the current structures, and removed
    modules get no entry."""
    adapter: Adapter = get_adapter(model)
    # Structures are counted in the model as it is now (for an already pruned model, e.g. in
    # gradual pruning, the current widths); removed modules have nothing left to prune.
    layers = {l.name: replace(l, num_structures=adapter.current_count(model, l))
              for l in adapter.prunable_layers(model) if not adapter.is_removed(model, l)}
    if dist.is_distributed():
        return _build_distributed(model, list(batches), layers, adapter, damp=damp, workdir=workdir, grid_fn=grid_fn,
                                  progress=progress, block_size=block_size)
    db_dir = None
    if workdir is not None:
        db_dir = _open_workdir(workdir, fingerprint(model, batches, damp, list(layers.values()), grid_fn, block_size))
    entries: dict[str, LayerEntry] = {}
    bar = tqdm(total=len(layers), desc="OBS database", unit="layer", disable=not progress)
    for block, hessians, ntok in block_hessians(model, list(batches), adapter=adapter):
        if ntok == 0:
            raise ValueError("calibration data has no non-padding tokens")
        for name, layer in layers.items():
            if layer.block != block:
                continue
            path = db_dir / f"{name}.pt" if db_dir is not None else None
            if path is not None and path.exists():
                entries[name] = _load_entry(path, layer, grid_fn)
            else:
                entries[name] = _solve(model, adapter, layer, hessians[name], damp, block_size, grid_fn)
                if path is not None:
                    _save_entry(path, entries[name])
            bar.update(1)
    bar.close()
    return ObsDatabase(entries)


# ----------------------------------------------------------------------------- torch.distributed


def solve_owners(layers: Sequence[PrunableLayer], world: int) -> dict[str, int]:
    """The rank that solves each layer: bin-packed by the greedy OBS cost, columns² × steps
    (:func:`ziplm_ext.dist.assign_by_cost`); depends only on the layers and the world size."""
    costs = [dist.solve_cost(l.num_structures * l.group_size, l.num_structures) for l in layers]
    return {l.name: r for l, r in zip(layers, dist.assign_by_cost(costs, world))}


def _dist_workdir(workdir, fp: str, layers: dict) -> tuple[Optional[Path], list[str]]:
    """Rank 0 opens (or checks) the shared workdir and lists the entries already there; every rank
    gets the same answer, or the same error."""
    if workdir is None:
        return None, []
    err, done = None, []
    if dist.rank() == 0:
        try:
            db_dir = _open_workdir(workdir, fp)
            done = [n for n in layers if (db_dir / f"{n}.pt").exists()]
        except (ValueError, OSError) as e:
            err = e
    err, done = dist.broadcast_object((err, done), src=0)
    if err is not None:
        raise err
    return Path(workdir) / "database", done


def _solve(model, adapter: Adapter, layer: PrunableLayer, H: torch.Tensor, damp: float, block_size: int, grid_fn):
    W = adapter.get_weight(model, layer).float()
    hist = ops.greedy_obs(W, H, layer.group_size, damp=damp, block_size=block_size)
    dense_error = float(torch.einsum("rc,cd,rd->", W.double(), H, W.double()))
    return _entry(layer, hist, dense_error, grid_fn)


def _tensors(h: ops.GreedyOBSResult) -> list[torch.Tensor]:
    return [h.order, h.losses, h.U, h.R, h.W0]


def _share(solved: dict[str, LayerEntry], owners: dict[str, int], layers: dict, grid_fn, device) -> dict[str, LayerEntry]:
    """Every owner broadcasts its entries: afterwards all ranks hold every entry, bit for bit."""
    meta = {}
    for part in dist.all_gather_object({n: ([(tuple(t.shape), t.dtype) for t in _tensors(e.history)],
                                            e.history.group_size, e.history.damp, e.dense_error)
                                        for n, e in solved.items()}):
        meta.update(part)
    out = {}
    for name, src in owners.items():
        specs, group_size, damp_used, dense_error = meta[name]
        mine = solved.get(name)
        got = dist.broadcast_tensors(None if mine is None else _tensors(mine.history), specs, src, device=device)
        if mine is None:
            mine = _entry(layers[name], ops.GreedyOBSResult(*got, group_size, damp_used), dense_error, grid_fn)
        out[name] = mine
    return out


def _build_distributed(model, batches: list[CalibrationBatch], layers: dict[str, PrunableLayer], adapter: Adapter, *,
                       damp: float, workdir, grid_fn: Callable, progress: bool, block_size: int) -> ObsDatabase:
    """:func:`build_database` over the ranks of the process group (see the module docstring)."""
    fp = fingerprint(model, batches, damp, list(layers.values()), grid_fn, block_size)
    if len(set(dist.all_gather_object(fp))) != 1:
        raise ValueError("the ranks hold different models, calibration data or database settings; every rank must "
                         "load the same model and calibration set")
    db_dir, done = _dist_workdir(workdir, fp, layers)
    entries = {n: _load_entry(db_dir / f"{n}.pt", layers[n], grid_fn) for n in done}
    owners = solve_owners([l for n, l in layers.items() if n not in entries], dist.world_size())
    held: dict[str, torch.Tensor] = {}
    if owners:
        for _, hessians, ntok in reduced_block_hessians(model, batches, owners, adapter=adapter):
            if ntok == 0:
                raise ValueError("calibration data has no non-padding tokens")
            held.update(hessians)
    me = dist.rank()
    mine = [n for n, r in owners.items() if r == me]
    solved: dict[str, LayerEntry] = {}
    for name in tqdm(mine, desc=f"OBS database (rank {me})", unit="layer", disable=not progress or me != 0):
        solved[name] = _solve(model, adapter, layers[name], held.pop(name), damp, block_size, grid_fn)
        if db_dir is not None:
            _save_entry(db_dir / f"{name}.pt", solved[name])
    device = next(model.parameters()).device
    entries.update(_share(solved, owners, layers, grid_fn, device))
    return ObsDatabase({n: entries[n] for n in layers})
