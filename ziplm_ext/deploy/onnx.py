"""ONNX export of (pruned) BERT-family encoders, for ONNX Runtime.

ZipLM's models are only useful where they are deployed (ZipLM paper, section 3: speedups are
defined in the target inference environment); for BERT-family encoders that is ONNX Runtime.

What is exported is not Hugging Face's module itself but :class:`OnnxBert`, a small
re-implementation that *shares* the HF model's parameters and mirrors its eager forward pass
(post-LN BERT: embeddings, then per block ``LN(x + attn(x))`` and ``LN(h + ffn(h))``), with the
widths of each block fixed at construction:

* each attention block reshapes Q / K / V with its **own integer head count**
  (``view(batch, seq, heads_l, head_dim)``).  ONNX Runtime's transformer optimiser
  (``onnxruntime.transformers.optimizer``) reads that constant from the reshape to fuse the
  block into one ``Attention`` node; a ``-1`` there makes it skip the fusion;
* a fully removed attention (0 heads) or FFN (0 neurons) is exported as what the pruned model
  computes, ``LayerNorm(x + out_bias)`` (see :mod:`ziplm_ext.adapters.bert`): a residual path,
  never a reshape or matmul of an empty tensor;
* batch and sequence axes are dynamic (``input_ids``, ``attention_mask`` and ``token_type_ids``,
  all ``int64`` of shape ``(batch, sequence)``); the output is ``last_hidden_state``
  ``(batch, sequence, hidden)``, the sequence output of ``BertModel`` (sentence-transformers'
  MiniLM pools it).  Head models (``BertFor*``) export their encoder.

The graph is traced with PyTorch's TorchScript-based ONNX exporter (``dynamo=False``: deprecated
since PyTorch 2.9 but present in 2.13, and it needs no ``onnxscript``).  Its attention pattern
(MatMul/Add -> Reshape -> Transpose, Div by sqrt(head size), additive mask ``(1 - mask) * min``)
is the one the optimiser's BERT fusion recognises.  With
``optimize=True`` (default) the file written is the optimiser's output (fused ``Attention``,
``SkipLayerNormalization``, ``BiasGelu`` ... nodes of the ``com.microsoft`` domain; it runs in
ONNX Runtime only); ``optimize=False`` writes the plain standard-ONNX graph.

Needs the ``onnx`` extra (``pip install .[onnx]``: ``onnx`` and ``onnxruntime``).
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ziplm_ext.adapters import get_adapter
from ziplm_ext.adapters.base import UnsupportedArchitectureError
from ziplm_ext.adapters.bert import BiasLayerNorm
from ziplm_ext.io.fileio import atomic_write_bytes

__all__ = [
    "export_onnx",
    "export_bert_block",
    "bert_block",
    "onnx_session",
    "OnnxBert",
    "bert_widths",
    "require_onnx",
    "fused_attention_count",
    "DEFAULT_OPSET",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "EXTRA_HINT",
]

DEFAULT_OPSET = 17  # LayerNormalization is a standard op from opset 17 on
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("last_hidden_state",)
EXTRA_HINT = "needs the onnx extra: pip install .[onnx]"
_FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention")


def require_onnx():
    """``(onnx, onnxruntime)``, or an :class:`ImportError` naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"ONNX export / ONNX Runtime {EXTRA_HINT} ({e})") from e
    return onnx, onnxruntime


# --------------------------------------------------------------------------------------
# the exported re-implementation
# --------------------------------------------------------------------------------------


class _Residual(nn.Module):
    """A removed post-LN sub-layer: ``LayerNorm(x + out_bias)`` (what BERT computes with all the
    sub-layer's weights zero)."""

    def __init__(self, removed: BiasLayerNorm):
        super().__init__()
        self.bias, self.ln = removed.bias, removed.LayerNorm

    def forward(self, x, mask=None):
        return self.ln(x + self.bias)


