"""The llama.cpp engine: models run as GGUF files (``deci`` architecture) in llama.cpp on the CPU.

ZipLM measures speedups in the environment the model is deployed in (ZipLM paper, section 3.3);
for LLaMA-family decoders on a CPU that is llama.cpp.  Every model this engine times is first
exported with :func:`ziplm_ext.deploy.gguf.export_gguf` in the environment's weight format
(``env.dtype`` float32 -> F32, float16 -> F16; an ``env.quant`` attribute, when the environment
has one, -> that llama.cpp quantisation) and then timed through llama.cpp's C API
(llama-cpp-python's low-level bindings).  A path to a ``.gguf`` file is timed as it is.

Units of work (``env.threads`` CPU threads; None: every CPU this process may run on):

* ``mode="prefill"``: one ``llama_decode`` of ``batch_size`` sequences of ``seq_len`` tokens each
  (logits of each sequence's last token), on an empty KV cache;
* ``mode="decode"``: one generation step, i.e. one ``llama_decode`` of one new token per
  sequence at a KV cache of ``seq_len`` earlier tokens; the step's token is removed from the cache
  again after each timed call (outside the timed region), so every step sees the same context.

Per-layer width costs (:class:`LlamaCppBlockTimer`), measured from GGUF artefacts built for the
engine, by differences.  Each artefact has the model's hidden size, head size and weight format,
random weights, a small vocabulary and ``N + 2`` blocks: an *anchor* block at each end (one KV
group of attention and a one-neuron FFN; llama.cpp needs attention in block 0 and a non-empty
FFN in the last block, see :mod:`ziplm_ext.deploy.gguf`) around ``N`` *varied* blocks:

* attention at ``g`` KV groups: varied blocks with ``g`` groups and a one-neuron FFN, against the
  same artefact whose varied blocks have no attention (the one-neuron FFN stays: a block with
  attention needs one in llama.cpp);
* FFN at width ``f``: varied blocks without attention and an FFN of width ``f``, against the
  artefact whose varied blocks are empty (identity blocks).

The two artefacts of a pair are timed alternately; one repetition's block time is the difference
of the pair's unit-of-work times divided by ``N`` (clamped at zero), so the anchors, embedding,
head and the per-call overhead cancel and what remains is what one module of that width costs
inside a llama.cpp graph, its norm and residual add included.

Artefacts exported for timing and loaded llama.cpp contexts are cached for the life of the
process (exports keyed by the model object and its shapes, contexts least-recently-used), so
repeated timing calls on the same models do not re-export or re-load them.  llama.cpp's log is
quiet (errors only).  Needs the ``llamacpp`` extra (``pip install .[llamacpp]``).
"""
from __future__ import annotations

import atexit
import math
import os
import shutil
import statistics
import tempfile
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ziplm_ext.adapters.shapes import ModelShapes
from ziplm_ext.deploy.gguf import (
    EXTRA_HINT,
    DeciBlock,
    DeciModel,
    check_llama,
    complete_blocks,
    export_gguf,
    quantize_gguf,
    require_llama_cpp,
    write_deci_gguf,
)
from ziplm_ext.engines.torch_eager import host_name
from ziplm_ext.env import InferenceEnv

__all__ = ["LlamaCppEngine", "LlamaCppModel", "LlamaCppBlockTimer", "gguf_format", "default_threads",
           "BLOCKS_PER_ARTEFACT", "EXTRA_HINT"]

BLOCKS_PER_ARTEFACT = 4  # N varied blocks per block-timing artefact
_TIMING_VOCAB = 256  # vocabulary of the block-timing artefacts (keeps embedding and head negligible)
_MAX_CONTEXTS = 6  # loaded llama.cpp contexts kept (least recently used dropped first)
_DTYPE_FORMATS = {"float32": "f32", "float16": "f16"}


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def gguf_format(env: InferenceEnv) -> Tuple[str, Optional[str]]:
    """``(dtype, quant)`` of the GGUF files timed in `env` (see the module docstring)."""
    if env.dtype not in _DTYPE_FORMATS:
        raise ValueError(f"the llama.cpp engine runs float32 or float16 GGUF weights, not {env.dtype!r}")
    return _DTYPE_FORMATS[env.dtype], getattr(env, "quant", None)


