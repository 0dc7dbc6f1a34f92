"""The engine seam: what the latency stages need from an inference engine.

ZipLM times the model in the environment it will be deployed in (ZipLM paper: inference-aware
pruning against a latency table of the target environment).  An :class:`Engine` is that
environment's runtime: it times one attention / FFN block at a kept width on random weights of the
model's shapes (:class:`BlockTimer`), one unit of work of a whole model (:meth:`Engine.model_time`)
and real pruned models against the dense one (:meth:`Engine.speedups`).

The latency table, the search and the methods only talk to this interface, so another runtime
(llama.cpp, ONNX Runtime, ...) is one more implementation registered in
:func:`ziplm_ext.engines.get_engine`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Protocol, Sequence, runtime_checkable

from ziplm_ext.adapters.shapes import ModelShapes
from ziplm_ext.env import InferenceEnv

__all__ = ["BlockTimer", "Engine"]


@runtime_checkable
class BlockTimer(Protocol):
    """Times one attention or FFN block of fixed shapes at any kept width."""

    timer: str  # what times the blocks, recorded in a latency table's meta["timer"]

    def time_block(self, kind: str, width: int, warmup: int, reps: int) -> Any:
        """Per-repetition seconds of the block `kind` ("attn" / "ffn") with `width` structures
        kept: a float64 tensor (or sequence) of length `reps`, after `warmup` untimed runs."""
        ...


@runtime_checkable
class Engine(Protocol):
    """An inference runtime the latency stages time models with."""

    name: str

    def check(self, model, env: InferenceEnv) -> None:
        """Raise ``ValueError`` when `model` cannot run in `env` on this engine."""
        ...

    def block_timer(self, shapes: ModelShapes, env: InferenceEnv, timer: str = "auto", seed: int = 0,
                    *, stacklevel: int = 2) -> BlockTimer:
        """A :class:`BlockTimer` for blocks of `shapes` in `env`; `timer` picks the engine's clock
        (``"auto"``: the engine's best). `stacklevel` of the engine's warnings is as for
        :func:`warnings.warn` called in this method."""
        ...

    def model_time(self, model, env: InferenceEnv, *, reps: int = 30, warmup: int = 5) -> float:
        """Median seconds of one unit of work of `model` in `env` (a forward pass, or one decode step)."""
        ...

    def speedups(self, dense, models: Sequence, env: InferenceEnv, *, rounds: int = 15, reps_per_round: int = 3,
                 warmup: int = 3) -> List[float]:
        """End-to-end speedups of `models` over `dense`, measured interleaved."""
        ...

    def host_meta(self, env: InferenceEnv) -> Dict[str, Any]:
        """What a latency table records about the engine and the machine (versions, host, threads)."""
        ...

    def reference_meta(self, model, env: InferenceEnv, dense: float, reps: int, warmup: int,
                       *, stacklevel: int = 2) -> Dict[str, Any]:
        """Further measurements of the dense `model` worth recording in a latency table's meta next to
        its `dense` time (the torch engine: ``float32_dense_time`` for a half-precision CPU
        environment, with a warning when float32 is faster there)."""
        ...
