"""The OBS database can never be stale: its fingerprint covers every weight, the calibration data
and the settings it depends on (damping, level grid), so a resumed build never reuses entries
computed for something else."""
import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ziplm_ext.stages.calibrate import make_batches
from ziplm_ext.stages.database import build_database
from ziplm_ext.stages.levels import layer_grid


def tiny_llama(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def batches(seed=1):
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(seed))
    return make_batches(ids, None, 4)


@pytest.fixture
def built(tmp_path):
    model = tiny_llama()
    build_database(model, batches(), workdir=tmp_path, progress=False)
    return model, tmp_path


def test_same_inputs_resume(built):
    model, wd = built
    build_database(model, batches(), workdir=wd, progress=False)  # no error: same fingerprint


@pytest.mark.parametrize("where", ["middle_weight", "middle_norm", "one_element"])
def test_change_in_a_middle_layer_invalidates(built, where):
    model, wd = built
    block = model.model.layers[2]
    with torch.no_grad():
        if where == "middle_weight":
            block.mlp.up_proj.weight.mul_(1.01)      # keeps every tensor's sum proportional, not equal
        elif where == "middle_norm":
            block.input_layernorm.weight.add_(1e-3)
        else:
            w = block.self_attn.q_proj.weight
            w[3, 5], w[5, 3] = w[5, 3].clone(), w[3, 5].clone()  # a swap leaves every sum unchanged
    with pytest.raises(ValueError, match="fresh --workdir"):
        build_database(model, batches(), workdir=wd, progress=False)


def test_other_calibration_damping_or_grid_invalidates(built):
    model, wd = built
    with pytest.raises(ValueError, match="fresh --workdir"):
        build_database(model, batches(seed=2), workdir=wd, progress=False)
    with pytest.raises(ValueError, match="fresh --workdir"):
        build_database(model, batches(), workdir=wd, progress=False, damp=0.02)
    with pytest.raises(ValueError, match="fresh --workdir"):
        build_database(model, batches(), workdir=wd, progress=False,
                       grid_fn=functools.partial(layer_grid, ffn_multiple=16))