# --------------------------------------------------------------------------------------
# one GGUF model in llama.cpp
# --------------------------------------------------------------------------------------


class LlamaCppModel:
    """A GGUF file loaded in llama.cpp with one context of `n_ctx` cells for up to `n_seq` sequences.

    `kv_f32`: keep the KV cache in F32 (llama.cpp's default, used for timing, is F16; parity checks
    against PyTorch float32 use F32)."""

    def __init__(self, path, *, n_ctx: int, n_seq: int = 1, threads: Optional[int] = None, kv_f32: bool = False):
        lc = self._lc = require_llama_cpp()
        lc.llama_backend_init()
        self.path = str(path)
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(self.path.encode(), mp)
        if not self.model:
            raise ValueError(f"llama.cpp could not load the GGUF file {self.path}")
        self.n_ctx, self.n_seq = int(n_ctx), int(n_seq)
        self.threads = int(threads or default_threads())
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_seq_max = self.n_ctx, self.n_ctx, self.n_seq
        cp.n_ubatch = min(self.n_ctx, 512)
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.no_perf = True
        if kv_f32:  # and no flash attention, whose CPU kernel rounds Q and K products through F16
            cp.type_k = cp.type_v = int(lc.GGML_TYPE_F32)
            cp.flash_attn_type = int(lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise ValueError(f"llama.cpp could not create a context for {self.path} (n_ctx={n_ctx})")
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model)))
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(self.n_ctx, 0, self.n_seq)
        self._decode_state = None
        self._finalizer = weakref.finalize(self, _free, lc, self.model, self.ctx, self.batch)

    def close(self) -> None:
        self._finalizer()

    def clear(self) -> None:
        """Empty the KV cache."""
        self._lc.llama_memory_clear(self.mem, True)
        self._decode_state = None  # no decode stepper's prompt in the cache any more

    def fill(self, seqs: Sequence[Sequence[int]], start: int, logits: str = "last") -> None:
        """Put sequence `s`'s tokens at positions ``start, start+1, ...`` into the batch; `logits`:
        ``"all"`` or ``"last"`` (each sequence's last token)."""
        b, i = self.batch, 0
        for s, ids in enumerate(seqs):
            for j, t in enumerate(ids):
                if i >= self.n_ctx:
                    raise ValueError(f"{sum(map(len, seqs))} tokens do not fit the context of {self.n_ctx}")
                b.token[i], b.pos[i], b.n_seq_id[i] = int(t), start + j, 1
                b.seq_id[i][0] = s
                b.logits[i] = logits == "all" or j == len(ids) - 1
                i += 1
        b.n_tokens = i

    def run(self) -> None:
        """``llama_decode`` of the current batch (synchronised)."""
        rc = self._lc.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} ({self.path})")
        self._lc.llama_synchronize(self.ctx)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """``(len(ids), vocab)`` float32 logits at every position of one sequence, from an empty cache."""
        ids = [int(t) for t in ids]
        if not ids or len(ids) > self.n_ctx:
            raise ValueError(f"need 1 to {self.n_ctx} token ids, got {len(ids)}")
        self.clear()
        self.fill([ids], 0, "all")
        self.run()
        ptr = self._lc.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(ids), self.n_vocab)).copy()

    def generate(self, ids: Sequence[int], n: int) -> List[int]:
        """`n` greedy tokens after the prompt `ids` (KV cache decoding)."""
        ids = [int(t) for t in ids]
        if len(ids) + n > self.n_ctx:
            raise ValueError(f"prompt {len(ids)} + {n} new tokens exceed the context of {self.n_ctx}")
        self.clear()
        self.fill([ids], 0, "last")
        out: List[int] = []
        for k in range(n):
            self.run()
            row = np.ctypeslib.as_array(self._lc.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            out.append(int(row.argmax()))
            self.fill([[out[-1]]], len(ids) + k, "last")
        return out

    def perplexity(self, blocks) -> float:
        """``exp(mean next-token NLL)`` over the rows of `blocks` ``(N, T)`` (as
        :func:`ziplm_ext.eval.metrics.perplexity` computes it in PyTorch)."""
        total, count = 0.0, 0
        for row in np.asarray(blocks):
            lg = self.logits(row).astype(np.float64)[:-1]
            m = lg.max(-1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(lg - m).sum(-1)))
            total += float((lse - lg[np.arange(len(lg)), row[1:]]).sum())
            count += len(lg)
        return math.exp(total / count)


