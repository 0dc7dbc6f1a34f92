"""The loss the allocation search minimises: the calibration loss of the stitched model.

SPDY scores every candidate allocation by the real loss of the model it describes, not by the
summed database errors (ZipLM paper, structured SPDY search). Building each candidate model
would be slow, so one working copy of the model is "stitched": each prunable layer's out
projection takes the OBS-updated weights of its chosen width from the database (removed columns
zero), which computes exactly what the sliced model computes.

One evaluation is made cheap by reusing work across candidates (the "cached inputs" of the
SPDY search): the output of every transformer block is kept, keyed by the widths of that block
and of all blocks before it. A new allocation re-runs the blocks from the first one whose input
it has not seen (the first block whose widths changed, or later when a known prefix matches)
and replays the stored output for the blocks before it. The model's own forward still runs
around the blocks (embeddings, masks, rotary embeddings, final norm, LM head), so the loss is
the full forward's loss, computed by the same operations on the same inputs.
"""
from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from ziplm_ext.adapters import get_adapter, has_lm_head
from ziplm_ext.eval.metrics import kl_terms
from ziplm_ext.stages.database import ObsDatabase

__all__ = ["StitchedLoss"]


class _BlockOutputs:
    """LRU store of block outputs keyed by ``(batch, widths of blocks 0..k)``; capacity in entries."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.entries: OrderedDict = OrderedDict()

    def get(self, key):
        out = self.entries.get(key)
        if out is not None:
            self.entries.move_to_end(key)
        return out

    def put(self, key, value) -> None:
        if self.capacity <= 0:
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def _prefix_keys(block_widths: list[tuple]) -> list[tuple]:
    """``keys[k]`` = the widths of blocks ``0..k``: what block k's output depends on."""
    keys, acc = [], ()
    for w in block_widths:
        acc = acc + (w,)
        keys.append(acc)
    return keys


class StitchedLoss:
    """Calibration loss of the model stitched from database widths, on cached inputs.

    Models with an LM head: mean token KL(dense ‖ stitched). Encoders: ‖h_s − h_d‖² / ‖h_d‖² of the
    last hidden states over real tokens. ``loss(widths)`` sets the widths (kept structures per layer
    name) and returns the loss.

    ``prefixes``: how many allocations' block outputs are kept for reuse (an LRU; 0 runs every
    block every time). The value does not change the loss, only its cost. ``stats`` counts the
    evaluations and the blocks run out of the blocks a plain forward would run.
    """

    def __init__(self, dense: nn.Module, db: ObsDatabase, input_ids: torch.Tensor, batch_size: int = 8,
                 reference: Optional[nn.Module] = None, prefixes: int = 4):
        # `dense` is the model the database was built on; `reference` (default: that model) gives
        # the target outputs, e.g. the dense teacher when pruning an already pruned model further.
        if not isinstance(prefixes, int) or isinstance(prefixes, bool) or prefixes < 0:
            raise ValueError(f"StitchedLoss: prefixes must be an integer >= 0, got {prefixes!r}")
        self.db = db
        self.adapter = get_adapter(dense)
        self.work = copy.deepcopy(dense).eval()
        self.layers = {l.name: l for l in self.adapter.prunable_layers(self.work)}
        self.ids = input_ids
        self.bs = batch_size
        self.causal = has_lm_head(dense)  # token logits: KL; else hidden states
        self.current: dict[str, int] = {}
        self.stats = dict(evaluations=0, blocks_run=0, blocks_total=0)
        blocks = self.adapter.blocks(self.work)
        self._block_names = [[n for n in db.names() if n in self.layers and self.layers[n].block == k]
                             for k in range(len(blocks))]
        self._outputs = _BlockOutputs(prefixes * len(blocks) * len(self._batches()))
        self._plan: Optional[tuple] = None  # (batch index, first block to run, prefix keys, replayed output)
        for k, block in enumerate(blocks):
            block.forward = self._replaying(k, block.forward)  # instance attribute: only the working copy
        self._call_kwargs = _no_cache_kwargs(self.work)
        with torch.no_grad():
            self.reference = [self._forward(reference if reference is not None else dense, b)
                              for b in self._batches()]

    def _batches(self):
        return [self.ids[i:i + self.bs] for i in range(0, self.ids.shape[0], self.bs)]

    def _forward(self, model, ids):
        out = model(input_ids=ids, **(self._call_kwargs if model is self.work else {}))
        if self.causal:
            return torch.log_softmax(out.logits.float(), dim=-1)
        return out.last_hidden_state.float()

    def _replaying(self, k: int, forward):
        """Block k's forward: replays the stored output for blocks before the plan's first block,
        runs (and stores) the others."""
        def run(*args, **kwargs):
            plan = self._plan
            if plan is None:  # a call outside an evaluation
                return forward(*args, **kwargs)
            batch, start, keys, replayed = plan
            if k < start:
                return replayed
            out = forward(*args, **kwargs)
            self.stats["blocks_run"] += 1
            self._outputs.put((batch, keys[k]), out)
            return out

        return run

    def _plan_for(self, batch: int, keys: list[tuple]) -> tuple:
        """The first block whose input is not stored (the longest known prefix) and that input."""
        start, replayed = 0, None
        for k in range(len(keys) - 1, -1, -1):
            out = self._outputs.get((batch, keys[k]))
            if out is not None:
                start, replayed = k + 1, out
                break
        for j in range(start - 1):  # keep the prefix's earlier entries alive as well
            self._outputs.get((batch, keys[j]))
        return batch, start, keys, replayed

    def set_widths(self, widths: dict[str, int]) -> None:
        """Give the working copy's layers the database weights of these widths."""
        for name, count in widths.items():
            if name not in self.db.entries:
                continue  # outside the search (an already removed module)
            if self.current.get(name) != count:
                self.adapter.set_weight(self.work, self.layers[name], self.db.weights(name, count))
                self.current[name] = count

    @torch.no_grad()
    def __call__(self, widths: dict[str, int]) -> float:
        self.set_widths(widths)
        keys = _prefix_keys([tuple(self.current.get(n) for n in names) for names in self._block_names])
        self.stats["evaluations"] += 1
        outs = []
        for i, ids in enumerate(self._batches()):
            self._plan = self._plan_for(i, keys)
            self.stats["blocks_total"] += len(keys)
            try:
                outs.append(self._forward(self.work, ids))
            finally:
                self._plan = None
        return self._mean_loss(outs)

    @torch.no_grad()
    def model_loss(self, model: nn.Module) -> float:
        """The same calibration loss for any model of the same vocabulary / hidden size (e.g. a
        delivered, physically sliced model after re-solving)."""
        was_training = model.training
        model.eval()
        try:
            return self._mean_loss([self._forward(model, ids) for ids in self._batches()])
        finally:
            model.train(was_training)

    def _mean_loss(self, outs) -> float:
        total, n = 0.0, 0
        for ids, ref, out in zip(self._batches(), self.reference, outs):
            if self.causal:
                total += float(torch.sum(kl_terms(ref, out.float())))  # one sum over tokens and vocabulary
                n += ref.shape[0] * ref.shape[1]
            else:
                total += float(((out.float() - ref) ** 2).sum() / (ref**2).sum()) * ids.shape[0]
                n += ids.shape[0]
        return total / n


def _no_cache_kwargs(model: nn.Module) -> dict:
    """``use_cache=False`` where the model's forward takes it: one forward needs no KV cache."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}
