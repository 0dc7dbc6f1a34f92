"""Calibration: layer-wise Hessians H = XᵀX of the prunable out projections, one block at a time
(ZipLM paper: the layer-wise reconstruction loss that structured OBS minimises).

The inputs of block 0 are captured once (GPTQ-style: a pre-hook stops the forward there), then
every block is run on its own with the captured keyword arguments (masks, rotary embeddings), so
peak memory holds one block's activations and does not grow with depth. Padding tokens are
excluded from the Hessians.

Under torch.distributed (:func:`reduced_block_hessians`) each rank runs a contiguous shard of the
calibration batches; per layer, the ranks' float64 sums ``Σ xxᵀ`` and int64 token counts are
reduced with SUM onto the rank that owns the layer's solve.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ziplm_ext import dist
from ziplm_ext.native import ops
from ziplm_ext.adapters import get_adapter
from ziplm_ext.adapters.base import Adapter, PrunableLayer, in_features_of


class _StopForward(Exception):
    pass


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor                       # (B, T)
    attention_mask: Optional[torch.Tensor] = None  # (B, T), 1 = real token


def make_batches(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], batch_size: int):
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"calibration data must be a non-empty (N, seq) tensor of token ids, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"calibration token ids must be an integer tensor, got {input_ids.dtype}")
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        m = None if attention_mask is None else attention_mask[i:i + batch_size]
        out.append(CalibrationBatch(input_ids[i:i + batch_size], m))
    return out


def _block_inputs(model: nn.Module, adapter: Adapter, batch: CalibrationBatch):
    """Positional args and kwargs with which the model calls its first block."""
    captured = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _StopForward

    block0 = adapter.blocks(model)[0]
    handle = block0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        kw = {} if batch.attention_mask is None else {"attention_mask": batch.attention_mask}
        try:
            model(input_ids=batch.input_ids, use_cache=False, **kw)
        except TypeError:  # models without a KV cache do not take use_cache
            model(input_ids=batch.input_ids, **kw)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise RuntimeError("calibration: the model never called its first transformer block")
    return captured["args"], captured["kwargs"]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def block_hessians(model: nn.Module, batches: list[CalibrationBatch], *, adapter: Optional[Adapter] = None,
                   progress: Optional[Callable] = None,
                   only: Optional[set] = None) -> Iterator[tuple[int, dict[str, torch.Tensor], int]]:
    """Yield (block index, {layer name: float64 Hessian}, token count) for each block in order.

    Hessians are sums (not means) of xxᵀ over the non-padding tokens entering each prunable
    out projection of the dense model. only: accumulate just these layer names (default: all).
    An empty `batches` yields empty dicts and zero counts.
    """
    adapter = adapter or get_adapter(model)
    model.eval()
    layers = adapter.prunable_layers(model)
    states = []  # per batch: (hidden, args_rest, kwargs, token mask)
    for b in batches:
        args, kwargs = _block_inputs(model, adapter, b)
        mask = b.attention_mask.bool() if b.attention_mask is not None else torch.ones_like(b.input_ids, dtype=torch.bool)
        states.append([args[0] if args else kwargs.pop("hidden_states"), args[1:], kwargs, mask])
    for i, block in enumerate(adapter.blocks(model)):
        mine = [l for l in layers if l.block == i]
        H = {}
        hooks = []
        current = {}

        def hook_for(layer: PrunableLayer):
            def pre(module, args):
                x = args[0]
                if layer.name not in H:
                    H[layer.name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
                ops.hessian_accumulate(H[layer.name], x.detach(), current["mask"])
            return pre

        for layer in mine:
            if adapter.is_removed(model, layer) or (only is not None and layer.name not in only):
                continue
            hooks.append(adapter.out_proj(model, layer).register_forward_pre_hook(hook_for(layer)))
        ntok = 0
        try:
            for st in states:
                current["mask"] = st[3]
                ntok += int(st[3].sum())
                st[0] = _first(block(st[0], *st[1], **st[2]))
        finally:
            for h in hooks:
                h.remove()
        if progress is not None:
            progress(i)
        yield i, H, ntok


@torch.no_grad()
def reduced_block_hessians(model: nn.Module, batches: list[CalibrationBatch], owners: dict[str, int], *,
                           adapter: Optional[Adapter] = None,
                           progress: Optional[Callable] = None) -> Iterator[tuple[int, dict[str, torch.Tensor], int]]:
    """Data-parallel :func:`block_hessians` (every rank of the process group calls it with the same
    arguments): this rank runs its contiguous shard of `batches` (:func:`ziplm_ext.dist.shard_of`;
    possibly none), and each layer's Hessian is SUM-reduced onto ``owners[name]``.

    Yields (block index, {name: summed float64 Hessian for the layers this rank owns}, total token
    count over all ranks) for each block in order. Layers not in `owners` are not accumulated.
    """
    adapter = adapter or get_adapter(model)
    layers = [l for l in adapter.prunable_layers(model) if l.name in owners]
    device = next(model.parameters()).device
    mine = dist.shard_of(batches)
    for i, local, ntok in block_hessians(model, mine, adapter=adapter, progress=progress, only=set(owners)):
        out: dict[str, torch.Tensor] = {}
        total = None
        for layer in (l for l in layers if l.block == i):
            H = local.pop(layer.name, None)
            if H is None:  # an empty shard: this rank adds nothing to the sum
                cols = in_features_of(adapter.out_proj(model, layer))
                H = torch.zeros(cols, cols, dtype=torch.float64, device=device)
            H_sum, total = dist.reduce_hessian(H, ntok, owners[layer.name])
            if H_sum is not None:
                out[layer.name] = H_sum
        yield i, out, dist.sum_count(ntok) if total is None else total
