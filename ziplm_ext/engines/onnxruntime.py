"""The ONNX Runtime engine: BERT-family encoders run as exported ONNX graphs in an ONNX Runtime
CPU ``InferenceSession`` (``intra_op_num_threads = env.threads``, one inter-op thread).

ZipLM measures speedups in the environment the model is deployed in (ZipLM paper, section 3.3);
for encoders that is ONNX Runtime, so the latency table and the end-to-end checks time what
ONNX Runtime runs, never PyTorch.

Environments: ``InferenceEnv(engine="onnxruntime", device="cpu", dtype="float32",
mode="prefill", batch_size=B, seq_len=S, threads=T)``; one timed unit is one forward pass over
``B x S`` tokens (random token ids, an attention mask of ones, token types zero).

Design of the per-layer width costs (:class:`OnnxBlockTimer`)
-------------------------------------------------------------
Each (kind, width) the latency table needs gets its **own artefact with all blocks at that
width**: a chain of ``depth`` (default :data:`STACK_DEPTH` = 6, MiniLM's depth) blocks, each on
its own random weights of the model's shapes (hidden size, head size), built the way
:func:`ziplm_ext.deploy.onnx.export_onnx` builds the whole model:

* ``attn`` at ``k`` heads: ``LN(x + o(attention(q(x), k(x), v(x))))`` with ``k`` heads, exported
  with the head count ``k`` in its reshape and run through ONNX Runtime's transformer optimiser,
  so each block is the same fused ``Attention`` + ``SkipLayerNormalization`` a pruned block with
  ``k`` heads becomes in the exported model;
* ``ffn`` at ``k`` neurons: ``LN(x + down(gelu(up(x))))`` (``MatMul`` + ``BiasGelu`` + ``MatMul``
  + ``SkipLayerNormalization`` after optimisation).

One timing is one ``session.run`` over ``(B, S, hidden)`` inputs around ``time.perf_counter``,
divided by ``depth``: the per-block cost at that width.  Every block of a dense BERT has the same
shapes, so one artefact per (kind, width) serves all blocks (as for the torch engine).  Why a
chain and not one block: a lone block re-reads the same few weights on every run and, measured
on this project's 2-core machine, timed narrow attention blocks (3 or 6 of MiniLM's 12 heads)
3-4x faster than the same blocks inside a chain, while full-width blocks timed alike; a table
built from lone blocks predicted 5.1x for a MiniLM with 3 heads and 384 FFN neurons per block
that measured 3.1x end to end; one built from chains predicted 2.9x (and 1.80x / 1.63x for
models measured at 1.69x / 1.70x).  The chain sees what a block sees inside the model: the
weights of the blocks before it have passed through the caches.  The artefacts are built lazily at the first timing of a width and kept
as sessions.  What blocks cannot see -- the fixed per-module cost in the whole graph (a removed
module still leaves ``LayerNorm(x + bias)``) -- is measured end to end by
:func:`ziplm_ext.stages.latency.build.add_module_overheads` through
:meth:`OnnxRuntimeEngine.speedups`, like for every engine.

End to end (:meth:`OnnxRuntimeEngine.model_time`, :meth:`OnnxRuntimeEngine.speedups`): each model
(a HF BERT model, dense or pruned, or the path of an ``.onnx`` file such as a family member's
``model.onnx``) is exported with :func:`~ziplm_ext.deploy.onnx.export_onnx` -- the artefact
``ziplm export --format onnx`` writes -- and timed in its own session; speedups are interleaved
round-robin with the dense model (direction alternating between rounds), as for the torch engine.

Needs the ``onnx`` extra (``pip install .[onnx]``).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ziplm_ext.adapters.shapes import ModelShapes
from ziplm_ext.deploy.onnx import bert_widths, export_bert_block, export_onnx, onnx_session, require_onnx
from ziplm_ext.engines.torch_eager import host_name
from ziplm_ext.env import InferenceEnv

__all__ = ["OnnxRuntimeEngine", "OnnxBlockTimer", "check_onnx_env", "ModelRunner", "STACK_DEPTH"]

TIMER = "onnxruntime"
STACK_DEPTH = 6  # blocks per width artefact (see the module docstring)


def check_onnx_env(env: InferenceEnv) -> None:
    """`env` is one ONNX Runtime's CPU engine can time: prefill, CPU, float32."""
    if env.mode != "prefill":
        raise ValueError(f"the onnxruntime engine times encoders, mode='prefill' only (got mode={env.mode!r})")
    if env.device != "cpu":
        raise ValueError(f"the onnxruntime engine runs on the CPU (device='cpu'), got device={env.device!r}")
    if env.dtype != "float32":
        raise ValueError(f"the onnxruntime engine runs float32 exports, got dtype={env.dtype!r}")


