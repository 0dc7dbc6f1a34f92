"""What a pruning run returns: one :class:`PrunedResult` per target, gathered in a :class:`PrunedFamily`.

ZipLM produces a whole family of models, one per speedup target, in one run (ZipLM paper); every
method of the package (ZipLM one-shot and gradual, FLOP) returns its models in this form, and
:meth:`PrunedFamily.save` writes them (``family.json`` is what :mod:`ziplm_ext.report` renders).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch import nn

from ziplm_ext.env import InferenceEnv
from ziplm_ext.io.fileio import atomic_directory
from ziplm_ext.stages.latency.table import LatencyTable

__all__ = ["PrunedResult", "PrunedFamily", "result_dirname", "num_parameters", "MIN_SPEEDUP_FRACTION",
           "MAX_OVERSHOOT"]

MIN_SPEEDUP_FRACTION = 0.97  # a delivered model must measure at least this fraction of its target
MAX_OVERSHOOT = 1.10         # beyond this the model was pruned more than needed: re-fit and re-solve


@dataclass
class PrunedResult:
    """One pruned model. ``widths``: kept structures per layer name (FLOP: kept rank per layer path)."""

    target: float
    model: nn.Module
    widths: dict[str, int]
    predicted_speedup: float
    measured_speedup: Optional[float]
    calibration_loss: float
    num_parameters: int
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict = field(default_factory=dict)   # fine-tuning statistics (gradual mode, FLOP)

    @property
    def levels(self) -> dict[str, int]:
        """Deprecated name of :attr:`widths` (kept for one release)."""
        return self.widths

    def summary(self) -> dict:
        return dict(target=self.target, widths=self.widths, predicted_speedup=self.predicted_speedup,
                    measured_speedup=self.measured_speedup, calibration_loss=self.calibration_loss,
                    num_parameters=self.num_parameters, metrics=self.metrics, training=self.training)


@dataclass
class PrunedFamily:
    """The models of one run, the environment they were measured in, and what the report shows.

    ``baselines``: rows (``target``, ``widths``, ``predicted_speedup``, ``measured_speedup``,
    ``calibration_loss``, ``num_parameters``, ``metrics``) per baseline name.
    ``stage_seconds``: wall time per pipeline stage.
    """

    results: list[PrunedResult]
    env: InferenceEnv
    latency_table: Optional[LatencyTable]   # None for methods that do not search over a table (FLOP)
    dense_calibration_loss: float
    dense_num_parameters: int
    dense_metrics: dict[str, float]
    baselines: dict[str, list[dict]]
    stage_seconds: dict[str, float]
    model_name: str
    tokenizer: object = None
    method: str = "ZipLM"   # label of the results in reports: "ZipLM", "ZipLM gradual", "FLOP"

    def __iter__(self):
        return iter(self.results)

    def __len__(self):
        return len(self.results)

    def __getitem__(self, i) -> PrunedResult:
        return self.results[i]

    def summary(self) -> dict:
        dense_time = self.latency_table.dense_time if self.latency_table is not None else None
        return dict(model_name=self.model_name, method=self.method, env=self.env.to_dict(), dense_time=dense_time,
                    dense_calibration_loss=self.dense_calibration_loss, dense_num_parameters=self.dense_num_parameters,
                    dense_metrics=self.dense_metrics, results=[r.summary() for r in self.results],
                    baselines=self.baselines, stage_seconds=self.stage_seconds)

    def save(self, directory) -> Path:
        """Write ``target_<s>x/`` (one pruned model per target), ``latency_table.json`` and
        ``family.json`` into `directory`, atomically: nothing is left behind on failure. An existing
        `directory` must be empty."""
        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise OSError(f"output directory {target} exists and is not empty")
        writing = False
        try:
            with atomic_directory(target) as tmp:
                writing = True
                self._write_into(tmp)
        except OSError as exc:
            if writing:
                raise
            raise OSError(f"cannot write output directory {target}: {exc.strerror or exc}") from None
        return target

    def _write_into(self, directory: Path) -> None:
        from ziplm_ext.deploy.formats import export_for_engine
        from ziplm_ext.io.export import save_pruned

        for r in self.results:
            path = save_pruned(r.model, directory / result_dirname(r.target), extra=r.summary())
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(path)
            # the artefact the engine runs (model.gguf / model.onnx), inside the same atomic write
            export_for_engine(r.model, self.env, path, tokenizer=self.tokenizer)
        if self.latency_table is not None:
            self.latency_table.save(directory / "latency_table.json")
        (directory / "family.json").write_text(json.dumps(self.summary(), indent=2, default=float))


def result_dirname(target: float) -> str:
    return f"target_{target:g}x"


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
