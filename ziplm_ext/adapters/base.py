"""Architecture-adapter interface and shared helpers for physical structured pruning.

An :class:`Adapter` is the only place that knows how a Hugging Face model family
lays out its transformer blocks.  ZipLM prunes two layers per block:

* ``"attn"``: the attention output projection; one *structure* is one head (or, for
  grouped-query attention, one key/value group with all query heads sharing it), i.e.
  ``group_size`` consecutive *input* columns of the output projection.  Removing a
  structure also removes the matching Q/K/V output rows upstream.
* ``"ffn"``: the FFN down projection; one structure is one intermediate neuron (one
  input column), and the matching up-projection rows are removed upstream.

Removing every structure of a layer removes the whole module; it is replaced by a tiny
module (subclass of :class:`RemovedModule`) that computes *exactly* what the dense
module computes when all its structures' weights are zero (i.e. the out-projection bias,
or zeros if there is none), without any zero-sized matmul.

Conventions shared by all adapters:

* ``model.config`` always describes the *dense* model; it is never modified by
  :meth:`Adapter.slice`.  :meth:`Adapter.prunable_layers` therefore reports the dense
  structure counts, while :meth:`Adapter.shapes` reports the current (kept) counts.
* ``keep`` indices passed to :meth:`Adapter.slice` index the *current* structures of the
  layer, so slicing can be applied repeatedly.
* Slicing mutates the existing ``nn.Linear`` / ``Conv1D`` modules in place (new
  ``nn.Parameter`` objects, same module objects), so forward hooks registered on an
  out projection survive a slice.  dtype and device of every tensor are preserved; it
  also works on the ``meta`` device.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

__all__ = [
    "PrunableLayer",
    "Adapter",
    "UnsupportedArchitectureError",
    "RemovedModule",
    "ConstantOutput",
    "cache_kwargs",
    "cache_keyword",
    "output_cache",
    "find_kv_cache",
]


class UnsupportedArchitectureError(ValueError):
    """Raised when no adapter supports a model."""


@dataclass(frozen=True)
class PrunableLayer:
    block: int  # transformer block index
    kind: str  # "attn" or "ffn"
    num_structures: int  # heads (or KV groups) / FFN neurons in the DENSE model
    group_size: int  # input columns of the out projection per structure
    name: str  # e.g. "blocks.3.attn"


def layer_name(block: int, kind: str) -> str:
    return f"blocks.{block}.{kind}"


_NAME_RE = re.compile(r"^blocks\.(\d+)\.(attn|ffn)$")


def parse_layer_name(name: str) -> tuple[int, str]:
    m = _NAME_RE.match(name)
    if m is None:
        raise ValueError(f"invalid prunable layer name {name!r} (expected 'blocks.<i>.attn' or 'blocks.<i>.ffn')")
    return int(m.group(1)), m.group(2)


# --------------------------------------------------------------------------------------
# replacement modules for fully removed attention / FFN modules
# --------------------------------------------------------------------------------------


class RemovedModule(nn.Module):
    """Marker base class: a module that replaced a fully pruned attention / FFN module.

    ``out_features`` is the hidden size the removed out projection produced, so that
    :meth:`Adapter.get_weight` can return an ``(out_features, 0)`` weight.
    """

    out_features: int = 0

    def _extra_repr_base(self) -> str:
        return f"out_features={self.out_features}, removed=True"


# The keyword under which HF passes the KV cache has changed across transformers releases
# (``past_key_values`` in older 5.x releases, e.g. 5.0; ``cache`` in newer ones, e.g. 5.24).
# Replacement modules therefore find the cache among their call arguments by *type*
# (:func:`find_kv_cache`), and callers of a model use :func:`cache_kwargs` /
# :func:`output_cache`, which ask the model / output object itself.
_CACHE_KEYWORDS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _cache_base_class():
    try:
        from transformers.cache_utils import Cache
    except Exception:  # pragma: no cover - transformers is a dependency of every adapter
        return None
    return Cache


def find_kv_cache(args: Sequence = (), kwargs: dict | None = None):
    """The HF KV cache (a ``transformers.cache_utils.Cache``) among a module call's arguments.

    Looked up by type, not by keyword, so a replacement module keeps working whatever name
    (``cache``, ``past_key_values``, ...) or position the calling decoder layer uses for it.
    Returns ``None`` when the call carries no cache.
    """
    base = _cache_base_class()
    if base is None:  # pragma: no cover
        return None
    for value in (*(kwargs or {}).values(), *args):
        if isinstance(value, base):
            return value
    return None


def touch_kv_cache(cache, layer_idx: int | None, hidden_states: torch.Tensor) -> None:
    """Keep a HF KV cache consistent when an attention module was removed.

    HF caches infer the number of already-processed tokens (position ids, causal-mask sizes)
    from the stored keys of one layer (layer 0, or the first full-attention layer), and
    ``DynamicLayer.get_seq_length`` returns 0 for an empty layer.  A removed attention
    module therefore appends a dummy ``(batch, 1, seq, 1)`` zero tensor (one scalar per
    token, negligible memory) to its own layer, so that every layer of the cache has the
    right length, whichever layer the model asks.  Nothing is done without a cache.
    """
    if cache is None or layer_idx is None or not hasattr(cache, "update"):
        return
    cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache: self-attention part
    b, s = hidden_states.shape[0], hidden_states.shape[1]
    dummy = hidden_states.new_zeros((b, 1, s, 1))
    cache.update(dummy, dummy, layer_idx)


def cache_keyword(model) -> str:
    """The keyword under which ``model(...)`` takes a KV cache: ``"cache"`` where the installed
    transformers has it for this model, else ``"past_key_values"``.

    Read from the model's ``forward`` signature (so a family that still takes
    ``past_key_values`` gets it); when the signature names neither (a generic wrapper), the
    installed transformers' own output classes decide.
    """
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    for name in _CACHE_KEYWORDS:
        if name in params:
            return name
    try:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    except Exception:  # pragma: no cover
        fields = {}
    return "cache" if "cache" in fields else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` to pass a KV cache to ``model(...)``: ``model(ids, **cache_kwargs(model, c))``.

    Compute it once outside hot loops (it inspects the ``forward`` signature).
    """
    return {cache_keyword(model): cache}


