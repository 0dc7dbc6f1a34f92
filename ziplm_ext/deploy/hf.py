"""Export a pruned model as a self-contained Hugging Face directory that loads without ziplm_ext.

ZipLM (Kurtic et al. 2023) gives every block its own attention and FFN width and may remove whole
modules; no stock HF config expresses that.  :func:`export_hf` therefore writes the directory the way
heterogeneous checkpoints such as DeciLM / Nemotron-NAS do: the configuration and modelling code ship in
the directory and ``config.json`` names them in ``auto_map``::

    config.json                    the dense config + per-block widths, model_type "ziplm_<family>", auto_map
    configuration_ziplm_<family>.py
    modeling_ziplm_<family>.py     transformers' own classes, blocks built at their widths
    ziplm_common.py                shared pieces (per-block widths, the removed-module stand-in)
    model.safetensors              the weights (tied duplicates stored once, as save_pretrained does)
    generation_config.json         causal LMs
    tokenizer files                when a tokenizer is given

so that plain transformers loads it::

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)   # LLaMA family, GPT-2
    AutoModel.from_pretrained(dir, trust_remote_code=True)              # BERT (and the decoders' base)

Per-block widths are lists in ``config.json`` with ``0`` for a removed module:
``num_attention_heads_per_layer``, ``intermediate_size_per_layer`` and, for LLaMA (whose structures are
key/value groups), ``num_key_value_heads_per_layer``.  The dense scalars keep the head size.  The modelling
files (``ziplm_ext/deploy/hf_templates``) import only torch and transformers.  Parameter names equal those
of the model :func:`ziplm_ext.io.export.load_pruned` returns, and the exported model computes the same
operations, so its outputs are bit-identical (tested in float32).  ``attn_implementation`` is written
into ``config.json`` as the source model had it (``from_pretrained(..., attn_implementation=...)``
overrides it).

Supported: ``LlamaForCausalLM`` / ``LlamaModel`` (model_type ``llama``), ``GPT2LMHeadModel`` /
``GPT2Model`` and ``BertModel``; not FLOP low-rank layers (``LowRankLinear``), which no HF class holds.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ziplm_ext.adapters import get_adapter
from ziplm_ext.io.fileio import atomic_directory

__all__ = ["export_hf", "HF_TEMPLATES", "HF_SUPPORTED"]

HF_TEMPLATES = Path(__file__).resolve().parent / "hf_templates"
WEIGHTS_FILE = "model.safetensors"
COMMON_FILE = "ziplm_common.py"


@dataclass(frozen=True)
class _Family:
    """How one adapter family is exported: template stem, config class and exported model classes."""

    stem: str  # "ziplm_llama": configuration_<stem>.py, modeling_<stem>.py
    config_class: str
    classes: dict  # source class name -> {auto class: exported class}
    model_types: tuple[str, ...]

    def modeling(self):
        return importlib.import_module(f"{__package__}.hf_templates.modeling_{self.stem}")

    def config_cls(self):
        module = importlib.import_module(f"{__package__}.hf_templates.configuration_{self.stem}")
        return getattr(module, self.config_class)


_FAMILIES = {
    "llama": _Family("ziplm_llama", "ZipLMLlamaConfig", {
        "LlamaForCausalLM": {"AutoModelForCausalLM": "ZipLMLlamaForCausalLM", "AutoModel": "ZipLMLlamaModel"},
        "LlamaModel": {"AutoModel": "ZipLMLlamaModel"},
    }, ("llama",)),
    "gpt2": _Family("ziplm_gpt2", "ZipLMGPT2Config", {
        "GPT2LMHeadModel": {"AutoModelForCausalLM": "ZipLMGPT2LMHeadModel", "AutoModel": "ZipLMGPT2Model"},
        "GPT2Model": {"AutoModel": "ZipLMGPT2Model"},
    }, ("gpt2",)),
    "bert": _Family("ziplm_bert", "ZipLMBertConfig", {"BertModel": {"AutoModel": "ZipLMBertModel"}}, ("bert",)),
}
HF_SUPPORTED = ", ".join(sorted(c for f in _FAMILIES.values() for c in f.classes))


def _per_block_widths(model, adapter) -> dict[str, list[int]]:
    """The ``*_per_layer`` lists of ``config.json`` from the adapter's kept structure counts."""
    shapes = adapter.shapes(model)
    n = len(adapter.blocks(model))
    attn = [shapes[f"blocks.{i}.attn"] for i in range(n)]
    widths = {"intermediate_size_per_layer": [shapes[f"blocks.{i}.ffn"] for i in range(n)]}
    if adapter.family == "llama":  # one structure = one KV head with its n_rep query heads
        cfg = model.config
        n_rep = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        widths["num_key_value_heads_per_layer"] = attn
        widths["num_attention_heads_per_layer"] = [k * n_rep for k in attn]
    else:  # one structure = one head
        widths["num_attention_heads_per_layer"] = attn
    return widths


