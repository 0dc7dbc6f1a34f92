"""ziplm_ext: inference-aware structured pruning (ZipLM) of transformer language models.

    family = ziplm_ext.prune(model, calibration, targets=[1.5, 2.0],
                             env=ziplm_ext.InferenceEnv(device="cpu", batch_size=1, seq_len=128))
    family.save("out/")
    model = ziplm_ext.load_pruned("out/target_1.5x")
"""
__version__ = "0.1.0"

from ziplm_ext.env import InferenceEnv  # noqa: E402
from ziplm_ext.stages.latency.table import LatencyTable  # noqa: E402

__all__ = ["InferenceEnv", "LatencyTable", "prune", "load_pruned", "PrunedFamily", "PrunedResult"]


def __getattr__(name):
    # Heavy modules (transformers, the native extension) load on first use.
    if name in ("prune", "PrunedFamily", "PrunedResult"):
        from ziplm_ext.methods import ziplm_oneshot as _prune

        return getattr(_prune, name)
    if name == "load_pruned":
        from ziplm_ext.io.export import load_pruned

        return load_pruned
    raise AttributeError(f"module 'ziplm_ext' has no attribute {name!r}")