def _free(lc, model, ctx, batch) -> None:
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)


# --------------------------------------------------------------------------------------
# timed units of work
# --------------------------------------------------------------------------------------

_CONTEXTS: "OrderedDict[tuple, LlamaCppModel]" = OrderedDict()


def _context(path, env: InferenceEnv) -> LlamaCppModel:
    """The cached llama.cpp context of the GGUF file `path` sized for `env`."""
    p = Path(path)
    st = p.stat()
    n_seq = env.batch_size
    n_ctx = n_seq * (env.seq_len + 1)
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size, n_ctx, n_seq, env.threads or default_threads())
    if key in _CONTEXTS:
        _CONTEXTS.move_to_end(key)
        return _CONTEXTS[key]
    while len(_CONTEXTS) >= _MAX_CONTEXTS:  # freed when its last user drops it (finalizer)
        _CONTEXTS.popitem(last=False)
    _CONTEXTS[key] = LlamaCppModel(p, n_ctx=n_ctx, n_seq=n_seq, threads=env.threads)
    return _CONTEXTS[key]


class _Stepper:
    """One timed unit of work of a loaded model in `env` (module docstring); the inputs are random
    token ids drawn with a fixed seed, the same for every model of one vocabulary."""

    def __init__(self, lm: LlamaCppModel, env: InferenceEnv, seed: int = 0):
        self.lm, self.env = lm, env
        rng = np.random.default_rng(seed)
        self.prompt = rng.integers(0, lm.n_vocab, size=(env.batch_size, env.seq_len)).tolist()
        self.next = [row[-1] for row in self.prompt]
        self.decode = env.mode == "decode"

    def _prepare(self) -> None:  # outside the timed region
        lm, s = self.lm, self.env.seq_len
        if not self.decode:
            lm.clear()
            lm.fill(self.prompt, 0)
            return
        if lm._decode_state is not self:  # the cache holds another prompt
            lm.clear()
            lm.fill(self.prompt, 0)
            lm.run()
            lm._decode_state = self
        else:
            lm._lc.llama_memory_seq_rm(lm.mem, -1, s, -1)
        lm.fill([[t] for t in self.next], s)

    def __call__(self) -> float:
        self._prepare()
        t0 = time.perf_counter()
        self.lm.run()
        return time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# artefacts of the models to time
# --------------------------------------------------------------------------------------

_EXPORTS: Dict[tuple, Tuple[Any, Path]] = {}
_TMP: List[str] = []


def _tmpdir() -> str:
    if not _TMP:
        _TMP.append(tempfile.mkdtemp(prefix="ziplm-llamacpp-"))
        atexit.register(shutil.rmtree, _TMP[0], True)
    return _TMP[0]


def _shapes_key(model) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def artefact(model, env: InferenceEnv) -> Path:
    """The GGUF file `model` runs as in `env`: `model` itself when it is a path, else a cached
    export (keyed by the model object, its parameter shapes and the weight format)."""
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if not p.is_file():
            raise ValueError(f"llama.cpp engine: GGUF file {p} not found")
        return p
    dtype, quant = gguf_format(env)
    key = (id(model), _shapes_key(model), dtype, quant)
    hit = _EXPORTS.get(key)
    if hit is not None and hit[0]() is model and hit[1].is_file():
        return hit[1]
    fd, name = tempfile.mkstemp(suffix=".gguf", dir=_tmpdir())
    os.close(fd)
    path = export_gguf(model, name, dtype=dtype, quant=quant)
    _EXPORTS[key] = (weakref.ref(model), path)
    weakref.finalize(model, _forget, key, path)  # the file goes with the model
    return path


def _forget(key: tuple, path: Path) -> None:
    _EXPORTS.pop(key, None)
    try:
        path.unlink()
    except OSError:
        pass


