"""GGUF export of LLaMA-family decoders, dense or ZipLM-pruned, for llama.cpp.

ZipLM's models keep a different number of KV groups and FFN neurons in every block, and remove
whole attention / FFN modules at high compression (ZipLM paper, section 3).  The plain ``llama``
architecture of GGUF has one head count and one FFN width per model; llama.cpp's ``deci``
architecture (DeciLM / Nemotron-NAS) reads them per block from the arrays
``deci.attention.head_count``, ``deci.attention.head_count_kv`` and ``deci.feed_forward_length``,
and its tensors may have different shapes in every block.  :func:`export_gguf` writes that.

How every pruned shape is expressed exactly (GGUF spec and llama.cpp's ``deci`` graph):

* kept KV groups ``g`` of a block: ``head_count_kv = g``, ``head_count = g * n_rep``; whole heads
  are kept, so query heads stay a multiple of KV heads;
* the head size is not derived from ``hidden / heads``: ``deci.attention.key_length``,
  ``deci.attention.value_length`` and ``deci.rope.dimension_count`` are written explicitly;
* a removed attention is ``head_count = 0`` (the block then skips its attention norm too) --
  except in block 0, from which llama.cpp takes the head size: there it is one KV group of one
  head whose Q, K, V and output weights are all zero, so its contribution is exactly zero;
* a removed FFN is ``feed_forward_length = 0`` -- except where the block still has attention (or
  is the last block): llama.cpp's ``deci`` graph skips the whole residual update of a block with
  an empty FFN, which would drop the attention output, so such a block gets a one-neuron FFN
  whose down projection is zero (exactly zero contribution);
* Q and K rows are stored in llama.cpp's rotary layout: within each head the two rotary halves
  are interleaved, as llama.cpp's own HF converter permutes them; the permutation works inside a
  head, so heads sliced by ZipLM stay whole.

Tokenizer metadata: the ``tokenizer.*`` keys of a GGUF file are copied verbatim (the built-in
SmolLM2 is loaded from one; pass that tokenizer, or the file's path).  Another Hugging Face
byte-level BPE tokenizer is converted as llama.cpp's converter does for GPT-2-style vocabularies
(with the ``default`` pre-tokenizer).  Without a tokenizer a placeholder vocabulary
(``tokenizer.ggml.model = "none"`` and ``deci.vocab_size``) lets llama.cpp run token ids but not
text.

Weights are written as F32 or F16 (matrices; norms stay F32, as llama.cpp's converter does).
``quant="q8_0" | "q4_k_m"`` writes an F32 file first and quantises it with llama.cpp's own
quantiser (``llama_model_quantize``); rows whose length is not a multiple of the quantisation
block (32 for Q8_0, 256 for K-quants) fall back to a wider type there.  Files are written to a
temporary file next to the target and renamed into place.

Needs the ``llamacpp`` extra (``pip install .[llamacpp]``: ``gguf`` and ``llama-cpp-python``).
"""
from __future__ import annotations

import ctypes
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ziplm_ext.io.fileio import atomic_path

__all__ = [
    "export_gguf",
    "DeciBlock",
    "DeciModel",
    "deci_from_llama",
    "check_llama",
    "complete_blocks",
    "write_deci_gguf",
    "tokenizer_fields",
    "hf_tokenizer_fields",
    "quantize_gguf",
    "require_gguf",
    "require_llama_cpp",
    "quiet_llama_cpp",
    "ARCH",
    "DTYPES",
    "QUANTS",
    "EXTRA_HINT",
]

ARCH = "deci"
DTYPES = ("f32", "f16")
QUANTS = ("q8_0", "q4_k_m")
EXTRA_HINT = "needs the llamacpp extra: pip install .[llamacpp]"
_QUANT_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
_ATTN_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")
_FFN_TENSORS = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def require_gguf():
    """The ``gguf`` package, or an :class:`ImportError` naming the extra to install."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"GGUF export {EXTRA_HINT} ({e})") from e
    return gguf


def require_llama_cpp():
    """The ``llama_cpp`` package (llama-cpp-python), quiet, or an :class:`ImportError` naming the extra."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"llama.cpp {EXTRA_HINT} ({e})") from e
    quiet_llama_cpp()
    return llama_cpp


