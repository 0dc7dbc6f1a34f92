"""What a pruning run is configured with: frozen dataclasses, each field checked when it is built.

    config = PruneConfig(mode="gradual", calibration=CalibrationConfig(num_blocks=64),
                         train=TrainConfig(steps_per_target=200))
    family = ziplm_ext.prune(model, calibration, [1.5, 2.0], env, config, train_data=train)

A bad field raises one :class:`ValueError` naming it (``"CalibrationConfig.damp must be ..."``).
:class:`FlopConfig` also configures :func:`ziplm_ext.methods.flop.flop_prune` on its own.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

from ziplm_ext.stages.distill import DistillConfig

__all__ = ["CalibrationConfig", "SearchConfig", "MeasureConfig", "TrainConfig", "FlopConfig", "PruneConfig",
           "METHODS", "MODES", "BASELINES", "validate_targets"]

METHODS = ("ziplm", "flop")
MODES = ("oneshot", "gradual")
BASELINES = ("uniform", "magnitude")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(obj, name: str, low: int) -> None:
    v = getattr(obj, name)
    if not _is_int(v) or v < low:
        raise ValueError(f"{type(obj).__name__}.{name} must be an int >= {low}, got {v!r}")


def _number(obj, name: str, *, positive: bool) -> None:
    v = getattr(obj, name)
    if not _is_number(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{type(obj).__name__}.{name} must be a finite number {'>' if positive else '>='} 0, "
                         f"got {v!r}")


def _bool(obj, name: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, bool):
        raise ValueError(f"{type(obj).__name__}.{name} must be True or False, got {v!r}")


def _instance(obj, name: str, cls: type) -> None:
    v = getattr(obj, name)
    if not isinstance(v, cls):
        raise ValueError(f"{type(obj).__name__}.{name} must be a {cls.__name__}, got {type(v).__name__}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data and the OBS database.

    num_blocks: sequences tokenised from calibration texts (token ids are used as given).
    loss_blocks: of those, the sequences the search's calibration loss runs on.
    damp: Hessian dampening, relative to the mean diagonal.
    ffn_multiple: FFN widths of the level grid are multiples of this (8, 16, 32: hardware-friendly).
    resolve: after the widths are chosen, re-fit each kept out projection of the delivered one-shot
    models on inputs from their own pruned earlier layers (:mod:`ziplm_ext.stages.resolve`).
    """

    num_blocks: int = 64
    loss_blocks: int = 2
    damp: float = 0.01
    ffn_multiple: int = 1
    resolve: bool = True

    def __post_init__(self):
        _int_at_least(self, "num_blocks", 1)
        _int_at_least(self, "loss_blocks", 1)
        _number(self, "damp", positive=False)
        _int_at_least(self, "ffn_multiple", 1)
        _bool(self, "resolve")


@dataclass(frozen=True)
class SearchConfig:
    """The search: distinct calibration-loss evaluations per target -- the uniform seeds first, then SPDY,
    then local moves in width space (half each); half of them, at least 20, per re-solve after a table
    correction. Evaluations reuse the block outputs of earlier allocations (``StitchedLoss``)."""

    spdy_evaluations: int = 200

    def __post_init__(self):
        _int_at_least(self, "spdy_evaluations", 1)