def measure_model_time(model, env: InferenceEnv, *, reps: int = 30, warmup: int = 5) -> float:
    """Median seconds of one unit of work of `model` (a model or a GGUF path) in llama.cpp."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0 (got {reps}, {warmup})")
    step = _Stepper(_context(artefact(model, env), env), env)
    for _ in range(warmup):
        step()
    return statistics.median(step() for _ in range(reps))


def measure_speedups(dense, models: Sequence, env: InferenceEnv, *, rounds: int = 15, reps_per_round: int = 3,
                     warmup: int = 3) -> List[float]:
    """``median(dense times) / median(model_i times)`` in llama.cpp, interleaved round-robin (direction
    alternating between rounds) so that a shared machine's drift hits every model alike."""
    if rounds < 1 or reps_per_round < 1:
        raise ValueError(f"need rounds >= 1 and reps_per_round >= 1 (got {rounds}, {reps_per_round})")
    paths = [artefact(m, env) for m in [dense, *models]]
    steps = [_Stepper(_context(p, env), env) for p in paths]
    times: List[List[float]] = [[] for _ in steps]
    for st in steps:
        for _ in range(warmup):
            st()
    idx = list(range(len(steps)))
    for r in range(rounds):
        for i in idx if r % 2 == 0 else idx[::-1]:
            times[i].extend(steps[i]() for _ in range(reps_per_round))
    td = statistics.median(times[0])
    return [td / statistics.median(t) for t in times[1:]]


# --------------------------------------------------------------------------------------
# per-layer width costs
# --------------------------------------------------------------------------------------


def _anchor(d: int, hd: int, q_per: int, rnd) -> DeciBlock:
    return DeciBlock(q_per, 1, 1, {
        "attn_norm": np.ones(d, np.float32), "attn_q": rnd(q_per * hd, d), "attn_k": rnd(hd, d),
        "attn_v": rnd(hd, d), "attn_output": rnd(d, q_per * hd), "ffn_norm": np.ones(d, np.float32),
        "ffn_gate": rnd(1, d), "ffn_up": rnd(1, d), "ffn_down": rnd(d, 1)})


def _varied(kind: str, width: int, s: ModelShapes, rnd) -> DeciBlock:
    d, hd, ones = s.hidden, s.head_dim, np.ones(s.hidden, np.float32)
    if kind == "attn":
        if width == 0:
            return DeciBlock(0, 0, 1, {"ffn_norm": ones, "ffn_gate": rnd(1, d), "ffn_up": rnd(1, d),
                                       "ffn_down": rnd(d, 1)})
        nq = width * s.q_per_structure
        return DeciBlock(nq, width, 1, {
            "attn_norm": ones, "attn_q": rnd(nq * hd, d), "attn_k": rnd(width * hd, d), "attn_v": rnd(width * hd, d),
            "attn_output": rnd(d, nq * hd), "ffn_norm": ones, "ffn_gate": rnd(1, d), "ffn_up": rnd(1, d),
            "ffn_down": rnd(d, 1)})
    if width == 0:
        return DeciBlock(0, 0, 0, {})
    return DeciBlock(0, 0, width, {"ffn_norm": ones, "ffn_gate": rnd(width, d), "ffn_up": rnd(width, d),
                                   "ffn_down": rnd(d, width)})


def timing_artefact(shapes: ModelShapes, kind: str, width: int, seed: int = 0) -> DeciModel:
    """The block-timing artefact (module docstring) whose varied blocks hold `kind` at `width`
    (0: the pair's reference without that module)."""
    if kind not in ("attn", "ffn"):
        raise ValueError(f"block kind must be 'attn' or 'ffn', got {kind!r}")
    g = np.random.default_rng(seed)
    d = shapes.hidden

    def rnd(*shape):
        return (g.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[-1])).astype(np.float32)

    blocks = [_anchor(d, shapes.head_dim, shapes.q_per_structure, rnd)]
    blocks += [_varied(kind, width, shapes, rnd) for _ in range(BLOCKS_PER_ARTEFACT)]
    blocks.append(_anchor(d, shapes.head_dim, shapes.q_per_structure, rnd))
    return DeciModel(hidden=d, head_dim=shapes.head_dim, context_length=4096, rms_eps=1e-5, rope_theta=10000.0,
                     token_embd=rnd(_TIMING_VOCAB, d), output_norm=np.ones(d, np.float32), output=None,
                     blocks=complete_blocks(blocks, d, shapes.head_dim), name="ziplm-block-timing")