def _timed_runs(session, feed: Dict[str, np.ndarray], n: int) -> List[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.run(None, feed)
        out.append(time.perf_counter() - t0)
    return out


class OnnxBlockTimer:
    """Times one single-block ONNX artefact per (kind, width) in ONNX Runtime (see the module
    docstring for the design)."""

    timer = TIMER

    def __init__(self, shapes: ModelShapes, env: InferenceEnv, seed: int = 0, depth: int = STACK_DEPTH):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        if shapes.causal or shapes.gated or shapes.num_kv_heads != shapes.num_heads:
            raise ValueError("the onnxruntime engine times BERT-family encoder blocks only "
                             "(non-causal, ungated FFN, one KV head per query head)")
        check_onnx_env(env)
        require_onnx()
        self.s, self.env, self.seed, self.depth = shapes, env, seed, depth
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(env.batch_size, env.seq_len, shapes.hidden, generator=g).numpy()
        self._feeds = {"attn": {"hidden_states": x, "attention_mask": np.ones((env.batch_size, env.seq_len), np.int64)},
                       "ffn": {"hidden_states": x}}
        self._sessions: Dict[Tuple[str, int], Any] = {}

    def _session(self, kind: str, width: int):
        key = (kind, int(width))
        if key not in self._sessions:
            full = self.s.num_heads if kind == "attn" else self.s.d_ff
            if not 1 <= width <= full:
                raise ValueError(f"{kind} width {width} outside [1, {full}]")
            with tempfile.TemporaryDirectory(prefix="ziplm-ort-block-") as tmp:
                path = export_bert_block(kind, int(width), self.s.hidden, self.s.head_dim,
                                         os.path.join(tmp, "block.onnx"), seed=self.seed, depth=self.depth)
                self._sessions[key] = onnx_session(path, self.env.threads)  # the session holds the graph
        return self._sessions[key]

    def time_block(self, kind: str, width: int, warmup: int, reps: int) -> torch.Tensor:
        """Per-repetition seconds of one block (float64, length ``reps``): runs of the width's
        artefact after `warmup` untimed runs, each divided by the artefact's depth."""
        session = self._session(kind, width)
        _timed_runs(session, self._feeds[kind], warmup)
        return torch.tensor(_timed_runs(session, self._feeds[kind], reps), dtype=torch.float64) / self.depth


class ModelRunner:
    """A model's ONNX artefact in an ONNX Runtime session with fixed random inputs of `env`.

    `model`: a HF BERT model (exported with :func:`~ziplm_ext.deploy.onnx.export_onnx`) or the
    path of an ``.onnx`` file with the exporter's inputs."""

    def __init__(self, model, env: InferenceEnv, vocab_size: int, seed: int = 0):
        if isinstance(model, (str, os.PathLike)):
            if not Path(model).is_file():
                raise ValueError(f"{model}: no such ONNX file")
            self.session = onnx_session(model, env.threads)
        else:
            with tempfile.TemporaryDirectory(prefix="ziplm-ort-model-") as tmp:
                self.session = onnx_session(export_onnx(model, os.path.join(tmp, "model.onnx")), env.threads)
        g = torch.Generator().manual_seed(seed)
        shape = (env.batch_size, env.seq_len)
        feed = {"input_ids": torch.randint(0, int(vocab_size), shape, generator=g).numpy(),
                "attention_mask": np.ones(shape, np.int64), "token_type_ids": np.zeros(shape, np.int64)}
        names = {i.name for i in self.session.get_inputs()}
        missing = sorted(names - set(feed))
        if missing:
            raise ValueError(f"ONNX model has input(s) {', '.join(missing)} the onnxruntime engine does not feed; "
                             "export it with ziplm_ext.deploy.onnx.export_onnx")
        self.feed = {k: v for k, v in feed.items() if k in names}

    def times(self, n: int) -> List[float]:
        return _timed_runs(self.session, self.feed, n)


def _vocab_size(model) -> int:
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    return int(v) if v else 2


class OnnxRuntimeEngine:
    """:class:`~ziplm_ext.engines.base.Engine` of ONNX Runtime on the CPU (BERT-family encoders)."""

    name = "onnxruntime"

    def check(self, model, env: InferenceEnv) -> None:
        check_onnx_env(env)
        require_onnx()
        if not isinstance(model, (str, os.PathLike)):
            bert_widths(model)

    def block_timer(self, shapes: ModelShapes, env: InferenceEnv, timer: str = "auto", seed: int = 0,
                    *, stacklevel: int = 2) -> OnnxBlockTimer:
        """`timer`: ``"auto"`` or ``"onnxruntime"`` (the one clock: ``session.run`` timed with
        ``time.perf_counter``)."""
        if timer not in ("auto", TIMER):
            raise ValueError(f"the onnxruntime engine's timer is 'auto' or {TIMER!r}, got {timer!r}")
        return OnnxBlockTimer(shapes, env, seed)

    def model_time(self, model, env: InferenceEnv, *, reps: int = 30, warmup: int = 5) -> float:
        """Median seconds of one ONNX Runtime forward pass of `model`'s exported artefact."""
        if reps < 1 or warmup < 0:
            raise ValueError(f"need reps >= 1 and warmup >= 0 (got {reps}, {warmup})")
        self.check(model, env)
        runner = ModelRunner(model, env, _vocab_size(model))
        runner.times(warmup)
        return statistics.median(runner.times(reps))

    def speedups(self, dense, models: Sequence, env: InferenceEnv, *, rounds: int = 15, reps_per_round: int = 3,
                 warmup: int = 3) -> List[float]:
        """``median(dense times) / median(model_i times)`` of the exported artefacts, measured
        interleaved (each round: `reps_per_round` runs of the dense model, then of each model,
        direction alternating between rounds); all get the same input, built from ``dense``'s
        vocabulary."""
        if rounds < 1 or reps_per_round < 1:
            raise ValueError(f"need rounds >= 1 and reps_per_round >= 1 (got {rounds}, {reps_per_round})")
        for m in [dense, *models]:
            self.check(m, env)
        vocab = _vocab_size(dense)
        runners = [ModelRunner(m, env, vocab) for m in [dense, *models]]
        for r in runners:
            r.times(warmup)
        times: List[List[float]] = [[] for _ in runners]
        idx = list(range(len(runners)))
        for rnd in range(rounds):
            for i in idx if rnd % 2 == 0 else idx[::-1]:
                times[i].extend(runners[i].times(reps_per_round))
        td = statistics.median(times[0])
        return [td / statistics.median(t) for t in times[1:]]

    def host_meta(self, env: InferenceEnv) -> Dict[str, Any]:
        onnx, ort = require_onnx()
        return {
            "onnxruntime_version": ort.__version__,
            "onnx_version": onnx.__version__,
            "host": host_name(torch.device("cpu")),
            "num_threads": env.threads if env.threads is not None else "onnxruntime default",
        }

    def reference_meta(self, model, env: InferenceEnv, dense: float, reps: int, warmup: int,
                       *, stacklevel: int = 2) -> Dict[str, Any]:
        return {}
