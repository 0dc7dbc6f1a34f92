"""Building, checking and calibrating latency tables (ZIPLM.md section 4).

* :func:`build_latency_table` times one attention block at every kept KV-group / head
  count and one FFN block at a grid of kept widths (:func:`ffn_levels`), with the native
  slice-timing ops of :mod:`ziplm_ext.timing` on random weights of the model's shapes, and
  measures the dense model end to end (:func:`measure_model_time`).  The result is a
  :class:`~ziplm_ext.latency_table.LatencyTable` with the additive time model

      T(model) = T_dense - T_prunable + sum_l t_l(level_l).

* :func:`measure_speedups` measures real (sliced) models against the dense one end to
  end, interleaved round-robin so that slow drifts of a shared machine hit every variant
  alike.
* :func:`calibrate_table` corrects a table when such end-to-end measurements disagree
  with its additive prediction (one least-squares scale factor on the prunable part).

Both modes of :class:`~ziplm_ext.latency_table.InferenceEnv` are supported:

* ``mode="prefill"``: one forward pass over ``batch_size x seq_len`` tokens.
* ``mode="decode"`` (causal LMs only): one generation step, i.e. one new token per sequence
  attending to a KV cache of ``seq_len`` earlier tokens.  Attention blocks are timed with the
  native ``time_attention_decode`` op (cache of the kept KV heads), FFN blocks with
  ``time_ffn`` on ``(batch_size, 1, d)``; end to end, the model is prefilled once and each
  timed call is one ``model(next_token, cache=cache)`` step, after which the cache
  is cropped back to ``seq_len`` (outside the timed region) so every step sees the same cache.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import datetime as _dt
import math
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ziplm_ext.adapters import get_adapter
from ziplm_ext.adapters.base import cache_kwargs, output_cache
from ziplm_ext.env import InferenceEnv
from ziplm_ext.stages.database import default_levels as layer_levels
from ziplm_ext.stages.latency.table import LatencyTable

__all__ = [
    "ModelShapes",
    "model_shapes",
    "ffn_levels",
    "default_levels",
    "build_latency_table",
    "measure_model_time",
    "measure_speedups",
    "in_env",
    "calibrate_table",
]

_GATED_TYPES = ("llama", "mistral", "qwen2")
_ENCODER_TYPES = ("bert", "roberta", "distilbert", "xlm-roberta", "electra")


# --------------------------------------------------------------------------------------
# shapes from the (dense) HF config
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShapes:
    """Block shapes of a dense transformer, read from its HF config by :func:`model_shapes`.

    One attention *structure* is one KV group: ``q_per_structure`` query heads sharing
    one key/value head (BERT / GPT-2: 1 and 1).
    """

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    gated: bool  # LLaMA-family SiLU-gated FFN
    causal: bool  # decoder (causal attention) vs encoder

    @property
    def q_per_structure(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_attn_structures(self) -> int:
        return self.num_kv_heads


def _first(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def model_shapes(config) -> ModelShapes:
    """The one place that reads block shapes from a dense HF config (BERT, GPT-2, LLaMA family)."""
    model_type = str(getattr(config, "model_type", "") or "")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    if hidden is None or heads is None:
        raise ValueError(f"cannot read hidden size / head count from config of model_type={model_type!r}")
    hidden, heads = int(hidden), int(heads)
    kv = int(_first(config, "num_key_value_heads", default=heads))
    head_dim = int(_first(config, "head_dim", default=hidden // heads))
    d_ff = _first(config, "intermediate_size", "n_inner")
    d_ff = int(d_ff) if d_ff is not None else 4 * hidden
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    causal = model_type not in _ENCODER_TYPES or bool(getattr(config, "is_decoder", False))
    return ModelShapes(hidden, heads, kv, head_dim, d_ff, model_type in _GATED_TYPES, causal)


# --------------------------------------------------------------------------------------
# level grids
# --------------------------------------------------------------------------------------


def ffn_levels(d_ff: int, ratio: float = 0.9, min_frac: float = 0.01, multiple: int = 1) -> List[int]:
    """Geometric grid of kept FFN widths: ``round(d_ff * ratio**i)`` for every ``i`` with
    ``ratio**i >= min_frac``, plus the full width ``d_ff`` and ``0`` (removed).

    With ``multiple > 1`` the non-zero widths are rounded to the nearest multiple of
    ``multiple`` (at least ``multiple``); the full width is always kept as is.
    Returns sorted, unique kept counts.
    """
    d_ff, multiple = int(d_ff), int(multiple)
    if d_ff < 1:
        raise ValueError(f"d_ff must be >= 1, got {d_ff}")
    if not (0 < ratio < 1):
        raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
    if not (0 < min_frac <= 1):
        raise ValueError(f"min_frac must lie in (0, 1], got {min_frac}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    out = {0, d_ff}
    frac = 1.0
    while frac >= min_frac * (1 - 1e-12):
        k = d_ff * frac
        k = max(multiple, int(round(k / multiple)) * multiple) if multiple > 1 else max(1, int(round(k)))
        out.add(min(k, d_ff))
        frac *= ratio
    return sorted(out)


def default_levels(model) -> Dict[str, List[int]]:
    """Every kept count for attention layers, :func:`ffn_levels` for FFN layers."""
    out = {}
    for layer in get_adapter(model).prunable_layers(model):
        if layer.kind == "attn":
            out[layer.name] = list(range(layer.num_structures + 1))
        else:
            out[layer.name] = ffn_levels(layer.num_structures)
    return out


# --------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _native_available() -> bool:
    try:
        from ziplm_ext.native import timing

        x = torch.zeros(1, 1, 1)
        w = torch.zeros(1, 1)
        timing.time_ffn(x, w, None, w, warmup=0, reps=1)
        return True
    except Exception:
        return False


class _BlockTimer:
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

    def time(self, kind: str, k: int, warmup: int, reps: int) -> torch.Tensor:
        """Per-repetition seconds (float64, length ``reps``)."""
        from ziplm_ext.native import timing

        w = self._weights(kind, k)
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


def _host_name(device: torch.device) -> str:
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


def _resolve_levels(model, levels: Optional[Mapping[str, Sequence[int]]]) -> Dict[str, List[int]]:
    adapter = get_adapter(model)
    layers = {l.name: l for l in adapter.prunable_layers(model)}
    out = default_levels(model)
    if levels is not None:
        unknown = sorted(set(levels) - set(layers))
        if unknown:
            raise KeyError(f"levels name unknown layer(s): {', '.join(unknown)}")
        for name, ks in levels.items():
            n = layers[name].num_structures
            ks = sorted({int(k) for k in ks} | {0, n})
            bad = [k for k in ks if not 0 <= k <= n]
            if bad:
                raise ValueError(f"{name}: kept counts {bad} outside [0, {n}]")
            out[name] = ks
    return out


# --------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------


def build_latency_table(
    model,
    env: InferenceEnv,
    levels: Optional[Mapping[str, Sequence[int]]] = None,
    *,
    reps: int = 50,
    warmup: int = 5,
    progress: bool = True,
    rounds: int = 3,
    model_reps: int = 30,
    timer: str = "auto",
) -> LatencyTable:
    """Measure a :class:`LatencyTable` for ``model`` (dense, on ``env.device`` / ``env.dtype``).

    Args:
        model: a dense HF model supported by :func:`ziplm_ext.adapters.get_adapter`.
        env: the inference environment (``mode="decode"`` only for causal LMs).
        levels: layer name -> kept counts to time. Layers not named get the default grid
            (every count for attention, :func:`ffn_levels` for FFN); 0 and the full width are
            always added.
        reps: timed repetitions per (kind, kept count), split over ``rounds`` interleaved
            passes (round-robin over all distinct timings, against machine drift); the
            stored time is the median over all repetitions.
        warmup: untimed repetitions before each pass of each timing.
        progress: show a tqdm bar over the distinct timings.
        rounds: interleaved passes (see ``reps``).
        model_reps: repetitions of the dense end-to-end measurement.
        timer: ``"native"`` (``torch.ops.ziplm`` timing loops), ``"python"`` (the
            ``time.perf_counter`` oracles of :mod:`ziplm_ext.timing`) or ``"auto"`` (native if
            the extension works, else python with a warning). Recorded in ``meta["timer"]``.

    Every block of a dense model has the same shapes, so each distinct (kind, kept count)
    is timed once and the time reused for all blocks of that kind (the table is still keyed
    by each layer name).  Kept count 0 (removed module) is stored as 0.0 without timing.

    ``meta`` records the torch version, host (CPU model or GPU name), reps, rounds, date,
    timer, and per (kind, kept count) the relative spread ``(p90 - p10) / median``.
    """
    if reps < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"need reps >= 1, warmup >= 0, rounds >= 1 (got {reps}, {warmup}, {rounds})")
    if timer not in ("auto", "native", "python"):
        raise ValueError(f"timer must be 'auto', 'native' or 'python', got {timer!r}")
    if timer == "auto":
        timer = "native" if _native_available() else "python"
        if timer == "python":
            warnings.warn(
                "ziplm_ext: native slice-timing ops unavailable (ziplm_ext._C not built or stale); "
                "timing with the Python perf_counter oracles instead",
                RuntimeWarning,
                stacklevel=2,
            )
    _check_model_env(model, env)

    adapter = get_adapter(model)
    layers = adapter.prunable_layers(model)
    per_layer = _resolve_levels(model, levels)
    shapes = model_shapes(model.config)

    distinct = sorted({(l.kind, k) for l in layers for k in per_layer[l.name] if k > 0})
    rounds = min(rounds, reps)
    reps_per = [reps // rounds + (1 if r < reps % rounds else 0) for r in range(rounds)]

    bt = _BlockTimer(shapes, env, timer)
    samples: Dict[Tuple[str, int], List[torch.Tensor]] = {key: [] for key in distinct}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(distinct) * rounds, desc="latency table", unit="timing")
    try:
        for r in range(rounds):
            order = distinct if r % 2 == 0 else distinct[::-1]  # alternate direction against drift
            for kind, k in order:
                samples[(kind, k)].append(bt.time(kind, k, warmup, reps_per[r]))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    medians: Dict[Tuple[str, int], float] = {}
    spreads: Dict[str, Dict[str, float]] = {"attn": {}, "ffn": {}}
    for key, chunks in samples.items():
        t = torch.cat(chunks).to(torch.float64)
        p10, med, p90 = (float(v) for v in t.quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)))
        medians[key] = med
        spreads[key[0]][str(key[1])] = (p90 - p10) / med if med > 0 else float("nan")

    layer_times: Dict[str, Dict[int, float]] = {}
    for l in layers:
        layer_times[l.name] = {k: (0.0 if k == 0 else medians[(l.kind, k)]) for k in per_layer[l.name]}
    prunable = sum(layer_times[l.name][l.num_structures] for l in layers)

    dense = measure_model_time(model, env, reps=model_reps, warmup=warmup)
    float32_dense = _float32_reference_time(model, env, dense, model_reps, warmup)
    meta = {
        "torch_version": torch.__version__,
        "host": _host_name(torch.device(env.device)),
        "num_threads": torch.get_num_threads(),
        "reps": reps,
        "rounds": rounds,
        "warmup": warmup,
        "model_reps": model_reps,
        "timer": timer,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_type": str(getattr(model.config, "model_type", "")),
        "shapes": {
            "hidden": shapes.hidden, "num_heads": shapes.num_heads, "num_kv_heads": shapes.num_kv_heads,
            "head_dim": shapes.head_dim, "d_ff": shapes.d_ff, "gated": shapes.gated, "causal": shapes.causal,
        },
        "spread": spreads,
    }
    if float32_dense is not None:
        meta["float32_dense_time"] = float32_dense
    if prunable > dense:
        # block timings in isolation can exceed the end-to-end time on a noisy machine;
        # the table format needs prunable <= dense, so scale the layer times down and say so.
        scale = dense / prunable
        warnings.warn(
            f"ziplm_ext: sum of full-width layer times {prunable:.6g}s exceeds the dense end-to-end time "
            f"{dense:.6g}s; scaling layer times by {scale:.4f} (recorded in meta['prunable_rescale'])",
            RuntimeWarning,
            stacklevel=2,
        )
        layer_times = {n: {k: t * scale for k, t in row.items()} for n, row in layer_times.items()}
        prunable = dense
        meta["prunable_rescale"] = scale
    return LatencyTable(env=env, dense_time=dense, prunable_time=prunable, layer_times=layer_times, meta=meta)


def _float32_reference_time(model, env: InferenceEnv, dense: float, reps: int, warmup: int) -> Optional[float]:
    """For a half-precision environment on a CPU, the dense model's float32 time, with a one-line
    warning when the requested dtype is slower there (many CPUs have no fast half-precision
    matmul): the targets are still met in that dtype, but the user may prefer float32."""
    if env.dtype == "float32" or torch.device(env.device).type != "cpu":
        return None
    f32 = measure_model_time(model, dataclasses.replace(env, dtype="float32"), reps=reps, warmup=warmup)
    if dense > f32:
        warnings.warn(f"ziplm_ext: {env.dtype} on this CPU runs {dense / f32:.2f}x slower than float32 for this "
                      f"model ({dense * 1e3:.1f} vs {f32 * 1e3:.1f} ms); speedups are measured in {env.dtype} as asked",
                      RuntimeWarning, stacklevel=3)
    return f32


# --------------------------------------------------------------------------------------
# end-to-end measurements
# --------------------------------------------------------------------------------------


def _check_model_env(model, env: InferenceEnv) -> None:
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
    import copy

    return copy.deepcopy(model).to(dtype=env.torch_dtype)


def _make_inputs(model, env: InferenceEnv, seed: int = 0) -> dict:
    cfg = model.config
    vocab = int(_first(cfg, "vocab_size", default=2))
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
    _check_model_env(model, env)
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
        _check_model_env(m, env)
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


# --------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------


def calibrate_table(
    table: LatencyTable, measured: Sequence[Tuple[Mapping[str, int], float]]
) -> LatencyTable:
    """Correct ``table`` so that its predictions match end-to-end measured speedups.

    Model: the unprunable part is right, but the isolated block timings are off by one
    common factor ``a`` inside the real model (caches, fusion, threading, layer norms and
    residual adds that scale with the layer). With ``P(levels) = sum_l t_l(level_l)``
    and the dense model fitted exactly (``dense_time`` is kept):

        T(levels) = dense_time - a * (P_dense - P(levels)).

    Each measurement ``(levels_i, s_i)`` gives ``T_i = dense_time / s_i``, i.e. a measured
    time saving ``r_i = dense_time - T_i`` against the predicted saving ``a * D_i`` with
    ``D_i = P_dense - P(levels_i)``.  ``a`` is the least-squares fit
    ``a = sum(r_i D_i) / sum(D_i^2)``, clamped to ``(0, dense_time / P_dense]`` (the table
    needs ``0 < prunable_time <= dense_time``).

    The returned copy has every layer time and ``prunable_time`` multiplied by ``a`` and the
    same ``dense_time``, so ``unprunable_time = dense_time - a * P_dense``.  ``meta["calibration"]``
    records ``a``, the number of measurements, and the relative time errors before and after.
    """
    if not measured:
        raise ValueError("calibrate_table needs at least one (levels, measured_speedup) pair")
    dense = table.dense_time
    p_dense = table.prunable_time
    if p_dense <= 0:
        raise ValueError("table has no prunable time to scale")
    num = den = 0.0
    rows = []
    for levels, s in measured:
        s = float(s)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"measured speedup must be finite and > 0, got {s}")
        p = table.predict_time(levels) - table.unprunable_time
        d = p_dense - p
        r = dense - dense / s
        num += r * d
        den += d * d
        rows.append((levels, s, d))
    if den <= 0:
        raise ValueError("all measurements are of the dense configuration; nothing to calibrate")
    a_fit = num / den
    a = min(max(a_fit, 1e-6), dense / p_dense)
    out = LatencyTable(
        env=table.env,
        dense_time=dense,
        prunable_time=min(a * p_dense, dense),
        layer_times={n: {k: t * a for k, t in row.items()} for n, row in table.layer_times.items()},
        meta=dict(table.meta),
    )

    def rel_err(tab):
        return [tab.predict_time(lv) / (dense / s) - 1.0 for lv, s, _ in rows]

    prev = dict(table.meta.get("calibration") or {})
    out.meta["calibration"] = {
        "scale": a,
        "scale_fit": a_fit,
        "cumulative_scale": a * float(prev.get("cumulative_scale", 1.0)),
        "n_measurements": len(rows),
        "model": "T = dense_time - a * (P_dense - P(levels))",
        "rel_time_error_before": rel_err(table),
        "rel_time_error_after": rel_err(out),
    }
    return out


# --------------------------------------------------------------------------------------
# the table prune searches with
# --------------------------------------------------------------------------------------


def add_module_overheads(table: LatencyTable, model: nn.Module, env: InferenceEnv, rounds: int = 15) -> LatencyTable:
    """Add each module's fixed cost to the native block timings.

    The slice-timing ops time the block arithmetic only. A real module also pays a cost that does
    not shrink with its width (framework dispatch, norms, rotary embeddings, residual adds) and
    that vanishes only when the module is removed. We measure it end to end: the dense model
    against copies with every attention (resp. FFN) module removed, interleaved; the saved time per
    module minus its native full-width time is that kind's overhead, added to every kept count > 0.
    A third copy with every module removed measures the unprunable part (embeddings, head, norms)
    directly; when noise makes the modules add up to more than the rest of the model, the kept
    entries are scaled down so that this measured part stays (otherwise the table would claim an
    almost free model and unreachable targets would pass as reachable).
    """
    adapter = get_adapter(model)
    layers = adapter.prunable_layers(model)
    kinds = sorted({l.kind for l in layers})
    variants = []
    for removed in [(kind,) for kind in kinds] + [tuple(kinds)]:
        m = copy.deepcopy(model).eval()
        for l in layers:
            if l.kind in removed:
                adapter.slice(m, l, [])
        variants.append(m)
    *speedups, s_all = measure_speedups(model, variants, env, rounds=rounds)
    layer_times = {n: dict(row) for n, row in table.layer_times.items()}
    overheads = {}
    for kind, s in zip(kinds, speedups):
        mine = [l for l in layers if l.kind == kind]
        real = table.dense_time * (1 - 1 / s) / len(mine)  # measured time of one full module
        native = float(np.mean([table.layer_time(l.name, l.num_structures) for l in mine]))
        overheads[kind] = max(0.0, real - native)
        for l in mine:
            for k in layer_times[l.name]:
                if k > 0:
                    layer_times[l.name][k] += overheads[kind]
    prunable = sum(layer_times[l.name][l.num_structures] for l in layers)
    unprunable = min(max(table.dense_time / s_all, 0.001 * table.dense_time), 0.95 * table.dense_time)
    limit = table.dense_time - unprunable
    if prunable > limit:  # noise: keep the measured unprunable part, scale the modules down
        scale = limit / prunable
        layer_times = {n: {k: t * scale for k, t in row.items()} for n, row in layer_times.items()}
        prunable = sum(layer_times[l.name][l.num_structures] for l in layers)
    meta = dict(table.meta, module_overheads=overheads, module_removal_speedups=dict(zip(kinds, speedups)),
                all_modules_removed_speedup=s_all)
    return LatencyTable(table.env, table.dense_time, prunable, layer_times, meta)


def build_environment_table(model: nn.Module, env: InferenceEnv, *, ffn_multiple: int = 1, reps: int = 30,
                            rounds: int = 15, progress: bool = True) -> LatencyTable:
    """The latency table `prune` searches with: native block timings on the level grid (FFN widths
    rounded to `ffn_multiple`) plus each module kind's measured fixed overhead. ``ziplm latency``
    writes exactly this, so a saved table can be passed back to ``prune``."""
    levels_fn = functools.partial(layer_levels, ffn_multiple=ffn_multiple)
    layers = get_adapter(model).prunable_layers(model)
    table = build_latency_table(model, env, {l.name: levels_fn(l) for l in layers}, reps=reps, progress=progress)
    table = add_module_overheads(table, model, env, rounds=rounds)
    table.meta["ffn_multiple"] = ffn_multiple
    return table


def check_table_for_model(table: LatencyTable, model: nn.Module, env: InferenceEnv) -> None:
    """A given table must be for this environment and this model's layers at their dense widths."""
    table.check_env(env)
    layers = get_adapter(model).prunable_layers(model)
    missing = [l.name for l in layers if l.name not in table.layer_times]
    extra = sorted(set(table.layer_times) - {l.name for l in layers})
    if missing or extra:
        raise ValueError(f"latency table does not match the model's layers (missing: {', '.join(missing) or '-'}; "
                         f"unknown: {', '.join(extra) or '-'})")
    for l in layers:
        if table.full_count(l.name) != l.num_structures:
            raise ValueError(f"latency table has {table.full_count(l.name)} structures at full width for {l.name}, "
                             f"the model {l.num_structures}: it was measured for another model")


def table_levels_fn(table: LatencyTable):
    """The level grid of a given table: the kept counts it has times for."""
    def levels(layer) -> list[int]:
        return sorted(table.layer_times[layer.name])

    return levels
