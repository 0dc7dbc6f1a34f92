"""Exact, atomic save / load of physically pruned models.

Directory layout written by :func:`save_pruned`::

    config.json                 HF config (see "HF loadability" below)
    ziplm_shapes.json           family, model / config class, per-layer kept counts
                                (``adapter.shapes()``), the dense config, tied-weight
                                aliases, dtype, attention implementation, ``extra``
    model.safetensors           the state dict (tied duplicates stored once)
    ziplm_buffers.safetensors   non-persistent buffers (e.g. RoPE ``inv_freq``,
                                ``position_ids``), so that loading is bit-exact

FLOP models (:mod:`ziplm_ext.flop`, after ``export_flop_model``): ``ziplm_shapes.json`` also
lists every exported FLOP layer under ``"flop_layers"``: module path, ``kind`` (``"low_rank"``:
a :class:`~ziplm_ext.flop.LowRankLinear`; ``"dense"``: a layer folded back into its original
``nn.Linear`` / ``Conv1D`` because the thin pair would not be smaller), ``in``, ``out``, ``rank``,
``bias``, ``dtype`` and the module class.  :func:`load_pruned` replaces the ``"low_rank"``
modules of the model built on the ``meta`` device by empty ``LowRankLinear`` of the recorded
shapes before materialising it; ``"dense"`` layers have the dense shapes already.  A save with
low-rank layers is written with ``format_version`` 2 and ``"hf_loadable": false`` (no HF
config expresses a factorised projection); ZipLM saves are unchanged (``format_version`` 1).

:func:`load_pruned` builds the *dense* model from the dense config on the ``meta``
device (no memory, no init), applies ``adapter.slice(layer, range(k))`` per layer to get
the pruned shapes (a removed module for ``k == 0``), materialises the (small) pruned model
with ``to_empty``, restores the buffers, re-ties tied weights and loads the state dict
strictly.  The returned model is in eval mode and its ``model.config`` is the dense config
(as for a model pruned in memory: adapters report dense counts from the config and current
counts from the module shapes).

HF loadability: when every attention layer keeps the same number of structures, every
FFN keeps the same width and no module is removed, the adapter tries to express the pruned
shapes in a regular HF config (``intermediate_size`` / ``n_inner``; for LLaMA-like models
also ``num_attention_heads``, ``num_key_value_heads`` and an explicit ``head_dim``), and
that adjusted config is written as ``config.json`` so the directory also loads with plain
``AutoModel*.from_pretrained``.  BERT and GPT-2 derive the head size as
``hidden_size / num_attention_heads``, so pruned attention heads cannot be expressed there;
non-uniform widths and removed modules cannot be expressed by any HF config.  In those cases
``config.json`` is the dense config and ``ziplm_shapes.json`` records ``"hf_loadable": false``
with the reason; use :func:`load_pruned`.

Atomicity (:func:`ziplm_ext.io.fileio.atomic_directory`): everything is written into a fresh
temporary directory next to the target, which is then renamed into place (an existing previous
save is first moved aside and deleted only after the new one is in place).  On any failure the
temporary directory is removed and a pre-existing target is left untouched.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

from ziplm_ext.adapters import get_adapter
from ziplm_ext.adapters.base import is_conv1d
from ziplm_ext.io.fileio import atomic_directory

__all__ = ["save_pruned", "load_pruned", "PrunedSaveError", "SHAPES_FILE", "WEIGHTS_FILE", "BUFFERS_FILE"]

SHAPES_FILE = "ziplm_shapes.json"
WEIGHTS_FILE = "model.safetensors"
BUFFERS_FILE = "ziplm_buffers.safetensors"
FORMAT_VERSION = 2  # 2: FLOP low-rank layers ("flop_layers"); saves without them are still written as 1


class PrunedSaveError(OSError):
    """The pruned model could not be written to the requested directory."""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _main_dtype(model) -> torch.dtype:
    c = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    return c.most_common(1)[0][0] if c else torch.float32


def _dedup_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied weights); returns (tensors, {alias: source})."""
    seen: dict[tuple, str] = {}
    out, tied = {}, {}
    for name, t in sd.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    # safetensors refuses any remaining storage sharing (e.g. overlapping views): clone those
    ptrs = Counter(t.untyped_storage().data_ptr() for t in out.values() if t.numel() > 0)
    for name, t in out.items():
        if t.numel() > 0 and ptrs[t.untyped_storage().data_ptr()] > 1:
            out[name] = t.clone()
    return out, tied


def _non_persistent_buffers(model) -> dict[str, torch.Tensor]:
    out = {}
    for mod_name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            t = mod._buffers.get(b)
            if t is not None:
                out[f"{mod_name}.{b}" if mod_name else b] = t
    return out


