"""ziplm_ext: inference-aware structured pruning (ZipLM) of transformer language models.

    family = ziplm_ext.prune(model, calibration, targets=[1.5, 2.0],
                             env=ziplm_ext.InferenceEnv(device="cpu", batch_size=1, seq_len=128))
    family.save("out/")
    model = ziplm_ext.load_pruned("out/target_1.5x")

A run is configured with :class:`PruneConfig` (``config=``); every name here loads on first use.
"""
__version__ = "0.1.0"

# Public name -> the module that defines it. Heavy modules (torch, transformers, the native
# extension) load only when one of their names is first used.
_EXPORTS = {
    "prune": "ziplm_ext.api",
    "load_pruned": "ziplm_ext.io.export",
    "InferenceEnv": "ziplm_ext.env",
    "LatencyTable": "ziplm_ext.stages.latency.table",
    "PruneConfig": "ziplm_ext.config",
    "CalibrationConfig": "ziplm_ext.config",
    "SearchConfig": "ziplm_ext.config",
    "MeasureConfig": "ziplm_ext.config",
    "TrainConfig": "ziplm_ext.config",
    "FlopConfig": "ziplm_ext.config",
    "DistillConfig": "ziplm_ext.stages.distill",
    "PrunedFamily": "ziplm_ext.results",
    "PrunedResult": "ziplm_ext.results",
    "UnreachableTargetError": "ziplm_ext.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ziplm_ext' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