@dataclass(frozen=True)
class MeasureConfig:
    """End-to-end timing in the inference environment.

    measure: time every model and correct the table until targets are met; False skips every
    measurement (``measured_speedup`` is None; for tests and dry runs).
    rounds: interleaved rounds of every end-to-end timing (and of the table's module overheads).
    latency_reps: timed repetitions per level when the latency table is built.
    max_corrections: table re-fits (and re-solves) for targets missed or overshot.
    """

    measure: bool = True
    rounds: int = 15
    latency_reps: int = 30
    max_corrections: int = 2

    def __post_init__(self):
        _bool(self, "measure")
        _int_at_least(self, "rounds", 1)
        _int_at_least(self, "latency_reps", 1)
        _int_at_least(self, "max_corrections", 0)


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning with distillation from the dense model (gradual mode, FLOP).

    steps_per_target: optimiser steps after each target (gradual) or per target model (FLOP).
    distill: the objective and optimiser (default: :class:`DistillConfig`'s defaults).
    """

    steps_per_target: int = 100
    distill: Optional[DistillConfig] = None

    def __post_init__(self):
        _int_at_least(self, "steps_per_target", 0)
        if self.distill is not None:
            _instance(self, "distill", DistillConfig)


@dataclass(frozen=True)
class FlopConfig:
    """FLOP (Wang, Wohlwend, Lei, EMNLP 2020): low-rank factorisation with hard-concrete gates.

    steps: training steps per target. lambda_lr: gradient-ascent step of the Lagrange multipliers.
    gate_lr: AdamW learning rate of the gates' log_alpha (the weights use the distillation lr).
    warmup_frac: fraction of the steps over which the target density ramps. lambda2_init: initial
    quadratic multiplier. measure_rounds: interleaved rounds of every end-to-end timing.
    curve_densities: densities of the uniform SVD-truncated variants timed for the speedup curve.
    max_shrinks: re-export / re-measure rounds for models that miss their target.

    Through :func:`ziplm_ext.prune` the run-wide settings come from :class:`PruneConfig`
    (``train.steps_per_target``, ``measure.rounds``, ``seed``, ``progress``); leave ``steps``,
    ``measure_rounds``, ``seed`` and ``progress`` here at their defaults there.
    """

    # Training defaults chosen on tiny random LLaMAs (2 and 4 blocks, 60-300 steps, targets 0.3-0.7):
    # the exported density ended within 0.02 of the target in every run with these values.
    steps: int = 200
    lambda_lr: float = 0.2
    gate_lr: float = 0.2
    warmup_frac: float = 0.5
    lambda2_init: float = 30.0
    measure_rounds: int = 15
    curve_densities: Sequence[float] = (0.15, 0.25, 0.35, 0.5, 0.65, 0.8, 0.9)
    max_shrinks: int = 2
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        _int_at_least(self, "steps", 1)
        _number(self, "lambda_lr", positive=True)
        _number(self, "gate_lr", positive=True)
        if not _is_number(self.warmup_frac) or not 0 <= self.warmup_frac <= 1:
            raise ValueError(f"FlopConfig.warmup_frac must lie in [0, 1], got {self.warmup_frac!r}")
        _number(self, "lambda2_init", positive=False)
        _int_at_least(self, "measure_rounds", 1)
        dens = tuple(self.curve_densities)
        if not dens or not all(_is_number(d) and 0 < d < 1 for d in dens):
            raise ValueError(f"FlopConfig.curve_densities must be densities in (0, 1), got {self.curve_densities!r}")
        object.__setattr__(self, "curve_densities", dens)
        _int_at_least(self, "max_shrinks", 0)
        _int_at_least(self, "seed", 0)
        _bool(self, "progress")


# FlopConfig fields that prune() takes from PruneConfig, with the PruneConfig field they come from.
FLOP_FIELDS_FROM_RUN = {"steps": "train.steps_per_target", "measure_rounds": "measure.rounds", "seed": "seed",
                        "progress": "progress"}


@dataclass(frozen=True)
class PruneConfig:
    """Everything :func:`ziplm_ext.prune` is configured with, besides the model, data and environment.

    method: "ziplm" or "flop". mode: "oneshot" (every target pruned from the dense model, no
    training) or "gradual" (targets in increasing order, each pruned from the previous, fine-tuned
    model; ZipLM only). baselines: any of "uniform" and "magnitude" (one-shot ZipLM only).
    seed: every random choice of the run. progress: progress bars. workdir: where the OBS
    database and the gradual checkpoints are kept (a re-run with the same workdir resumes).
    """

    method: str = "ziplm"
    mode: str = "oneshot"
    baselines: Sequence[str] = ()
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    flop: FlopConfig = field(default_factory=FlopConfig)
    seed: int = 0
    progress: bool = True
    workdir: Optional[Union[str, os.PathLike]] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (choose ziplm or flop)")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r} (choose oneshot or gradual)")
        if isinstance(self.baselines, str):
            raise ValueError(f"PruneConfig.baselines must be a sequence of names, got the string {self.baselines!r}")
        object.__setattr__(self, "baselines", tuple(self.baselines))
        for b in self.baselines:
            if b not in BASELINES:
                raise ValueError(f"unknown baseline {b!r} (choose from uniform, magnitude)")
        if self.baselines and self.method == "flop":
            raise ValueError("baselines are built by method='ziplm' runs only")
        if self.baselines and self.mode == "gradual":
            raise ValueError("baselines are built in mode='oneshot' only")
        for name, cls in (("calibration", CalibrationConfig), ("search", SearchConfig), ("measure", MeasureConfig),
                          ("train", TrainConfig), ("flop", FlopConfig)):
            _instance(self, name, cls)
        _int_at_least(self, "seed", 0)
        _bool(self, "progress")
        if self.workdir is not None and not isinstance(self.workdir, (str, os.PathLike)):
            raise ValueError(f"PruneConfig.workdir must be a path or None, got {type(self.workdir).__name__}")
        default = FlopConfig()
        for name, source in FLOP_FIELDS_FROM_RUN.items():
            if getattr(self.flop, name) != getattr(default, name):
                raise ValueError(f"PruneConfig.flop.{name} is taken from PruneConfig.{source}; set it there")

    def flop_config(self) -> FlopConfig:
        """The :class:`FlopConfig` of a ``method="flop"`` run, with the run-wide settings filled in."""
        return replace(self.flop, steps=self.train.steps_per_target, measure_rounds=self.measure.rounds,
                       seed=self.seed, progress=self.progress)


def validate_targets(targets) -> list[float]:
    """Speedup targets as a sorted list of distinct floats, each finite and > 1."""
    if isinstance(targets, (int, float)):
        targets = [targets]
    targets = [float(t) for t in targets]
    if not targets:
        raise ValueError("no speedup targets given")
    for t in targets:
        if not math.isfinite(t) or t <= 1.0:
            raise ValueError(f"speedup target must be > 1, got {t:g}")
    return sorted(set(targets))