def _flop_layers(model) -> list[dict]:
    """Records of the exported FLOP layers of ``model`` (see the module docstring)."""
    from ziplm_ext.layers import FactorizedLinear, LowRankLinear

    out = []
    for path, m in model.named_modules():
        if isinstance(m, FactorizedLinear):
            raise ValueError(f"save_pruned: {path} is a FactorizedLinear (a FLOP model in training); "
                             "save the result of ziplm_ext.flop.export_flop_model instead")
        if isinstance(m, LowRankLinear):
            out.append({"path": path, "kind": "low_rank", "module": "LowRankLinear", "in": m.in_features,
                        "out": m.out_features, "rank": m.rank, "bias": m.bias is not None,
                        "dtype": _dtype_name(m.up.weight.dtype)})
        elif getattr(m, "flop_folded", False):
            w = m.weight
            n_in, n_out = (w.shape[0], w.shape[1]) if is_conv1d(m) else (w.shape[1], w.shape[0])
            out.append({"path": path, "kind": "dense", "module": type(m).__name__, "in": int(n_in),
                        "out": int(n_out), "rank": int(getattr(m, "flop_rank", min(n_in, n_out))),
                        "bias": getattr(m, "bias", None) is not None, "dtype": _dtype_name(w.dtype)})
    return out


def _save_metadata(model, adapter, extra: dict | None) -> tuple[dict, dict | None]:
    """The ``ziplm_shapes.json`` record of ``model`` (without ``tied``) and the HF config dict that
    expresses its shapes (``None`` when no HF config can)."""
    shapes = adapter.shapes(model)
    try:
        extra_json = json.loads(json.dumps(extra if extra is not None else {}))
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_pruned: `extra` must be JSON-serialisable ({e})") from None

    flop_layers = _flop_layers(model)
    low_rank = any(r["kind"] == "low_rank" for r in flop_layers)
    hf_cfg_dict, reason = adapter.hf_config_for_shapes(model.config, shapes)
    if low_rank:
        hf_cfg_dict, reason = None, ("FLOP low-rank layers (LowRankLinear: two thin matrices per projection) "
                                     "cannot be expressed in an HF config; use ziplm_ext.load_pruned")
    meta = {
        "format_version": FORMAT_VERSION if low_rank else 1,
        "family": adapter.family,
        "model_class": type(model).__name__,
        "config_class": type(model.config).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "shapes": shapes,
        "hf_loadable": hf_cfg_dict is not None,
        "hf_loadable_reason": reason if hf_cfg_dict is None else "",
        "dtype": _dtype_name(_main_dtype(model)),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dense_config": model.config.to_dict(),
        "tied": {},
        "extra": extra_json,
    }
    if flop_layers:
        meta["flop_layers"] = flop_layers
    return meta, hf_cfg_dict


def _check_save_target(target: Path) -> None:
    """An existing target must be a directory that is empty or a previous save."""
    if target.exists():
        if not target.is_dir():
            raise PrunedSaveError(f"cannot write pruned model to {target}: it exists and is not a directory")
        if any(target.iterdir()) and not (target / SHAPES_FILE).is_file():
            raise PrunedSaveError(f"cannot write pruned model to {target}: non-empty directory that is not a ziplm save")


