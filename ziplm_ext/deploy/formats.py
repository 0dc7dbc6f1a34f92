"""One entry point for every deployment format, and the artefact each inference engine runs.

``export_model(model, "gguf" | "onnx" | "hf", out)`` writes a dense or pruned model for llama.cpp
(GGUF, LLaMA family), ONNX Runtime (ONNX, BERT family) or plain ``transformers`` (a self-contained
directory loaded with ``trust_remote_code=True``). :func:`engine_artefact` names the file a family
member carries for the engine its speedups were measured in.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

__all__ = ["FORMATS", "ENGINE_ARTEFACTS", "export_model", "engine_artefact", "export_for_engine"]

FORMATS = ("gguf", "onnx", "hf")
# engine -> (format, file name inside a family member's directory)
ENGINE_ARTEFACTS = {"llama.cpp": ("gguf", "model.gguf"), "onnxruntime": ("onnx", "model.onnx")}
_GGUF_DTYPES = {"float32": "f32", "float16": "f16", "f32": "f32", "f16": "f16"}


def export_model(model, fmt: str, out, *, tokenizer=None, dtype: str = "float32", quant: Optional[str] = None) -> Path:
    """Write `model` in format `fmt` to `out` (a file for gguf / onnx, a directory for hf); returns the path.

    `dtype` and `quant` apply to GGUF only (``"float32"`` / ``"float16"``; ``"q8_0"`` / ``"q4_k_m"``
    through llama.cpp's own quantiser)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt != "gguf" and (quant is not None or _GGUF_DTYPES.get(dtype) != "f32"):
        raise ValueError(f"--dtype/--quant apply to the gguf format only (got format {fmt!r})")
    if dtype not in _GGUF_DTYPES:
        raise ValueError(f"export dtype must be float32 or float16, got {dtype!r}")
    out = Path(out)
    if fmt == "gguf":
        mod = importlib.import_module("ziplm_ext.deploy.gguf")
        mod.export_gguf(model, out, tokenizer=tokenizer, dtype=_GGUF_DTYPES[dtype], quant=quant)
    elif fmt == "onnx":
        importlib.import_module("ziplm_ext.deploy.onnx").export_onnx(model, out)
    else:
        importlib.import_module("ziplm_ext.deploy.hf").export_hf(model, out, tokenizer=tokenizer)
    return out


def engine_artefact(engine: str) -> Optional[tuple[str, str]]:
    """(format, file name) of the artefact a family member carries for `engine`; None for torch."""
    return ENGINE_ARTEFACTS.get(engine)


def export_for_engine(model, env, directory, *, tokenizer=None) -> Optional[Path]:
    """Write the artefact `env`'s engine runs into `directory` (a family member's folder), in the
    environment's weight format (GGUF: dtype and quantisation); None for the torch engine."""
    art = engine_artefact(getattr(env, "engine", "torch"))
    if art is None:
        return None
    fmt, name = art
    kw = dict(dtype=env.dtype, quant=getattr(env, "quant", None)) if fmt == "gguf" else {}
    return export_model(model, fmt, Path(directory) / name, tokenizer=tokenizer, **kw)
