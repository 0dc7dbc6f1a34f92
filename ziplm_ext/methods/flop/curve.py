"""Speedup targets for FLOP (Wang, Wohlwend, Lei, EMNLP 2020), which constrains parameters, not time.

**Speedup targets** (:func:`measure_speedup_curve`, :func:`density_for_speedups`): users ask for measured
speedups.  Uniform SVD-truncated variants (every factorised layer at the same density, exported through the
same path) are timed end to end against the dense model with
:func:`ziplm_ext.stages.latency.build.measure_speedups`; the density for a target is read off that curve
(monotone, linear in log-speedup between measured points).  After training, each model is measured again;
one that misses ``0.97 x`` its target is shrunk further (no more training: every layer's exported size
scaled by one factor read off the curve, :func:`shrink_factor`, the gates with the lowest ``log_alpha``
dropped) and re-measured, at most ``max_shrinks`` times.  Tiny models are dominated by framework overhead
(their low-rank variants measure below 1x), so there every target is unreachable.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ziplm_ext.config import FlopConfig
from ziplm_ext.env import InferenceEnv
from ziplm_ext.errors import UnreachableTargetError
from ziplm_ext.methods.flop.export import export_flop_model, exported_density, uniform_ranks
from ziplm_ext.methods.flop.factorize import factorize_model
from ziplm_ext.results import MIN_SPEEDUP_FRACTION
from ziplm_ext.stages.latency import build as latency  # measure_speedups looked up at call time (tests patch it)

__all__ = ["DEFAULT_CURVE_DENSITIES", "SpeedupCurve", "measure_speedup_curve", "density_for_speedups",
           "shrink_factor"]

DEFAULT_CURVE_DENSITIES = FlopConfig.curve_densities  # the densities timed for the curve (default of FlopConfig)


@dataclass
class SpeedupCurve:
    """Measured end-to-end speedups of uniform SVD-truncated variants against their density.

    ``densities`` / ``speedups``: the variants as measured (exported densities, ascending).  The
    dense model is the anchor (density 1, speedup 1).  Predictions use the running maximum from
    the dense side (more pruning is never predicted to be slower), with ``log(speedup)`` linear
    in the density between points.
    """

    densities: list[float]
    speedups: list[float]

    def __post_init__(self):
        if len(self.densities) != len(self.speedups) or not self.densities:
            raise ValueError("SpeedupCurve needs equally many (>= 1) densities and speedups")
        order = np.argsort(self.densities)
        self.densities = [float(self.densities[i]) for i in order]
        self.speedups = [float(self.speedups[i]) for i in order]

    def _points(self) -> tuple[np.ndarray, np.ndarray]:
        d = np.asarray(self.densities + [1.0])
        s = np.asarray(self.speedups + [1.0])
        return d, np.maximum.accumulate(s[::-1])[::-1]  # non-increasing in the density

    @property
    def max_speedup(self) -> float:
        return float(self._points()[1].max())

    def speedup_at(self, density: float) -> float:
        d, s = self._points()
        return float(np.exp(np.interp(density, d, np.log(s))))

    def density_for(self, target: float) -> float:
        """The largest density whose predicted speedup reaches ``target``."""
        d, s = self._points()
        if target > s.max():
            i = int(np.argmax(self.speedups))
            raise UnreachableTargetError(
                f"target {target:g}x unreachable: the fastest uniform low-rank variant measured "
                f"{self.speedups[i]:.2f}x (density {self.densities[i]:.2f}) in this environment")
        for hi in range(len(d) - 1, 0, -1):  # from the dense end towards lower densities
            lo = hi - 1
            if s[hi] >= target:
                return float(d[hi])
            if s[lo] >= target:
                frac = (math.log(target) - math.log(s[hi])) / (math.log(s[lo]) - math.log(s[hi]))
                return float(d[hi] + (d[lo] - d[hi]) * frac)
        return float(d[0])

    def to_dict(self) -> dict:
        return dict(densities=self.densities, speedups=self.speedups)


def measure_speedup_curve(model, env: InferenceEnv, densities: Sequence[float] = DEFAULT_CURVE_DENSITIES, *,
                          rounds: int = 15, factorized=None) -> SpeedupCurve:
    """Time uniform SVD-truncated variants of ``model`` (one per density, every factorised layer at
    :func:`~ziplm_ext.methods.flop.export.rank_for_density`) against ``model`` end to end, interleaved
    (:func:`ziplm_ext.stages.latency.build.measure_speedups`), and return the :class:`SpeedupCurve`.

    ``factorized``: an already factorised copy of ``model`` with untrained gates (saves the SVDs).
    """
    densities = sorted({float(d) for d in densities})
    if not densities or any(not 0 < d < 1 for d in densities):
        raise ValueError(f"curve densities must lie in (0, 1), got {densities}")
    if factorized is None:
        factorized = copy.deepcopy(model)
        factorize_model(factorized)
    variants = [export_flop_model(factorized, uniform_ranks(factorized, d), gate_value="deterministic")
                for d in densities]
    speeds = latency.measure_speedups(model, variants, env, rounds=rounds)
    measured = [exported_density(v) for v in variants]  # rounding moves each a little off its nominal value
    del variants
    return SpeedupCurve(measured, list(speeds))


def density_for_speedups(model, env: InferenceEnv, targets: Sequence[float], *,
                         densities: Sequence[float] = DEFAULT_CURVE_DENSITIES, rounds: int = 15,
                         curve: Optional[SpeedupCurve] = None) -> dict[float, float]:
    """The density of the FLOP layers needed for each speedup target in ``env``.

    FLOP constrains parameters, so a speedup target is mapped to a density through measurement:
    uniform SVD-truncated variants (:func:`measure_speedup_curve`) are timed end to end against the
    dense model; the density for a target is interpolated on that curve (made monotone, log-speedup
    linear in density, anchored at the dense model = density 1, speedup 1).  A target beyond the
    fastest variant raises :class:`~ziplm_ext.errors.UnreachableTargetError` naming that maximum.
    """
    curve = curve or measure_speedup_curve(model, env, densities, rounds=rounds)
    return {float(t): curve.density_for(float(t)) for t in targets}


def shrink_factor(curve: SpeedupCurve, target: float, measured: float, density: float) -> float:
    """Density factor expected to lift a model from ``measured`` to ``target``.

    Assumes the model's speedup follows the curve's shape, off by the ratio seen at its current
    density: it needs the density at which the curve reaches ``aim * curve(density) / measured``,
    aiming half the tolerance above the target (``aim = target * 1.015``) so that timing noise
    does not put the shrunk model just below ``MIN_SPEEDUP_FRACTION x target`` (0.97).
    """
    aim = target * (1 + (1 - MIN_SPEEDUP_FRACTION) / 2)
    want = aim * curve.speedup_at(density) / max(measured, 1e-9)
    d_new = curve.density_for(min(want, curve.max_speedup))
    return min(0.95, max(0.2, d_new / max(density, 1e-9)))