def quiet_llama_cpp() -> None:
    """Only errors from llama.cpp's log (llama-cpp-python routes it through its logger)."""
    import logging

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------
# the model to write: per-block widths and tensors
# --------------------------------------------------------------------------------------


@dataclass
class DeciBlock:
    """One block: head counts, FFN width and its tensors, keyed by GGUF tensor name without the
    ``blk.{i}.`` prefix (``attn_q``, ``ffn_down``, ...), each ``(out, in)`` like ``nn.Linear``."""

    n_head: int
    n_head_kv: int
    n_ff: int
    tensors: Dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class DeciModel:
    """What :func:`write_deci_gguf` writes (the workarounds of the module docstring already applied
    by :func:`complete_blocks`)."""

    hidden: int
    head_dim: int
    context_length: int
    rms_eps: float
    rope_theta: float
    token_embd: np.ndarray  # (vocab, hidden)
    output_norm: np.ndarray  # (hidden,)
    output: Optional[np.ndarray]  # (vocab, hidden); None: tied to token_embd
    blocks: List[DeciBlock]
    rope_linear_factor: Optional[float] = None
    name: str = "ziplm"

    @property
    def vocab_size(self) -> int:
        return int(self.token_embd.shape[0])


def complete_blocks(blocks: List[DeciBlock], hidden: int, head_dim: int) -> List[DeciBlock]:
    """Apply llama.cpp's two requirements (module docstring): block 0 has attention (one head, all
    weights zero), and a block with attention (or the last block) has a non-empty FFN (one neuron
    with a zero down projection).  Tensors of modules that end up absent are dropped."""
    f32 = np.float32
    for i, b in enumerate(blocks):
        if i == 0 and b.n_head == 0:
            b.n_head, b.n_head_kv = 1, 1
            b.tensors.setdefault("attn_norm", np.ones(hidden, f32))
            for k in ("attn_q", "attn_k", "attn_v"):
                b.tensors[k] = np.zeros((head_dim, hidden), f32)
            b.tensors["attn_output"] = np.zeros((hidden, head_dim), f32)
        if b.n_ff == 0 and (b.n_head > 0 or i == len(blocks) - 1):
            b.n_ff = 1
            b.tensors.setdefault("ffn_norm", np.ones(hidden, f32))
            b.tensors["ffn_gate"] = np.zeros((1, hidden), f32)
            b.tensors["ffn_up"] = np.zeros((1, hidden), f32)
            b.tensors["ffn_down"] = np.zeros((hidden, 1), f32)
        if b.n_head == 0:
            for k in _ATTN_TENSORS:
                b.tensors.pop(k, None)
        if b.n_ff == 0:
            for k in _FFN_TENSORS:
                b.tensors.pop(k, None)
    return blocks


# --------------------------------------------------------------------------------------
# from a (pruned) HF LLaMA model
# --------------------------------------------------------------------------------------