def output_cache(out):
    """The KV cache returned in a HF model output (``out.cache``, or ``out.past_key_values`` on
    releases before the rename), ``None`` if there is none."""
    fields = getattr(out, "__dataclass_fields__", None) or {}
    for name in _CACHE_KEYWORDS:
        if name in fields:
            return getattr(out, name, None)
    return None


class ConstantOutput(RemovedModule):
    """Replacement for a removed residual-branch module (pre-LN GPT-2 / LLaMA style).

    With all structure weights zeroed, the dense module outputs exactly its out-projection
    bias (or zeros when the projection has no bias) for every token; this module returns
    that constant broadcast (zero-stride ``expand``) to ``hidden_states``' shape.

    Args:
        out_features: hidden size.
        bias: the out-projection bias (stored as parameter ``bias``) or ``None``.
        dropout: dropout applied to the output in training mode (as the dense module did).
        returns_tuple: return ``(output, None)`` like HF attention modules.
        touches_cache: append dummy entries to the KV cache passed to the call, under any
            keyword or position (see :func:`find_kv_cache`, :func:`touch_kv_cache`).
        layer_idx: the block index used for the cache.
    """

    def __init__(
        self,
        out_features: int,
        bias: torch.Tensor | None,
        *,
        dropout: float = 0.0,
        returns_tuple: bool = False,
        touches_cache: bool = False,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.out_features = int(out_features)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        self.dropout = nn.Dropout(dropout)
        self.returns_tuple = returns_tuple
        self.touches_cache = touches_cache
        self.layer_idx = layer_idx

    def forward(self, hidden_states=None, *args, **kwargs):
        if self.touches_cache:
            touch_kv_cache(find_kv_cache(args, kwargs), self.layer_idx, hidden_states)
        if self.bias is not None:
            out = self.bias.to(hidden_states.dtype).expand(*hidden_states.shape[:-1], self.out_features)
        else:
            out = hidden_states.new_zeros(()).expand(*hidden_states.shape[:-1], self.out_features)
        out = self.dropout(out)
        return (out, None) if self.returns_tuple else out

    def extra_repr(self) -> str:
        return self._extra_repr_base() + f", bias={self.bias is not None}"


# --------------------------------------------------------------------------------------
# in-place slicing helpers (nn.Linear: weight (out, in); HF Conv1D: weight (in, out))
# --------------------------------------------------------------------------------------


def _index(idx: Sequence[int] | torch.Tensor, device) -> torch.Tensor:
    return torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long, device=device)


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def is_conv1d(module: nn.Module) -> bool:
    # HF Conv1D (transformers.pytorch_utils.Conv1D): weight (nx, nf), attributes nf / nx
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