def _check_model(model):
    """``(family spec, adapter)`` of a supported model, or one clear error."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"export_hf: expected a transformers model (or a model directory / built-in name), "
                        f"got {type(model).__name__}")
    from ziplm_ext.layers import FactorizedLinear, LowRankLinear

    if any(isinstance(m, (FactorizedLinear, LowRankLinear)) for m in model.modules()):
        raise ValueError("export_hf: FLOP low-rank layers (LowRankLinear / FactorizedLinear) cannot be expressed "
                         "by HF modelling classes; the hf format supports ZipLM-pruned models")
    adapter = get_adapter(model)  # UnsupportedArchitectureError (a ValueError) for foreign models
    fam = _FAMILIES.get(adapter.family)
    model_type = getattr(model.config, "model_type", None)
    if fam is None or type(model).__name__ not in fam.classes or model_type not in fam.model_types:
        raise ValueError(f"export_hf: {type(model).__name__} (model_type={model_type!r}) is not supported by the "
                         f"hf format; supported: {HF_SUPPORTED}")
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError("export_hf: models with cross-attention (add_cross_attention) are not supported")
    return fam, adapter


def _weights(model) -> tuple[dict[str, torch.Tensor], bool]:
    """``(tensors to save, tie_word_embeddings)``: the state dict, the tied output embedding dropped when
    the config ties it and it really equals its source (HF re-ties it on load, as after save_pretrained)."""
    sd = model.state_dict()
    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tied = tied if isinstance(tied, dict) else {}
    drop = {t for t, s in tied.items() if t in sd and s in sd}
    if tie and not all(torch.equal(sd[t], sd[s]) for t, s in tied.items() if t in drop):
        tie = False  # untied after loading: keep both and say so in the config
    out, seen = {}, set()
    for name, t in sd.items():
        if tie and name in drop:
            continue
        t = t.detach().contiguous().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        out[name] = t.clone() if key in seen else t  # safetensors refuses shared storage
        seen.add(key)
    return out, tie


def _config_dict(model, fam: _Family, adapter, tie: bool) -> dict:
    """The exported ``config.json`` contents (validated by the template's config class)."""
    src = model.config.to_dict()
    for k in ("architectures", "auto_map", "_name_or_path", "transformers_version", "quantization_config"):
        src.pop(k, None)
    src.update(_per_block_widths(model, adapter))
    src["model_type"] = fam.config_cls().model_type
    src["tie_word_embeddings"] = tie
    if adapter.family == "bert":
        src["add_pooling_layer"] = getattr(model, "pooler", None) is not None
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    src["dtype"] = str(max(set(dtypes), key=dtypes.count) if dtypes else torch.float32).replace("torch.", "")
    cfg = fam.config_cls().from_dict(src)  # validates the widths
    autos = fam.classes[type(model).__name__]
    out = cfg.to_dict()
    for k in ("transformers_version", "_name_or_path"):
        out.pop(k, None)
    out["architectures"] = [next(iter(autos.values()))]
    out["auto_map"] = {"AutoConfig": f"configuration_{fam.stem}.{fam.config_class}",
                       **{auto: f"modeling_{fam.stem}.{cls}" for auto, cls in autos.items()}}
    impl = getattr(model.config, "_attn_implementation", None)
    if isinstance(impl, str):
        out["attn_implementation"] = impl
    return out


def _self_check(fam: _Family, config: dict, tensors: dict[str, torch.Tensor], tie: bool) -> None:
    """The template model built from ``config`` must hold exactly the saved tensors' names and shapes."""
    cfg = fam.config_cls().from_dict(dict(config))
    cls = getattr(fam.modeling(), config["architectures"][0])
    with torch.device("meta"):
        tmpl = cls(cfg)
    expected = {k: tuple(v.shape) for k, v in tmpl.state_dict().items()}
    if tie:
        tied = getattr(tmpl, "_tied_weights_keys", None) or {}
        for t in tied if isinstance(tied, dict) else ():
            expected.pop(t, None)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:6]
        raise RuntimeError(f"export_hf: the {fam.stem} template does not match the model's tensors: {diff}")


