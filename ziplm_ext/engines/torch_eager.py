"""The PyTorch eager engine: models run as ``model(...)`` in eager mode on ``env.device`` in ``env.dtype``.

* Blocks are timed with the native slice-timing ops of :mod:`ziplm_ext.native.timing` (or their
  ``time.perf_counter`` Python oracles) on random weights of the model's shapes.
* ``mode="prefill"``: one timed unit is one forward pass over ``batch_size x seq_len`` tokens.
* ``mode="decode"`` (causal LMs only): one generation step, i.e. one new token per sequence
  attending to a KV cache of ``seq_len`` earlier tokens.  Attention blocks are timed with the
  native ``time_attention_decode`` op (cache of the kept KV heads), FFN blocks with ``time_ffn`` on
  ``(batch_size, 1, d)``; end to end, the model is prefilled once and each timed call is one
  ``model(next_token, cache=cache)`` step, after which the cache is cropped back to ``seq_len``
  (outside the timed region) so every step sees the same cache.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import platform
import statistics
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ziplm_ext.adapters.base import cache_kwargs, output_cache
from ziplm_ext.adapters.shapes import ModelShapes, model_shapes
from ziplm_ext.env import InferenceEnv

__all__ = [
    "TorchEagerEngine",
    "TorchBlockTimer",
    "TIMERS",
    "resolve_timer",
    "check_model_env",
    "in_env",
    "measure_model_time",
    "measure_speedups",
    "float32_reference_time",
    "host_name",
]

TIMERS = ("auto", "native", "python")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_available() -> bool:
    """Whether the native slice-timing ops of the compiled extension work."""
    try:
        from ziplm_ext.native import timing

        x = torch.zeros(1, 1, 1)
        w = torch.zeros(1, 1)
        timing.time_ffn(x, w, None, w, warmup=0, reps=1)
        return True
    except Exception:
        return False


def resolve_timer(timer: str, stacklevel: int = 2) -> str:
    """``"native"`` or ``"python"``: `timer` itself, or for ``"auto"`` native if the extension works,
    else python with a warning (`stacklevel` as for :func:`warnings.warn` called here)."""
    if timer not in TIMERS:
        raise ValueError(f"timer must be 'auto', 'native' or 'python', got {timer!r}")
    if timer != "auto":
        return timer
    if native_available():
        return "native"
    warnings.warn(
        "ziplm_ext: native slice-timing ops unavailable (ziplm_ext._C not built or stale); "
        "timing with the Python perf_counter oracles instead",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
    return "python"


class TorchBlockTimer:
    """Times one attention / FFN block at a kept structure count on random weights.

    Random full-width weights are drawn once per kind; narrower blocks use contiguous
    copies of their leading rows / columns.
    """

    def __init__(self, shapes: ModelShapes, env: InferenceEnv, timer: str, seed: int = 0):
        self.s, self.env, self.timer = shapes, env, timer
        dev, dt = torch.device(env.device), env.torch_dtype
        g = torch.Generator().manual_seed(seed)
        d, hd = shapes.hidden, shapes.head_dim
        std = 1.0 / math.sqrt(d)

        def rnd(*shape):
            return (torch.randn(*shape, generator=g) * std).to(device=dev, dtype=dt)

        self.decode = env.mode == "decode"
        tokens = 1 if self.decode else env.seq_len
        self.x = torch.randn(env.batch_size, tokens, d, generator=g).to(device=dev, dtype=dt)
        if self.decode:  # KV cache of seq_len earlier tokens, for every KV head of the dense model
            cache = (env.batch_size, shapes.num_kv_heads, env.seq_len, hd)
            self.k_cache = torch.randn(*cache, generator=g).to(device=dev, dtype=dt)
            self.v_cache = torch.randn(*cache, generator=g).to(device=dev, dtype=dt)
        self.wq = rnd(shapes.num_heads * hd, d)
        self.wk = rnd(shapes.num_kv_heads * hd, d)
        self.wv = rnd(shapes.num_kv_heads * hd, d)
        self.wo = rnd(d, shapes.num_heads * hd)
        self.w_up = rnd(shapes.d_ff, d)
        self.w_gate = rnd(shapes.d_ff, d) if shapes.gated else None
        self.w_down = rnd(d, shapes.d_ff)
        self._cache: Dict[Tuple[str, int], tuple] = {}

    def _weights(self, kind: str, k: int) -> tuple:
        key = (kind, k)
        if key not in self._cache:
            s = self.s
            if kind == "attn":
                nq, nkv = k * s.q_per_structure, k
                rq, rkv = nq * s.head_dim, nkv * s.head_dim
                self._cache[key] = (
                    self.wq[:rq].contiguous(), self.wk[:rkv].contiguous(), self.wv[:rkv].contiguous(),
                    self.wo[:, :rq].contiguous(),
                )
                if self.decode:
                    self._cache[key] += (self.k_cache[:, :nkv].contiguous(), self.v_cache[:, :nkv].contiguous())
            else:
                self._cache[key] = (
                    self.w_up[:k].contiguous(),
                    None if self.w_gate is None else self.w_gate[:k].contiguous(),
                    self.w_down[:, :k].contiguous(),
                )
        return self._cache[key]

    def time_block(self, kind: str, width: int, warmup: int, reps: int) -> torch.Tensor:
        """Per-repetition seconds (float64, length ``reps``)."""
        with env_threads(self.env):
            return self._time_block(kind, width, warmup, reps)

    def _time_block(self, kind: str, width: int, warmup: int, reps: int) -> torch.Tensor:
        from ziplm_ext.native import timing

        w = self._weights(kind, width)
        if kind == "attn" and self.decode:
            if self.timer == "native":
                return timing.time_attention_decode(self.x, *w, self.s.head_dim, warmup, reps).times
            return timing.reference_time_attention_decode(self.x, *w, self.s.head_dim, warmup, reps)
        if kind == "attn":
            if self.timer == "native":
                return timing.time_attention(self.x, *w, self.s.head_dim, self.s.causal, warmup, reps).times
            return timing.reference_time_attention(self.x, *w, self.s.head_dim, self.s.causal, warmup, reps)
        if self.timer == "native":
            return timing.time_ffn(self.x, *w, warmup, reps).times
        return timing.reference_time_ffn(self.x, *w, warmup, reps)


def host_name(device: torch.device) -> str:
    """The GPU name, or the CPU model name (``/proc/cpuinfo``, else ``platform``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------
# end-to-end measurements
# --------------------------------------------------------------------------------------


def check_model_env(model, env: InferenceEnv) -> None:
    """`model` can run in `env`: decode mode needs causal attention, and the model must be on ``env.device``."""
    if env.mode == "decode" and not model_shapes(model.config).causal:
        raise ValueError(f"mode='decode' needs a causal LM (KV-cache generation); "
                         f"{getattr(model.config, 'model_type', type(model).__name__)} is an encoder: use mode='prefill'")
    p = next(iter(model.parameters()), None)
    if p is None:
        return
    dev = torch.device(env.device)
    if p.device.type != dev.type or (dev.index is not None and p.device.index != dev.index):
        raise ValueError(f"model is on {p.device} but env.device is {env.device!r}; move the model first")


def in_env(model, env: InferenceEnv):
    """`model` as it runs in `env`: itself when its floating-point dtype is ``env.dtype``, else a
    copy cast to it. Pruning maths (Hessians, OBS updates) stays in float32; what is timed is the
    model in the deployment dtype."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None or p.dtype == env.torch_dtype:
        return model
    return copy.deepcopy(model).to(dtype=env.torch_dtype)


def _make_inputs(model, env: InferenceEnv, seed: int = 0) -> dict:
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", None)
    vocab = int(vocab if vocab is not None else 2)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (env.batch_size, env.seq_len), generator=g).to(env.device)
    kw = {"input_ids": ids}
    if model_shapes(cfg).causal:
        kw["use_cache"] = False
    else:
        kw["attention_mask"] = torch.ones_like(ids)
    return kw


class _Stepper:
    """One timed unit of work of `model` in `env`: a forward pass (prefill) or one generation step
    with a KV cache of ``seq_len`` tokens (decode; the cache is cropped back after each step,
    outside the timed region)."""

    def __init__(self, model, env: InferenceEnv, inputs: dict):
        self.model, self.env, self.inputs = model, env, inputs
        self.dev = torch.device(env.device)
        self.cache = None
        if env.mode == "decode":
            ids = inputs["input_ids"]
            with torch.inference_mode():
                self.cache = output_cache(model(input_ids=ids, use_cache=True))
            if self.cache is None or not hasattr(self.cache, "crop"):
                raise ValueError(f"{type(model).__name__} did not return a croppable KV cache; mode='decode' "
                                 "needs a HF causal LM with DynamicCache support")
            self.next_ids = ids[:, -1:].contiguous()
            self.cache_kw = cache_kwargs(model, self.cache)  # `cache=` or `past_key_values=`, by release

    def __call__(self) -> float:
        _sync(self.dev)
        t0 = time.perf_counter()
        if self.cache is None:
            self.model(**self.inputs)
        else:
            self.model(input_ids=self.next_ids, **self.cache_kw, use_cache=True)
        _sync(self.dev)
        dt = time.perf_counter() - t0
        if self.cache is not None:
            self.cache.crop(-1)  # drop the step's token again (transformers 5: negative = tokens to remove)
        return dt


def _time_calls(step: _Stepper, n: int) -> List[float]:
    return [step() for _ in range(n)]


def measure_model_time(model, env: InferenceEnv, *, reps: int = 30, warmup: int = 5) -> float:
    """Median seconds of one forward pass ``model(input_ids)`` on random token ids of shape
    ``(batch_size, seq_len)`` (attention mask of ones for encoders, ``use_cache=False`` for
    decoders), or in decode mode of one generation step over a KV cache of ``seq_len`` tokens;
    in eval mode under ``torch.inference_mode``, synchronising CUDA around each call.  The
    model's train/eval mode is restored afterwards."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0 (got {reps}, {warmup})")
    check_model_env(model, env)
    model = in_env(model, env)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            step = _Stepper(model, env, _make_inputs(model, env))
            _time_calls(step, warmup)
            times = _time_calls(step, reps)
    finally:
        model.train(was_training)
    return statistics.median(times)


def measure_speedups(
    dense, models: Sequence, env: InferenceEnv, *, rounds: int = 15, reps_per_round: int = 3, warmup: int = 3
) -> List[float]:
    """End-to-end speedups ``median(dense times) / median(model_i times)``.

    Measured interleaved: each round runs ``reps_per_round`` forward passes (decode mode:
    generation steps) of the dense model, then of ``models[0]``, ``models[1]``, ...
    (direction alternating between rounds), so that slow drifts of a shared machine affect all
    variants alike.  All models get the same random input (built from ``dense.config``).
    Every model is warmed up first.
    """
    if rounds < 1 or reps_per_round < 1:
        raise ValueError(f"need rounds >= 1 and reps_per_round >= 1 (got {rounds}, {reps_per_round})")
    for m in [dense, *models]:
        check_model_env(m, env)
    allm = [in_env(m, env) for m in [dense, *models]]
    inputs = _make_inputs(dense, env)
    modes = [m.training for m in allm]
    times: List[List[float]] = [[] for _ in allm]
    try:
        for m in allm:
            m.eval()
        with torch.inference_mode():
            steps = [_Stepper(m, env, inputs) for m in allm]
            for st in steps:
                _time_calls(st, warmup)
            idx = list(range(len(allm)))
            for r in range(rounds):
                for i in idx if r % 2 == 0 else idx[::-1]:
                    times[i].extend(_time_calls(steps[i], reps_per_round))
    finally:
        for m, t in zip(allm, modes):
            m.train(t)
    td = statistics.median(times[0])
    return [td / statistics.median(t) for t in times[1:]]


def float32_reference_time(model, env: InferenceEnv, dense: float, reps: int, warmup: int,
                           stacklevel: int = 2) -> Optional[float]:
    """For a half-precision environment on a CPU, the dense model's float32 time, with a one-line
    warning when the requested dtype is slower there (many CPUs have no fast half-precision
    matmul): the targets are still met in that dtype, but the user may prefer float32.
    `stacklevel`: as for :func:`warnings.warn` called here."""
    if env.dtype == "float32" or torch.device(env.device).type != "cpu":
        return None
    f32 = measure_model_time(model, dataclasses.replace(env, dtype="float32"), reps=reps, warmup=warmup)
    if dense > f32:
        warnings.warn(f"ziplm_ext: {env.dtype} on this CPU runs {dense / f32:.2f}x slower than float32 for this "
                      f"model ({dense * 1e3:.1f} vs {f32 * 1e3:.1f} ms); speedups are measured in {env.dtype} as asked",
                      RuntimeWarning, stacklevel=stacklevel)
    return f32


@contextlib.contextmanager
def env_threads(env: InferenceEnv):
    """Run the block with ``env.threads`` intra-op threads (when set), restoring the previous count."""
    n = getattr(env, "threads", None)
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class TorchEagerEngine:
    """:class:`~ziplm_ext.engines.base.Engine` of PyTorch eager mode (the only engine today)."""

    name = "torch"

    def check(self, model, env: InferenceEnv) -> None:
        check_model_env(model, env)

    def block_timer(self, shapes: ModelShapes, env: InferenceEnv, timer: str = "auto", seed: int = 0,
                    *, stacklevel: int = 2) -> TorchBlockTimer:
        """`timer`: ``"native"`` (``torch.ops.ziplm`` timing loops), ``"python"`` (the
        ``time.perf_counter`` oracles) or ``"auto"`` (native if the extension works, else python
        with a warning; `stacklevel` as for :func:`warnings.warn` called here)."""
        return TorchBlockTimer(shapes, env, resolve_timer(timer, stacklevel + 1), seed)

    def model_time(self, model, env: InferenceEnv, *, reps: int = 30, warmup: int = 5) -> float:
        with env_threads(env):
            return measure_model_time(model, env, reps=reps, warmup=warmup)

    def speedups(self, dense, models: Sequence, env: InferenceEnv, *, rounds: int = 15, reps_per_round: int = 3,
                 warmup: int = 3) -> List[float]:
        with env_threads(env):
            return measure_speedups(dense, models, env, rounds=rounds, reps_per_round=reps_per_round, warmup=warmup)

    def host_meta(self, env: InferenceEnv) -> Dict[str, Any]:
        return {
            "torch_version": torch.__version__,
            "host": host_name(torch.device(env.device)),
            "num_threads": env.threads if getattr(env, "threads", None) else torch.get_num_threads(),
        }

    def reference_meta(self, model, env: InferenceEnv, dense: float, reps: int, warmup: int,
                       *, stacklevel: int = 2) -> Dict[str, Any]:
        f32 = float32_reference_time(model, env, dense, reps, warmup, stacklevel + 1)
        return {} if f32 is None else {"float32_dense_time": f32}