@torch.no_grad()
def _slice_features(module: nn.Module, idx, outputs: bool) -> None:
    # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out) with nf = out, nx = in.
    w = module.weight
    i = _index(idx, w.device)
    dim = int(outputs) if is_conv1d(module) else int(not outputs)
    _set_param(module, "weight", w.index_select(dim, i))
    attr = ("nf" if outputs else "nx") if is_conv1d(module) else ("out_features" if outputs else "in_features")
    setattr(module, attr, int(i.numel()))
    if outputs and getattr(module, "bias", None) is not None:
        _set_param(module, "bias", module.bias.index_select(0, i))


def slice_outputs(module: nn.Module, idx) -> None:
    """Keep only output features ``idx`` of a Linear / Conv1D (in place)."""
    _slice_features(module, idx, outputs=True)


def slice_inputs(module: nn.Module, idx) -> None:
    """Keep only input features ``idx`` of a Linear / Conv1D (in place; bias unchanged)."""
    _slice_features(module, idx, outputs=False)


def expand_groups(keep: Sequence[int], group: int, offset: int = 0) -> list[int]:
    """Column indices of structures ``keep`` when each spans ``group`` consecutive columns."""
    return [offset + k * group + j for k in keep for j in range(group)]


def out_features_of(module: nn.Module) -> int:
    if isinstance(module, RemovedModule):
        return module.out_features
    if is_conv1d(module):
        return int(module.nf)
    return int(module.out_features)


def in_features_of(module: nn.Module) -> int:
    if isinstance(module, RemovedModule):
        return 0
    if is_conv1d(module):
        return int(module.nx)
    return int(module.in_features)


# --------------------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------------------