def _check_target(target: Path) -> None:
    """An existing target must be empty or a previous :func:`export_hf` output (replaced atomically)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"export_hf: {target} exists and is not a directory")
    if not any(target.iterdir()):
        return
    try:
        previous = json.loads((target / "config.json").read_text()).get("model_type", "").startswith("ziplm_")
    except (OSError, ValueError, AttributeError):
        previous = False
    if not previous:
        raise ValueError(f"export_hf: {target} is a non-empty directory that is not a previous hf export")


def _write(tmp: Path, fam: _Family, config: dict, tensors: dict, model, tokenizer) -> None:
    from safetensors.torch import save_file

    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    for name in (f"configuration_{fam.stem}.py", f"modeling_{fam.stem}.py", COMMON_FILE):
        shutil.copyfile(HF_TEMPLATES / name, tmp / name)
    gen = getattr(model, "generation_config", None)
    if gen is not None and "AutoModelForCausalLM" in config["auto_map"]:
        gen.save_pretrained(str(tmp))
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    with open(tmp / "config.json", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _resolve(model, tokenizer):
    """A model directory or built-in name is loaded with :func:`ziplm_ext.io.models.load_model`."""
    if isinstance(model, (str, os.PathLike)):
        from ziplm_ext.io.models import load_model

        model, tok = load_model(model)
        tokenizer = tokenizer if tokenizer is not None else tok
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"export_hf: tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    return model, tokenizer


def export_hf(model, directory, *, tokenizer=None) -> Path:
    """Write ``model`` as a directory that plain transformers loads (``trust_remote_code=True``).

    ``model``: a (pruned or dense) ``LlamaForCausalLM`` / ``LlamaModel`` / ``GPT2LMHeadModel`` /
    ``GPT2Model`` / ``BertModel``, or what :func:`ziplm_ext.io.models.load_model` accepts (a
    :func:`~ziplm_ext.io.export.save_pruned` directory, a HF model directory, ``"smollm2"``,
    ``"minilm"``; its tokenizer is exported unless ``tokenizer`` is given).  ``tokenizer``: saved into the
    directory when given.  The directory is written atomically; an existing one is replaced only if it is
    empty or a previous export.  Returns the directory's absolute path.
    """
    model, tokenizer = _resolve(model, tokenizer)
    fam, adapter = _check_model(model)
    target = Path(directory).expanduser().absolute()
    _check_target(target)
    tensors, tie = _weights(model)
    config = _config_dict(model, fam, adapter, tie)
    _self_check(fam, config, tensors, tie)
    with atomic_directory(target, overwrite=True) as tmp:
        _write(tmp, fam, config, tensors, model, tokenizer)
    return target