def _write_save(tmp: Path, model, hf_cfg_dict: dict | None, tensors: dict, buffers: dict, meta: dict) -> None:
    """Write config.json, the weights, the buffers and ``ziplm_shapes.json`` into the directory ``tmp``."""
    from safetensors.torch import save_file

    cfg = type(model.config).from_dict(hf_cfg_dict) if hf_cfg_dict is not None else model.config
    cfg_arch = getattr(cfg, "architectures", None)
    cfg.architectures = [type(model).__name__]
    try:
        cfg.save_pretrained(tmp)
    finally:
        if cfg is model.config:
            cfg.architectures = cfg_arch
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    save_file(buffers, str(tmp / BUFFERS_FILE), metadata={"format": "pt"})
    with open(tmp / SHAPES_FILE, "w") as f:
        json.dump(meta, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def save_pruned(model, directory, extra: dict | None = None) -> Path:
    """Save a (possibly physically pruned) model atomically into ``directory``.

    ``extra`` is JSON-serialisable metadata stored in ``ziplm_shapes.json``.  An existing
    ``directory`` is replaced only if it is empty or a previous ``save_pruned`` output.
    Raises :class:`PrunedSaveError` (one-line message) if the directory cannot be written, and
    ``ValueError`` for a FLOP model still in its training form (``FactorizedLinear`` layers).
    Returns the target path.
    """
    adapter = get_adapter(model)
    target = Path(directory).expanduser().absolute()
    meta, hf_cfg_dict = _save_metadata(model, adapter, extra)
    tensors, meta["tied"] = _dedup_state_dict(model.state_dict())
    buffers = {k: v.detach().contiguous().cpu().clone() for k, v in _non_persistent_buffers(model).items()}
    _check_save_target(target)
    try:
        with atomic_directory(target, overwrite=True) as tmp:
            _write_save(tmp, model, hf_cfg_dict, tensors, buffers, meta)
    except OSError as e:
        detail = e.strerror or str(e) or type(e).__name__
        raise PrunedSaveError(f"cannot write pruned model to {target}: {detail}") from e
    return target


def _set_by_name(model, name: str, value) -> None:
    mod_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(mod_name) if mod_name else model
    setattr(owner, attr, value)


def _get_by_name(model, name: str):
    mod_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(mod_name) if mod_name else model
    return getattr(owner, attr)


def _build_flop_layers(model, records: list[dict], directory) -> None:
    """Replace the recorded FLOP low-rank layers of the (meta-device) model by empty LowRankLinear."""
    if not records:
        return
    from ziplm_ext.layers import LowRankLinear

    for r in records:
        try:
            current = model.get_submodule(r["path"])
        except AttributeError:
            raise ValueError(f"{directory}: FLOP layer {r['path']!r} not found in the model built from "
                             "its config") from None
        if r["kind"] == "low_rank":
            dev = next(current.parameters()).device
            _set_by_name(model, r["path"], LowRankLinear(r["in"], r["out"], r["rank"], bias=r["bias"],
                                                         dtype=getattr(torch, r["dtype"]), device=dev))
        elif r["kind"] != "dense":
            raise ValueError(f"{directory}: unknown FLOP layer kind {r['kind']!r} for {r['path']}")


@torch.no_grad()
def load_pruned(directory, device: str | torch.device = "cpu"):
    """Load a model written by :func:`save_pruned` (eval mode, exact weights and shapes)."""
    import transformers
    from safetensors.torch import load_file

    directory = Path(directory)
    shapes_path = directory / SHAPES_FILE
    if not shapes_path.is_file():
        raise FileNotFoundError(f"{directory} is not a ziplm_ext save ({SHAPES_FILE} missing)")
    with open(shapes_path) as f:
        meta = json.load(f)
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(f"{directory}: format_version {meta['format_version']} is newer than supported ({FORMAT_VERSION})")
    model_cls = getattr(transformers, meta["model_class"], None)
    if model_cls is None:
        raise ValueError(f"{directory}: model class {meta['model_class']!r} not found in transformers")
    config = model_cls.config_class.from_dict(meta["dense_config"])
    if meta.get("attn_implementation"):
        config._attn_implementation = meta["attn_implementation"]
    dtype = getattr(torch, meta.get("dtype", "float32"))

    with torch.device("meta"):
        model = model_cls(config)
    model.to(dtype)
    adapter = get_adapter(model)
    saved_shapes: dict[str, int] = meta["shapes"]
    layers = adapter.prunable_layers(model)
    if {l.name for l in layers} != set(saved_shapes):
        raise ValueError(f"{directory}: saved layer names do not match the model built from its config")
    for layer in layers:
        adapter.slice(model, layer, range(saved_shapes[layer.name]))
    if adapter.shapes(model) != saved_shapes:  # pragma: no cover - defensive
        raise RuntimeError(f"{directory}: could not reproduce the saved shapes")
    _build_flop_layers(model, meta.get("flop_layers", []), directory)

    model.to_empty(device=device)
    # non-persistent buffers: HF's own initialisation first, then the exact saved values
    owners = {n.rpartition(".")[0] for n in _non_persistent_buffers(model)}
    for n in owners:
        if hasattr(model, "_init_weights"):
            try:
                model._init_weights(model.get_submodule(n) if n else model)
            except Exception:
                pass
    buf_path = directory / BUFFERS_FILE
    if buf_path.is_file():
        for name, t in load_file(str(buf_path)).items():
            try:
                dst = _get_by_name(model, name)
            except AttributeError:
                continue
            if isinstance(dst, torch.Tensor):
                _set_by_name(model, name, t.to(device=dst.device, dtype=t.dtype))

    # re-tie tied parameters (to_empty / dtype conversion may have untied them)
    tied: dict[str, str] = meta.get("tied", {})
    for alias, source in tied.items():
        src = _get_by_name(model, source)
        if _get_by_name(model, alias) is not src:
            _set_by_name(model, alias, src)

    sd = load_file(str(directory / WEIGHTS_FILE))
    for alias, source in tied.items():
        sd[alias] = sd[source]
    model.load_state_dict(sd, strict=True)
    # tensors stored in a dtype different from the bulk dtype keep their saved dtype
    for name, t in sd.items():
        if name in tied:
            continue
        dst = _get_by_name(model, name)
        if dst.dtype != t.dtype:
            dst.data = t.to(device=dst.device)
    model.eval()
    return model