class Adapter:
    """Base class of the per-family adapters.

    Subclasses implement :meth:`matches`, :meth:`blocks`, :meth:`_dense_counts`,
    :meth:`_out_proj_of`, :meth:`_slice_attn`, :meth:`_slice_ffn`, :meth:`_remove_attn`,
    :meth:`_remove_ffn` and :meth:`hf_config_for_shapes`; everything else is generic.
    """

    family: str = ""

    # ---- family hooks ---------------------------------------------------------------
    @staticmethod
    def matches(model) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def blocks(self, model) -> list[nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _dense_counts(self, config) -> tuple[int, int, int]:
        """``(attn structures, attn group_size, ffn neurons)`` of the dense model."""
        raise NotImplementedError

    def _out_proj_of(self, block: nn.Module, kind: str) -> nn.Module:
        raise NotImplementedError

    def _slice_attn(self, model, block: nn.Module, keep: list[int], group_size: int) -> None:
        raise NotImplementedError

    def _slice_ffn(self, model, block: nn.Module, keep: list[int]) -> None:
        raise NotImplementedError

    def _remove_attn(self, model, block: nn.Module, block_idx: int) -> None:
        raise NotImplementedError

    def _remove_ffn(self, model, block: nn.Module, block_idx: int) -> None:
        raise NotImplementedError

    def hf_config_for_shapes(self, config, shapes: dict[str, int]) -> tuple[dict | None, str]:
        """Config dict under which plain ``from_pretrained`` rebuilds the pruned shapes.

        Returns ``(config_dict, "")`` or ``(None, reason)`` when HF configs cannot express
        the pruned model.
        """
        return None, f"{self.family}: no HF-loadable config export implemented"

    # ---- generic interface ----------------------------------------------------------
    def prunable_layers(self, model) -> list[PrunableLayer]:
        n_attn, gsize, n_ffn = self._dense_counts(model.config)
        out = []
        for b in range(len(self.blocks(model))):
            out.append(PrunableLayer(b, "attn", n_attn, gsize, layer_name(b, "attn")))
            out.append(PrunableLayer(b, "ffn", n_ffn, 1, layer_name(b, "ffn")))
        return out

    def layer(self, model, name: str) -> PrunableLayer:
        """The :class:`PrunableLayer` with this name."""
        b, kind = parse_layer_name(name)
        n_attn, gsize, n_ffn = self._dense_counts(model.config)
        if b >= len(self.blocks(model)):
            raise ValueError(f"{name}: model has only {len(self.blocks(model))} blocks")
        if kind == "attn":
            return PrunableLayer(b, kind, n_attn, gsize, name)
        return PrunableLayer(b, kind, n_ffn, 1, name)

    def _block(self, model, layer: PrunableLayer) -> nn.Module:
        if layer.kind not in ("attn", "ffn"):
            raise ValueError(f"unknown layer kind {layer.kind!r}")
        return self.blocks(model)[layer.block]

    def out_proj(self, model, layer: PrunableLayer) -> nn.Module:
        """Live out-projection module of the current model (a :class:`RemovedModule` if removed)."""
        return self._out_proj_of(self._block(model, layer), layer.kind)

    def is_removed(self, model, layer: PrunableLayer) -> bool:
        return isinstance(self.out_proj(model, layer), RemovedModule)

    def current_count(self, model, layer: PrunableLayer) -> int:
        mod = self.out_proj(model, layer)
        n_in = in_features_of(mod)
        gs = layer.group_size if layer.kind == "attn" else 1
        if n_in % gs:
            raise RuntimeError(f"{layer.name}: {n_in} input columns is not a multiple of group size {gs}")
        return n_in // gs

    def shapes(self, model) -> dict[str, int]:
        return {l.name: self.current_count(model, l) for l in self.prunable_layers(model)}

    @torch.no_grad()
    def get_weight(self, model, layer: PrunableLayer) -> torch.Tensor:
        """Copy of the out-projection weight as ``(out_features, in_features)``.

        float32 / float64 weights keep their dtype; lower-precision floats are upcast to
        float32.  A removed layer gives an ``(out_features, 0)`` tensor.
        """
        mod = self.out_proj(model, layer)
        if isinstance(mod, RemovedModule):
            ref = mod.bias if getattr(mod, "bias", None) is not None else next(iter(model.parameters()))
            dt = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
            return torch.empty((mod.out_features, 0), dtype=dt, device=ref.device)
        w = mod.weight.detach()
        if is_conv1d(mod):
            w = w.t()
        dt = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        return w.to(dtype=dt, copy=True).contiguous()

    @torch.no_grad()
    def set_weight(self, model, layer: PrunableLayer, W: torch.Tensor) -> None:
        """Write an ``(out_features, in_features)`` weight back (dtype/device of the module kept)."""
        mod = self.out_proj(model, layer)
        if isinstance(mod, RemovedModule):
            if tuple(W.shape) != (mod.out_features, 0):
                raise ValueError(f"{layer.name} is removed; expected a ({mod.out_features}, 0) weight, got {tuple(W.shape)}")
            return
        w = mod.weight
        expected = (w.shape[1], w.shape[0]) if is_conv1d(mod) else tuple(w.shape)
        if tuple(W.shape) != tuple(expected):
            raise ValueError(f"{layer.name}: expected weight of shape {tuple(expected)}, got {tuple(W.shape)}")
        src = W.t() if is_conv1d(mod) else W
        w.copy_(src.to(device=w.device, dtype=w.dtype))

    def slice(self, model, layer: PrunableLayer, keep: Sequence[int]) -> None:
        """Physically keep only structures ``keep`` (sorted indices into the current ones).

        ``keep=[]`` removes the whole attention / FFN module.
        """
        block = self._block(model, layer)
        n_cur = self.current_count(model, layer)
        keep = [int(k) for k in (keep.tolist() if isinstance(keep, torch.Tensor) else keep)]
        if any(b <= a for a, b in zip(keep, keep[1:])):
            raise ValueError(f"{layer.name}: keep indices must be strictly increasing, got {keep}")
        if keep and (keep[0] < 0 or keep[-1] >= n_cur):
            raise ValueError(f"{layer.name}: keep indices must lie in [0, {n_cur}), got {keep}")
        if len(keep) == n_cur:
            return  # keep everything (also: removing an already removed module)
        if not keep:
            if layer.kind == "attn":
                self._remove_attn(model, block, layer.block)
            else:
                self._remove_ffn(model, block, layer.block)
            block.train(block.training)  # new replacement modules inherit the train/eval mode
            return
        if layer.kind == "attn":
            self._slice_attn(model, block, keep, layer.group_size)
        else:
            self._slice_ffn(model, block, keep)
