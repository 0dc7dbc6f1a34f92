"""The per-layer OBS database: for every prunable layer, the full greedy removal order, the loss
after each removal and the compact factors from which the weights at any level are rebuilt
(ZipLM paper: structured OBS, removing one structure at a time with the optimal weight update).

On disk (``workdir/``) each layer is one ``.pt`` file written atomically, next to a manifest that
fingerprints the model, the calibration data and the settings; an interrupted build resumes by
skipping the layers already there. Every speedup target reuses the same database.
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

from ziplm_ext.native import ops
from ziplm_ext.io.fileio import atomic_write_bytes
from ziplm_ext.adapters import get_adapter
from ziplm_ext.adapters.base import Adapter, PrunableLayer
from ziplm_ext.stages.calibrate import CalibrationBatch, block_hessians
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
    db_dir = None
    if workdir is not None:
        db_dir = Path(workdir) / "database"
        db_dir.mkdir(parents=True, exist_ok=True)
        manifest = db_dir / "manifest.json"
        fp = fingerprint(model, batches, damp, list(layers.values()), grid_fn, block_size)
        if manifest.exists():
            old = json.loads(manifest.read_text())
            if old.get("fingerprint") != fp:
                raise ValueError(f"workdir {workdir} holds a database for another model, calibration set, damping or "
                                 "level grid; use a fresh --workdir")
        else:
            atomic_write_bytes(manifest, json.dumps({"fingerprint": fp, "format_version": FORMAT_VERSION}).encode())
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
                H = hessians[name]
                W = adapter.get_weight(model, layer).float()
                hist = ops.greedy_obs(W, H, layer.group_size, damp=damp, block_size=block_size)
                dense_error = float(torch.einsum("rc,cd,rd->", W.double(), H, W.double()))
                entries[name] = _entry(layer, hist, dense_error, grid_fn)
                if path is not None:
                    _save_entry(path, entries[name])
            bar.update(1)
    bar.close()
    return ObsDatabase(entries)
