"""FLOP (Wang, Wohlwend, Lei, EMNLP 2020): structured pruning by low-rank factorisation with L0 gates.

    from ziplm_ext.methods.flop import FlopConfig, flop_prune

    family = flop_prune(model, train_ids, targets=[1.5, 2.0],
                        env=InferenceEnv(device="cpu", batch_size=1, seq_len=128),
                        config=FlopConfig(steps=200))

The method, one module per step (each module's docstring gives the details):

* :mod:`~ziplm_ext.methods.flop.factorize`: every linear layer of the transformer blocks becomes
  ``W = P diag(z) Q`` from its SVD, with hard concrete gates ``z`` (the modules themselves are in
  :mod:`ziplm_ext.layers`, so that serialisation needs no part of the method); the expected sizes.
* :mod:`~ziplm_ext.methods.flop.lagrangian`: the size constraint as an augmented Lagrangian, with a
  warm-up schedule of the target, scaled so that its pull per gate does not depend on the model's size.
* :mod:`~ziplm_ext.methods.flop.train`: distillation from the dense model plus the Lagrangian.
* :mod:`~ziplm_ext.methods.flop.export`: FLOP's inference rule (keep ``round(sum_k P(z_k != 0))`` gates
  per layer, fold their means in), thin pairs or dense layers, whichever is smaller.
* :mod:`~ziplm_ext.methods.flop.curve`: speedup targets mapped to densities on a measured curve of
  uniform SVD-truncated variants; shrinking a model that measures below its target.
* :mod:`~ziplm_ext.methods.flop.prune`: :func:`flop_prune`, the whole run for a list of targets, configured
  by :class:`ziplm_ext.config.FlopConfig` (re-exported here).
"""

from ziplm_ext.layers import BETA, GAMMA, INIT_LOG_ALPHA, ZETA, FactorizedLinear, HardConcreteGate, LowRankLinear
from ziplm_ext.config import FlopConfig
from ziplm_ext.methods.flop.curve import (DEFAULT_CURVE_DENSITIES, SpeedupCurve, density_for_speedups,
                                          measure_speedup_curve, shrink_factor)
from ziplm_ext.methods.flop.export import (export_flop_model, export_layer, exported_density, flop_ranks,
                                           hard_sparsity, model_ranks, rank_for_density, shrunk_ranks,
                                           uniform_ranks)
from ziplm_ext.methods.flop.factorize import (expected_density, factorize_model, factorized_density,
                                              factorized_layers, gate_sampling)
from ziplm_ext.methods.flop.lagrangian import LagrangianController, gate_scale
from ziplm_ext.methods.flop.prune import flop_prune
from ziplm_ext.methods.flop.train import train_flop

__all__ = [
    "BETA", "GAMMA", "ZETA", "INIT_LOG_ALPHA", "DEFAULT_CURVE_DENSITIES",
    "HardConcreteGate", "FactorizedLinear", "LowRankLinear", "LagrangianController", "gate_scale", "SpeedupCurve",
    "FlopConfig",
    "factorize_model", "factorized_layers", "gate_sampling", "expected_density", "factorized_density",
    "export_flop_model", "export_layer", "flop_ranks", "rank_for_density", "uniform_ranks", "model_ranks",
    "shrunk_ranks", "hard_sparsity", "exported_density",
    "measure_speedup_curve", "density_for_speedups", "shrink_factor", "train_flop", "flop_prune",
]