class LlamaCppBlockTimer:
    """Times one attention / FFN block of `shapes` at a kept width inside llama.cpp graphs, from
    pairs of GGUF artefacts built for the engine (module docstring)."""

    timer = "llama.cpp"

    def __init__(self, shapes: ModelShapes, env: InferenceEnv, seed: int = 0):
        if not shapes.gated or not shapes.causal:
            raise ValueError("the llama.cpp engine times LLaMA-family decoders (gated FFN, causal attention) only")
        self.s, self.env, self.seed = shapes, env, seed
        self.dtype, self.quant = gguf_format(env)
        self.dir = tempfile.mkdtemp(prefix="ziplm-llamacpp-blocks-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, True)
        self._steps: Dict[Tuple[str, int], _Stepper] = {}
        self._models: Dict[Tuple[str, int], LlamaCppModel] = {}

    def _step(self, kind: str, width: int) -> _Stepper:
        key = (kind, width)
        if key not in self._steps:
            base = Path(self.dir) / f"{kind}-{width}"
            path = write_deci_gguf(timing_artefact(self.s, kind, width, self.seed), f"{base}.f.gguf", dtype=self.dtype)
            if self.quant is not None:
                path = quantize_gguf(path, f"{base}.q.gguf", self.quant, threads=self.env.threads)
            env = self.env
            lm = LlamaCppModel(path, n_ctx=env.batch_size * (env.seq_len + 1), n_seq=env.batch_size,
                               threads=env.threads)
            self._models[key] = lm  # owned here, not in the shared context cache
            self._steps[key] = _Stepper(lm, env, self.seed)
        return self._steps[key]

    def time_block(self, kind: str, width: int, warmup: int, reps: int) -> torch.Tensor:
        """Per-repetition seconds of one `kind` block at `width` (float64, length `reps`)."""
        if width < 1:
            raise ValueError(f"kept width must be >= 1, got {width}")
        full, ref = self._step(kind, width), self._step(kind, 0)
        for _ in range(warmup):
            full(), ref()
        out = []
        for r in range(reps):  # alternate which of the pair runs first
            if r % 2 == 0:
                a = full()
                b = ref()
            else:
                b = ref()
                a = full()
            out.append(max(0.0, (a - b) / BLOCKS_PER_ARTEFACT))
        return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------


class LlamaCppEngine:
    """:class:`~ziplm_ext.engines.base.Engine` of llama.cpp (GGUF, CPU)."""

    name = "llama.cpp"

    def check(self, model, env: InferenceEnv) -> None:
        require_llama_cpp()
        if env.device != "cpu":
            raise ValueError(f"the llama.cpp engine runs on the CPU; env.device is {env.device!r}")
        gguf_format(env)
        if not isinstance(model, (str, os.PathLike)):
            check_llama(model)

    def block_timer(self, shapes: ModelShapes, env: InferenceEnv, timer: str = "auto", seed: int = 0,
                    *, stacklevel: int = 2) -> LlamaCppBlockTimer:
        """`timer`: ``"auto"`` or ``"llama.cpp"`` (the only clock: llama.cpp graphs timed with
        ``time.perf_counter``)."""
        if timer not in ("auto", "llama.cpp"):
            raise ValueError(f"the llama.cpp engine's block timer is 'auto' or 'llama.cpp', got {timer!r}")
        require_llama_cpp()
        return LlamaCppBlockTimer(shapes, env, seed)

    def model_time(self, model, env: InferenceEnv, *, reps: int = 30, warmup: int = 5) -> float:
        self.check(model, env)
        return measure_model_time(model, env, reps=reps, warmup=warmup)

    def speedups(self, dense, models: Sequence, env: InferenceEnv, *, rounds: int = 15, reps_per_round: int = 3,
                 warmup: int = 3) -> List[float]:
        for m in [dense, *models]:
            self.check(m, env)
        return measure_speedups(dense, models, env, rounds=rounds, reps_per_round=reps_per_round, warmup=warmup)

    def host_meta(self, env: InferenceEnv) -> Dict[str, Any]:
        lc = require_llama_cpp()
        dtype, quant = gguf_format(env)
        return {"llama_cpp_python_version": getattr(lc, "__version__", "?"), "host": host_name(torch.device("cpu")),
                "num_threads": env.threads or default_threads(), "gguf_type": quant or dtype}

    def reference_meta(self, model, env: InferenceEnv, dense: float, reps: int, warmup: int,
                       *, stacklevel: int = 2) -> Dict[str, Any]:
        return {}