class _Attention(nn.Module):
    """Post-LN multi-head self-attention ``LN(x + o(attention(q(x), k(x), v(x))))`` with a fixed
    (static) head count."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module, o: nn.Module, ln: nn.Module, heads: int,
                 head_dim: int):
        super().__init__()
        self.q, self.k, self.v, self.o, self.ln = q, k, v, o, ln
        self.heads, self.head_dim = int(heads), int(head_dim)
        self.scale = math.sqrt(head_dim)

    @classmethod
    def of_hf(cls, hf_attention, heads: int, head_dim: int) -> "_Attention":
        sa, out = hf_attention.self, hf_attention.output
        return cls(sa.query, sa.key, sa.value, out.dense, out.LayerNorm, heads, head_dim)

    def forward(self, x, mask):  # x (B, S, d), mask (B, 1, 1, S) additive
        b, s = x.shape[0], x.shape[1]
        h, hd = self.heads, self.head_dim
        q = self.q(x).view(b, s, h, hd).transpose(1, 2)  # (B, h, S, hd)
        k = self.k(x).view(b, s, h, hd).permute(0, 2, 3, 1)  # (B, h, hd, S)
        v = self.v(x).view(b, s, h, hd).transpose(1, 2)  # (B, h, S, hd)
        p = torch.softmax(torch.matmul(q, k) / self.scale + mask, dim=-1)  # (B, h, S, S)
        ctx = torch.matmul(p, v).transpose(1, 2).reshape(b, s, h * hd)  # (B, S, h*hd)
        return self.ln(self.o(ctx) + x)


class _FFN(nn.Module):
    """Post-LN feed-forward block ``LN(x + down(act(up(x))))``."""

    def __init__(self, up: nn.Module, act: nn.Module, down: nn.Module, ln: nn.Module):
        super().__init__()
        self.up, self.act, self.down, self.ln = up, act, down, ln

    @classmethod
    def of_hf(cls, layer) -> "_FFN":
        return cls(layer.intermediate.dense, layer.intermediate.intermediate_act_fn, layer.output.dense,
                   layer.output.LayerNorm)

    def forward(self, x, mask=None):
        return self.ln(self.down(self.act(self.up(x))) + x)


def additive_mask(attention_mask, dtype):
    """``(B, S)`` 0/1 mask -> ``(B, 1, 1, S)`` additive mask, 0 where kept and the dtype's minimum
    where masked (as HF BERT; the form ORT's attention fusion recognises)."""
    mask = attention_mask.unsqueeze(1).unsqueeze(2).to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


class _Embeddings(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.word, self.pos, self.token_type = emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings
        self.ln = emb.LayerNorm

    def forward(self, input_ids, token_type_ids):
        s = input_ids.shape[1]
        x = self.word(input_ids) + self.token_type(token_type_ids)
        return self.ln(x + self.pos.weight[:s].unsqueeze(0))


class OnnxBert(nn.Module):
    """``last_hidden_state`` of a (pruned) HF BERT encoder, with static per-block widths.

    Shares the parameters of `model` (a ``BertModel`` or ``BertFor*``); `heads[i]` is block i's
    kept head count (0: attention removed) and `ffn[i]` its kept FFN width (0: FFN removed), as
    :func:`bert_widths` reads them."""

    def __init__(self, model, heads: List[int], ffn: List[int]):
        super().__init__()
        base = model.base_model
        head_dim = int(model.config.hidden_size) // int(model.config.num_attention_heads)
        self.embeddings = _Embeddings(base.embeddings)
        blocks = []
        for layer, h, f in zip(base.encoder.layer, heads, ffn):
            attn = _Residual(layer.attention.output) if h == 0 else _Attention.of_hf(layer.attention, h, head_dim)
            blocks.append(nn.ModuleList([attn, _Residual(layer.output) if f == 0 else _FFN.of_hf(layer)]))
        self.blocks = nn.ModuleList(blocks)
        self.heads, self.ffn = list(heads), list(ffn)

    def forward(self, input_ids, attention_mask, token_type_ids):
        x = self.embeddings(input_ids, token_type_ids)
        mask = additive_mask(attention_mask, x.dtype)  # (B, 1, 1, S)
        for attn, ffn in self.blocks:
            x = ffn(attn(x, mask))
        return x


def bert_widths(model) -> tuple[List[int], List[int]]:
    """``(heads, ffn)``: per block the kept attention heads and FFN neurons of a HF BERT model
    (dense or pruned in place / loaded by :func:`ziplm_ext.io.export.load_pruned`), 0 for a
    removed module.  Raises ``ValueError`` for anything the ONNX exporter does not support."""
    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError as e:
        raise ValueError(f"ONNX export supports BERT-family encoders only: {e}") from None
    if adapter.family != "bert":
        raise ValueError(f"ONNX export supports BERT-family encoders only, got a {adapter.family} model "
                         f"({type(model).__name__})")
    cfg = model.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError("ONNX export supports BERT encoders only (config.is_decoder / add_cross_attention set)")
    pos = getattr(cfg, "position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        raise ValueError(f"ONNX export supports absolute position embeddings only, got {pos!r}")
    shapes = adapter.shapes(model)
    n = len(adapter.blocks(model))
    return ([int(shapes[f"blocks.{i}.attn"]) for i in range(n)], [int(shapes[f"blocks.{i}.ffn"]) for i in range(n)])


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------


def _dummy_inputs(vocab: int, batch: int = 2, seq: int = 7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(int(vocab), 1), (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -2:] = 0  # a padded row, so the mask path is traced as data, not folded away
    return ids, mask, torch.zeros(batch, seq, dtype=torch.long)


def trace_to_onnx(module: nn.Module, args: tuple, path: str, input_names, output_names, opset: int,
                  dynamic: Dict[str, Dict[int, str]]) -> None:
    """Trace `module` with PyTorch's TorchScript ONNX exporter into the file `path` (one file,
    no external data)."""
    import warnings

    with warnings.catch_warnings():  # the TorchScript exporter is deprecated in favour of dynamo
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, args, path, dynamo=False, opset_version=opset, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic, do_constant_folding=True)


def optimize_bert_onnx(path: str, out_path: str) -> Dict[str, int]:
    """Run ONNX Runtime's transformer optimiser (BERT fusions; head counts and hidden sizes read
    from each block's reshape) on `path`, write the result to `out_path`; returns the
    optimiser's fused-operator statistics."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    # the fusion warns that a pruned block's Q/K/V width (heads x head size) differs from the
    # hidden size; ORT's Attention op supports that (its weight is (hidden, 3 x heads x head size))
    # (the optimiser imports its fusion modules as top-level modules, hence the logger name)
    loggers = [logging.getLogger(n) for n in ("onnxruntime.transformers", "fusion_attention")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        opt = optimize_model(path, model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    opt.save_model_to_file(out_path)
    return dict(opt.get_fused_operator_statistics())


def fused_attention_count(onnx_model) -> int:
    """Fused ``Attention`` / ``MultiHeadAttention`` nodes in an ONNX model (a path or ModelProto)."""
    onnx, _ = require_onnx()
    m = onnx.load(str(onnx_model)) if isinstance(onnx_model, (str, os.PathLike)) else onnx_model
    return sum(1 for n in m.graph.node if n.op_type in _FUSED_ATTENTION_OPS)


def _exportable(model) -> nn.Module:
    """`model` itself when it is float32 on the CPU, else a float32 CPU copy."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is not None and (p.dtype != torch.float32 or p.device.type != "cpu"):
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    return model


def _trace_bert(model, heads: List[int], ffn: List[int], path: str, opset: int) -> None:
    """Trace :class:`OnnxBert` of `model` into `path` (the model's train / eval modes restored)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        mirror = OnnxBert(_exportable(model), heads, ffn).eval()  # shares (so switches) the model's modules
        dyn = {n: {0: "batch", 1: "sequence"} for n in (*INPUT_NAMES, *OUTPUT_NAMES)}
        with torch.no_grad():
            trace_to_onnx(mirror, _dummy_inputs(model.config.vocab_size), path, INPUT_NAMES, OUTPUT_NAMES, opset, dyn)
    finally:
        for m, training in modes:
            m.train(training)


def export_onnx(model, path, *, opset: int = DEFAULT_OPSET, optimize: bool = True) -> Path:
    """Write `model` (a HF BERT encoder, dense or pruned) as an ONNX file at `path`, atomically.

    Args:
        model: ``BertModel`` / ``BertFor*`` (e.g. from :func:`ziplm_ext.io.models.load_minilm` or
            :func:`ziplm_ext.io.export.load_pruned`); exported in float32 on the CPU.
        path: the ``.onnx`` file to write (its parent directory is created).
        opset: ONNX opset (>= 14).
        optimize: write ONNX Runtime's transformer-optimised graph (fused attention) instead of the
            plain one.

    Returns the path written.  Raises ``ValueError`` for an unsupported model or opset and
    ``ImportError`` (naming the ``onnx`` extra) when onnx / onnxruntime are not installed.
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 14:
        raise ValueError(f"opset must be an integer >= 14, got {opset!r}")
    heads, ffn = bert_widths(model)
    onnx, _ = require_onnx()
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give the .onnx file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".onnx-export-", dir=str(path.parent)) as tmp:
        raw, out = os.path.join(tmp, "raw.onnx"), os.path.join(tmp, "opt.onnx")
        _trace_bert(model, heads, ffn, raw, opset)
        if optimize:
            optimize_bert_onnx(raw, out)
        else:
            out = raw
        onnx.checker.check_model(out)
        with open(out, "rb") as f:
            atomic_write_bytes(path, f.read())
    return path


# --------------------------------------------------------------------------------------
# single blocks (what an engine times per width)
# --------------------------------------------------------------------------------------


class _BlockGraph(nn.Module):
    """A chain of post-LN blocks on their own: ``hidden_states`` ``(B, S, d)`` float32 (and, for
    attention, ``attention_mask`` ``(B, S)`` int64) -> ``(B, S, d)``."""

    def __init__(self, blocks: List[nn.Module], attention: bool):
        super().__init__()
        self.blocks, self.attention = nn.ModuleList(blocks), attention

    def forward(self, hidden_states, attention_mask=None):
        x = hidden_states
        mask = additive_mask(attention_mask, x.dtype) if self.attention else None
        for block in self.blocks:
            x = block(x, mask)
        return x


def bert_block(kind: str, width: int, hidden: int, head_dim: int, seed: int = 0, depth: int = 1) -> nn.Module:
    """`depth` BERT attention blocks with `width` heads of `head_dim` each (``kind="attn"``) or FFN
    blocks with `width` exact-GELU neurons (``kind="ffn"``), chained, each on its own random
    weights, as :class:`OnnxBert` exports them."""
    if kind not in ("attn", "ffn"):
        raise ValueError(f"block kind must be 'attn' or 'ffn', got {kind!r}")
    for name, v in (("width", width), ("depth", depth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"block {name} must be an integer >= 1, got {v!r}")
    g = torch.Generator().manual_seed(seed)

    def linear(n_in: int, n_out: int) -> nn.Linear:
        lin = nn.Linear(n_in, n_out)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in))
            lin.bias.copy_(torch.randn(n_out, generator=g) * 0.02)
        return lin

    def one() -> nn.Module:
        ln = nn.LayerNorm(hidden, eps=1e-12)
        if kind == "ffn":
            return _FFN(linear(hidden, width), nn.GELU(), linear(width, hidden), ln)
        w = width * head_dim
        return _Attention(linear(hidden, w), linear(hidden, w), linear(hidden, w), linear(w, hidden), ln, width,
                          head_dim)

    return _BlockGraph([one() for _ in range(depth)], kind == "attn").eval()


def export_bert_block(kind: str, width: int, hidden: int, head_dim: int, path, *, seed: int = 0, depth: int = 1,
                      opset: int = DEFAULT_OPSET, optimize: bool = True) -> Path:
    """Write :func:`bert_block` as an ONNX file at `path` (dynamic batch and sequence axes;
    optimised like :func:`export_onnx`, so each attention block is one fused ``Attention`` node)."""
    require_onnx()
    module = bert_block(kind, width, hidden, head_dim, seed, depth)
    names = ("hidden_states", "attention_mask") if kind == "attn" else ("hidden_states",)
    args = (torch.zeros(2, 7, hidden), torch.ones(2, 7, dtype=torch.long))[: len(names)]
    dyn = {n: {0: "batch", 1: "sequence"} for n in (*names, "output")}
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=".onnx-block-", dir=str(path.parent)) as tmp:
        raw, out = os.path.join(tmp, "raw.onnx"), os.path.join(tmp, "opt.onnx")
        with torch.no_grad():
            trace_to_onnx(module, args, raw, names, ("output",), opset, dyn)
        if optimize:
            optimize_bert_onnx(raw, out)
        else:
            out = raw
        with open(out, "rb") as f:
            atomic_write_bytes(path, f.read())
    return path


def onnx_session(path, threads: Optional[int] = None):
    """An ONNX Runtime CPU ``InferenceSession`` of `path` with `threads` intra-op threads
    (``None``: ONNX Runtime's default), one inter-op thread, sequential execution and all graph
    optimisations."""
    _, ort = require_onnx()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 0 if threads is None else int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
