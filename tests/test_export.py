"""save_pruned / load_pruned: exact round trip, HF loadability, atomic failure behaviour."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ziplm_ext.io import export  # noqa: E402
from ziplm_ext.adapters import RemovedModule, get_adapter  # noqa: E402
from ziplm_ext.io.export import PrunedSaveError, load_pruned, save_pruned  # noqa: E402

try:
    from test_adapters import make_inputs, make_model  # noqa: E402
except ImportError:  # tests/ as a package
    from tests.test_adapters import make_inputs, make_model  # noqa: E402


def prune_nonuniform(model):
    """Non-uniform widths incl. a removed attention (block 0) and a removed FFN (block 1)."""
    adapter = get_adapter(model)
    for layer in adapter.prunable_layers(model):
        n = layer.num_structures
        if (layer.block, layer.kind) in ((0, "attn"), (1, "ffn")):
            keep = []
        elif layer.kind == "attn":
            keep = list(range(0, n, 2)) if layer.block == 1 else [n - 1]
        else:
            keep = list(range(1, n, 3)) if layer.block == 0 else list(range(n // 2))
        adapter.slice(model, layer, keep)
    return adapter


def prune_uniform(model, attn: bool):
    adapter = get_adapter(model)
    for layer in adapter.prunable_layers(model):
        n = layer.num_structures
        if layer.kind == "attn":
            keep = [1] if attn else list(range(n))
        else:
            keep = [i for i in range(n) if i % 3 != 1]
        adapter.slice(model, layer, keep)
    return adapter


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_roundtrip_nonuniform_exact(tmp_path, arch, dtype):
    model = make_model(arch, dtype)
    adapter = prune_nonuniform(model)
    shapes = adapter.shapes(model)
    target = tmp_path / "pruned"
    save_pruned(model, target, extra={"sparsity": 0.5, "note": "test"})
    meta = json.loads((target / "ziplm_shapes.json").read_text())
    assert meta["family"] == adapter.family
    assert meta["model_class"] == type(model).__name__
    assert meta["shapes"] == shapes
    assert meta["extra"] == {"sparsity": 0.5, "note": "test"}
    assert meta["hf_loadable"] is False and meta["hf_loadable_reason"]
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()

    loaded = load_pruned(target)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert get_adapter(loaded).shapes(loaded) == shapes
    assert isinstance(get_adapter(loaded).out_proj(loaded, get_adapter(loaded).prunable_layers(loaded)[0]),
                      RemovedModule)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    for name, buf in model.named_buffers():
        assert torch.equal(buf, dict(loaded.named_buffers())[name]), name
    inputs = make_inputs(arch)
    assert torch.equal(outputs(model, inputs), outputs(loaded, inputs))
    # tied embeddings stay tied
    if arch == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        assert "lm_head.weight" in meta["tied"]
    # a loaded model can be sliced further and saved again
    ad = get_adapter(loaded)
    layer = ad.prunable_layers(loaded)[2]
    ad.slice(loaded, layer, [0])
    save_pruned(loaded, target)  # overwrite a previous save
    again = load_pruned(target)
    assert torch.equal(outputs(loaded, inputs), outputs(again, inputs))


@pytest.mark.parametrize("arch,auto_cls,attn", [
    ("bert", transformers.AutoModel, False),
    ("gpt2", transformers.AutoModelForCausalLM, False),
    ("llama", transformers.AutoModelForCausalLM, True),
    ("mistral", transformers.AutoModelForCausalLM, True),
])
def test_uniform_is_hf_loadable(tmp_path, arch, auto_cls, attn):
    model = make_model(arch, torch.float64)
    prune_uniform(model, attn=attn)
    target = tmp_path / "u"
    save_pruned(model, target)
    meta = json.loads((target / "ziplm_shapes.json").read_text())
    assert meta["hf_loadable"] is True, meta["hf_loadable_reason"]
    inputs = make_inputs(arch)
    hf = auto_cls.from_pretrained(target, dtype=torch.float64, attn_implementation="eager").eval()
    assert type(hf) is type(model)
    sd_a, sd_b = model.state_dict(), hf.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    # from_pretrained keeps tensors memory-mapped at unaligned offsets, which makes CPU BLAS
    # round differently (~1 ulp); with identical weights in fresh (aligned) storage the
    # outputs are bit-identical.
    torch.testing.assert_close(outputs(hf, inputs), outputs(model, inputs), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for p in hf.parameters():
            p.data = p.data.clone()
    assert torch.equal(outputs(model, inputs), outputs(hf, inputs))
    ours = load_pruned(target)
    assert torch.equal(outputs(model, inputs), outputs(ours, inputs))


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_pruned_heads_not_hf_loadable_bert_gpt2(tmp_path, arch):
    model = make_model(arch)
    prune_uniform(model, attn=True)
    save_pruned(model, tmp_path / "x")
    meta = json.loads((tmp_path / "x" / "ziplm_shapes.json").read_text())
    assert meta["hf_loadable"] is False
    assert "head" in meta["hf_loadable_reason"]
    loaded = load_pruned(tmp_path / "x")
    inputs = make_inputs(arch)
    assert torch.equal(outputs(model, inputs), outputs(loaded, inputs))


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_unwritable_directory_leaves_nothing(tmp_path):
    model = make_model("gpt2")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PrunedSaveError) as e:
        save_pruned(model, blocker / "sub" / "pruned")
    assert "cannot write pruned model" in str(e.value) and "\n" not in str(e.value)
    assert _leftovers(tmp_path) == ["a_file"]
    # target exists as a file
    with pytest.raises(PrunedSaveError):
        save_pruned(model, blocker)
    assert blocker.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_readonly_parent(tmp_path):
    model = make_model("gpt2")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PrunedSaveError):
            save_pruned(model, ro / "pruned")
        assert _leftovers(ro) == []
    finally:
        ro.chmod(0o700)


def test_failure_mid_write_is_atomic(tmp_path, monkeypatch):
    model = make_model("llama")
    prune_nonuniform(model)
    target = tmp_path / "pruned"
    save_pruned(model, target, extra={"v": 1})
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import json as _json

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.json, "dump", boom)  # fails after the weights were written
    with pytest.raises(PrunedSaveError, match="No space left"):
        save_pruned(model, target, extra={"v": 2})
    monkeypatch.setattr(export.json, "dump", _json.dump)
    assert _leftovers(tmp_path) == ["pruned"]  # no temp dir left behind
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # previous save intact

    # fresh target: failure leaves nothing at all
    monkeypatch.setattr(export.json, "dump", boom)
    with pytest.raises(PrunedSaveError):
        save_pruned(model, tmp_path / "fresh")
    assert _leftovers(tmp_path) == ["pruned"]


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    model = make_model("bert")
    d = tmp_path / "mine"
    d.mkdir()
    (d / "important.txt").write_text("keep")
    with pytest.raises(PrunedSaveError):
        save_pruned(model, d)
    assert (d / "important.txt").read_text() == "keep"


def test_extra_must_be_json(tmp_path):
    model = make_model("bert")
    with pytest.raises(TypeError):
        save_pruned(model, tmp_path / "x", extra={"bad": object()})
    assert _leftovers(tmp_path) == []
