"""The loss the allocation search minimises: the calibration loss of the stitched model.

SPDY scores every candidate allocation by the real loss of the model it describes, not by the
summed database errors (ZipLM paper, structured SPDY search). Building each candidate model
would be slow, so one working copy of the model is "stitched": each prunable layer's out
projection takes the OBS-updated weights of its chosen width from the database (removed columns
zero), which computes exactly what the sliced model computes.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ziplm_ext.adapters import get_adapter, has_lm_head
from ziplm_ext.eval.metrics import kl_terms
from ziplm_ext.stages.database import ObsDatabase

__all__ = ["StitchedLoss"]


class StitchedLoss:
    """Calibration loss of the model stitched from database widths, on cached inputs.

    Models with an LM head: mean token KL(dense ‖ stitched). Encoders: ‖h_s − h_d‖² / ‖h_d‖² of the
    last hidden states over real tokens. ``loss(widths)`` sets the widths (kept structures per layer
    name) and returns the loss.
    """

    def __init__(self, dense: nn.Module, db: ObsDatabase, input_ids: torch.Tensor, batch_size: int = 8,
                 reference: Optional[nn.Module] = None):
        # `dense` is the model the database was built on; `reference` (default: that model) gives
        # the target outputs, e.g. the dense teacher when pruning an already pruned model further.
        self.db = db
        self.adapter = get_adapter(dense)
        self.work = copy.deepcopy(dense).eval()
        self.layers = {l.name: l for l in self.adapter.prunable_layers(self.work)}
        self.ids = input_ids
        self.bs = batch_size
        self.causal = has_lm_head(dense)  # token logits: KL; else hidden states
        self.current: dict[str, int] = {}
        with torch.no_grad():
            self.reference = [self._forward(reference if reference is not None else dense, b)
                              for b in self._batches()]

    def _batches(self):
        return [self.ids[i:i + self.bs] for i in range(0, self.ids.shape[0], self.bs)]

    def _forward(self, model, ids):
        out = model(input_ids=ids)
        if self.causal:
            return torch.log_softmax(out.logits.float(), dim=-1)
        return out.last_hidden_state.float()

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
        total, n = 0.0, 0
        for ids, ref in zip(self._batches(), self.reference):
            out = self._forward(self.work, ids)
            if self.causal:
                total += float(torch.sum(kl_terms(ref, out)))  # one sum over tokens and vocabulary
                n += ref.shape[0] * ref.shape[1]
            else:
                total += float(((out - ref) ** 2).sum() / (ref**2).sum()) * ids.shape[0]
                n += ids.shape[0]
        return total / n