def rotary_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout (two halves per head) to llama.cpp's (pairs interleaved), per head, as the
    converter shipped with llama.cpp does for Q and K: ``(n_head, 2, hd/2, in) -> (n_head, hd/2, 2, in)``."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def check_llama(model) -> None:
    """A LlamaForCausalLM whose modules are plain linear layers without biases, else ValueError."""
    from torch import nn

    from ziplm_ext.adapters import UnsupportedArchitectureError, get_adapter

    try:
        family = get_adapter(model).family
    except UnsupportedArchitectureError:
        family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    cfg = model.config
    if family != "llama" or getattr(cfg, "model_type", None) != "llama":
        raise ValueError(f"GGUF export supports LLaMA-family decoders (model_type 'llama'); got "
                         f"{type(model).__name__} (model_type={getattr(cfg, 'model_type', None)!r}); "
                         "BERT-family encoders export to ONNX (format 'onnx')")
    if model.get_output_embeddings() is None:
        raise ValueError(f"GGUF export needs a causal LM with its head (LlamaForCausalLM), got {type(model).__name__}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("GGUF export: LLaMA models with attention / MLP biases are not supported")
    for name, m in model.named_modules():
        if name.endswith(("_proj",)) and not isinstance(m, nn.Linear):
            raise ValueError(f"GGUF export: {name} is a {type(m).__name__}, not a plain linear layer "
                             "(FLOP low-rank models cannot be written as GGUF)")


def _rope(cfg) -> Tuple[float, Optional[float]]:
    """(rope theta, linear scaling factor or None) from a LLaMA config; other scalings: ValueError."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, float(params["factor"])
    raise ValueError(f"GGUF export: rope scaling {kind!r} is not supported (only default and linear)")


def _llama_block(blk, head_dim: int) -> DeciBlock:
    from ziplm_ext.adapters import RemovedModule

    b = DeciBlock(0, 0, 0)
    attn, mlp = blk.self_attn, blk.mlp
    if not isinstance(attn, RemovedModule):
        b.n_head = attn.q_proj.out_features // head_dim
        b.n_head_kv = attn.k_proj.out_features // head_dim
        b.tensors.update(
            attn_norm=_np(blk.input_layernorm.weight),
            attn_q=rotary_permute(_np(attn.q_proj.weight), b.n_head),
            attn_k=rotary_permute(_np(attn.k_proj.weight), b.n_head_kv),
            attn_v=_np(attn.v_proj.weight), attn_output=_np(attn.o_proj.weight))
    else:  # kept only in case complete_blocks needs the norm (block 0)
        b.tensors["attn_norm"] = _np(blk.input_layernorm.weight)
    if not isinstance(mlp, RemovedModule):
        b.n_ff = mlp.gate_proj.out_features
        b.tensors.update(ffn_gate=_np(mlp.gate_proj.weight), ffn_up=_np(mlp.up_proj.weight),
                         ffn_down=_np(mlp.down_proj.weight))
    b.tensors["ffn_norm"] = _np(blk.post_attention_layernorm.weight)
    return b


def _is_tied(model) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()


def deci_from_llama(model) -> DeciModel:
    """The :class:`DeciModel` of a dense or pruned LLaMA causal LM (weights as float32 numpy)."""
    check_llama(model)
    cfg = model.config
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    theta, linear = _rope(cfg)
    base = model.base_model
    blocks = complete_blocks([_llama_block(b, head_dim) for b in base.layers], cfg.hidden_size, head_dim)
    return DeciModel(
        hidden=int(cfg.hidden_size), head_dim=head_dim,
        context_length=int(getattr(cfg, "max_position_embeddings", 2048) or 2048),
        rms_eps=float(cfg.rms_norm_eps), rope_theta=theta, rope_linear_factor=linear,
        token_embd=_np(base.embed_tokens.weight), output_norm=_np(base.norm.weight),
        output=None if _is_tied(model) else _np(model.get_output_embeddings().weight),
        blocks=blocks, name=str(getattr(cfg, "_name_or_path", "") or "ziplm").rsplit("/", 1)[-1] or "ziplm")


# --------------------------------------------------------------------------------------
# tokenizer metadata
# --------------------------------------------------------------------------------------

Field = Tuple[str, Any, Any, Any]  # (key, value, GGUFValueType, array sub-type or None)


def _gguf_file_of(obj) -> Optional[Path]:
    """The GGUF file a tokenizer argument points to: a ``.gguf`` path, a directory holding exactly
    one, or a HF tokenizer loaded from such a directory (``name_or_path``)."""
    p = obj if isinstance(obj, (str, os.PathLike)) else getattr(obj, "name_or_path", None)
    if not p:
        return None
    p = Path(p)
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def _fields_from_gguf(path: Path) -> List[Field]:
    gguf = require_gguf()
    reader = gguf.GGUFReader(str(path))
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, f.contents(), vtype, sub))
    if not any(k == "tokenizer.ggml.model" for k, *_ in out):
        raise ValueError(f"{path} has no tokenizer metadata (tokenizer.ggml.model)")
    return out


def hf_tokenizer_fields(tok, vocab_size: int) -> List[Field]:
    """GGUF ``gpt2`` tokenizer keys of a HF byte-level BPE tokenizer (tokens in id order, their types,
    the merges, special ids), as llama.cpp's converter writes them; pre-tokenizer ``"default"``."""
    import json

    gguf = require_gguf()
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError(f"GGUF export: only byte-level BPE tokenizers convert from Hugging Face (got "
                         f"{type(tok).__name__}, model {model.get('type')!r}); pass the path of a .gguf file "
                         "with the tokenizer, or tokenizer=None")
    n = len(tok)
    if n > vocab_size:
        raise ValueError(f"GGUF export: the tokenizer has {n} tokens but the model's embedding has {vocab_size} rows")
    added = dict(getattr(tok, "added_tokens_decoder", {}) or {})
    T = gguf.TokenType
    types = [int(T.UNUSED if i >= n else T.NORMAL if i not in added else
                 T.CONTROL if getattr(added[i], "special", True) else T.USER_DEFINED) for i in range(vocab_size)]
    V = gguf.GGUFValueType
    fields: List[Field] = [
        ("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", "default", V.STRING, None),
        ("tokenizer.ggml.tokens", tok.convert_ids_to_tokens(list(range(n))) + [f"[PAD{i}]" for i in range(n, vocab_size)],
         V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
         V.ARRAY, V.STRING)]
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        if isinstance(getattr(tok, attr, None), int):
            fields.append((f"tokenizer.ggml.{key}_token_id", int(getattr(tok, attr)), V.UINT32, None))
    fields.append(("tokenizer.ggml.add_bos_token", bool(getattr(tok, "add_bos_token", False)), V.BOOL, None))
    if isinstance(getattr(tok, "chat_template", None), str):
        fields.append(("tokenizer.chat_template", tok.chat_template, V.STRING, None))
    return fields


def tokenizer_fields(tokenizer, vocab_size: int) -> List[Field]:
    """The ``tokenizer.*`` GGUF keys for `tokenizer` (see the module docstring): None gives the
    placeholder vocabulary; a GGUF file, a directory with one, or a HF tokenizer loaded from one
    gives that file's keys, which must list exactly `vocab_size` tokens; another HF byte-level BPE
    tokenizer is converted (:func:`hf_tokenizer_fields`)."""
    gguf = require_gguf()
    if tokenizer is None:
        return [("tokenizer.ggml.model", "none", gguf.GGUFValueType.STRING, None)]
    path = _gguf_file_of(tokenizer)
    if path is None and not isinstance(tokenizer, (str, os.PathLike)):
        return hf_tokenizer_fields(tokenizer, vocab_size)
    if path is None:
        raise ValueError(f"GGUF export: tokenizer {str(tokenizer)!r} is neither a .gguf file nor a directory "
                         "holding exactly one; pass a HF tokenizer, a .gguf path, or None")
    fields = _fields_from_gguf(path)
    tokens = next((v for k, v, *_ in fields if k == "tokenizer.ggml.tokens"), None)
    if tokens is not None and len(tokens) != vocab_size:
        raise ValueError(f"GGUF export: the tokenizer of {path} has {len(tokens)} tokens but the model's "
                         f"embedding has {vocab_size} rows")
    return fields


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------


def _write_metadata(w, m: DeciModel, ftype: int, fields: Sequence[Field]) -> None:
    gguf = require_gguf()
    w.add_name(m.name)
    w.add_context_length(m.context_length)
    w.add_embedding_length(m.hidden)
    w.add_block_count(len(m.blocks))
    # per-block widths as Python ints (the writer types arrays from the values)
    w.add_feed_forward_length([int(b.n_ff) for b in m.blocks])
    w.add_head_count([int(b.n_head) for b in m.blocks])
    w.add_head_count_kv([int(b.n_head_kv) for b in m.blocks])
    w.add_key_length(m.head_dim)
    w.add_value_length(m.head_dim)
    w.add_rope_dimension_count(m.head_dim)
    w.add_rope_freq_base(m.rope_theta)
    if m.rope_linear_factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(m.rope_linear_factor)
    w.add_layer_norm_rms_eps(m.rms_eps)
    w.add_vocab_size(m.vocab_size)
    w.add_file_type(ftype)
    for key, val, vtype, sub in fields:
        w.add_key_value(key, val, vtype, sub)


def _tensors(m: DeciModel) -> Iterator[Tuple[str, np.ndarray]]:
    yield "token_embd.weight", m.token_embd
    yield "output_norm.weight", m.output_norm
    if m.output is not None:
        yield "output.weight", m.output
    for i, b in enumerate(m.blocks):
        for k in _ATTN_TENSORS + _FFN_TENSORS:
            if k in b.tensors:
                yield f"blk.{i}.{k}.weight", b.tensors[k]


def _check_model(m: DeciModel) -> None:
    for i, b in enumerate(m.blocks):
        if b.n_head and (b.n_head_kv < 1 or b.n_head % b.n_head_kv):
            raise ValueError(f"block {i}: {b.n_head} query heads is not a multiple of {b.n_head_kv} KV heads")
        want = {"attn_q": (b.n_head * m.head_dim, m.hidden), "attn_k": (b.n_head_kv * m.head_dim, m.hidden),
                "attn_v": (b.n_head_kv * m.head_dim, m.hidden), "attn_output": (m.hidden, b.n_head * m.head_dim),
                "ffn_gate": (b.n_ff, m.hidden), "ffn_up": (b.n_ff, m.hidden), "ffn_down": (m.hidden, b.n_ff)}
        for k, shape in want.items():
            t = b.tensors.get(k)
            if (t is None) != (shape[0] * shape[1] == 0) or (t is not None and tuple(t.shape) != shape):
                got = None if t is None else tuple(t.shape)
                raise ValueError(f"block {i}: tensor {k} has shape {got}, expected {shape}")


def write_deci_gguf(m: DeciModel, path, *, dtype: str = "f32", fields: Optional[Sequence[Field]] = None) -> Path:
    """Write `m` as a ``deci`` GGUF file at `path` (atomically); matrices in `dtype`, norms in F32;
    `fields`: the tokenizer keys (None: the placeholder vocabulary)."""
    gguf = require_gguf()
    if fields is None:
        fields = tokenizer_fields(None, m.vocab_size)
    if dtype not in DTYPES:
        raise ValueError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _check_model(m)
    path = Path(path)
    ftype = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        _write_metadata(w, m, int(ftype), fields)
        for name, t in _tensors(m):
            t = np.ascontiguousarray(t, dtype=np.float16 if (dtype == "f16" and t.ndim == 2) else np.float32)
            w.add_tensor(name, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def quantize_gguf(src, dst, quant: str, *, threads: Optional[int] = None) -> Path:
    """Quantise the F32/F16 GGUF `src` to `dst` (atomically) with llama.cpp's own quantiser."""
    if quant not in QUANTS:
        raise ValueError(f"GGUF quantisation must be one of {', '.join(QUANTS)}, got {quant!r}")
    llama_cpp = require_llama_cpp()
    dst = Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(llama_cpp, _QUANT_FTYPES[quant]))
    params.nthread = int(threads or os.cpu_count() or 1)
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not quantise {src} to {quant} (llama_model_quantize returned {rc})")
    return dst


def export_gguf(model, path, *, tokenizer=None, dtype: str = "f32", quant: Optional[str] = None) -> Path:
    """Write the LLaMA-family causal LM `model` (dense or pruned) as a ``deci`` GGUF file at `path`.

    `tokenizer`: None (placeholder vocabulary), a HF tokenizer loaded from a GGUF (the built-in
    SmolLM2's), or the path of a ``.gguf`` file whose ``tokenizer.*`` keys are copied.
    `dtype`: ``"f32"`` or ``"f16"``.  `quant`: None, ``"q8_0"`` or ``"q4_k_m"`` (llama.cpp's
    quantiser, from an F32 intermediate; `dtype` is then ignored).  Returns `path`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quant is not None and quant not in QUANTS:
        raise ValueError(f"GGUF quantisation must be None or one of {', '.join(QUANTS)}, got {quant!r}")
    require_gguf()
    if quant is not None:
        require_llama_cpp()
    m = deci_from_llama(model)
    fields = tokenizer_fields(tokenizer, m.vocab_size)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"GGUF export: {path} is a directory; give a file name (e.g. {path / 'model.gguf'})")
    if quant is None:
        return write_deci_gguf(m, path, dtype=dtype, fields=fields)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=str(path.parent) if path.parent.is_dir() else None) as d:
        f32 = write_deci_gguf(m, Path(d) / "f32.gguf", dtype="f32", fields=fields)
        return quantize_gguf(f32, path, quant)
