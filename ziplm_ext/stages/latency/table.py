"""The inference environment and the latency table (ZipLM paper: per-layer latency table).

This module is the one definition of

* :class:`InferenceEnv` -- the environment a latency table is measured on
  (device, dtype, batch size, sequence length, prefill vs decode), and
* :class:`LatencyTable` -- per-layer times at each kept structure count plus the
  dense end-to-end time, with the additive time model

      T(model) = T_dense - T_prunable + sum_l t_l(level_l)

  and the budget for a speedup target ``s``:  T* = T_dense / s - (T_dense - T_prunable).

It imports nothing heavier than json/dataclasses/numpy (torch only lazily, in
:attr:`InferenceEnv.torch_dtype`), so tables can be read and searched without torch.

JSON format (``format_version`` 1)::

    {
      "format_version": 1,
      "env": {"device": "cpu", "dtype": "float32", "batch_size": 1,
              "seq_len": 128, "mode": "prefill"},
      "dense_time": 0.0123,              # seconds, end-to-end dense model
      "prunable_time": 0.0101,           # seconds, sum of full-width prunable layer times
      "layer_times": {"blocks.0.attn": {"0": 0.0, "1": 1.1e-4, ...}, ...},
      "meta": {...}
    }

JSON object keys are strings; ``layer_times`` keys (kept structure counts) are
converted back to ``int`` on load.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping

from ziplm_ext.env import InferenceEnv  # noqa: F401  (re-exported: the table's environment)
from ziplm_ext.io.fileio import atomic_write_bytes

FORMAT_VERSION = 1



@dataclass
class LatencyTable:
    """Measured times (seconds) for one :class:`InferenceEnv`.

    ``layer_times[name][k]`` is the time of prunable layer ``name`` (e.g.
    ``"blocks.3.attn"``, ``"blocks.3.ffn"``) with ``k`` structures (heads / neurons)
    kept; ``k = 0`` means the module is removed and must have time ``0.0`` (it is
    added automatically if absent). ``prunable_time`` is the sum of the full-width
    layer times inside the dense model and ``dense_time`` the dense end-to-end
    time; their difference is the unprunable part (embeddings, LM head, norms...).
    """

    env: InferenceEnv
    dense_time: float
    prunable_time: float
    layer_times: Dict[str, Dict[int, float]]
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.env, Mapping):
            self.env = InferenceEnv.from_dict(self.env)
        if not isinstance(self.env, InferenceEnv):
            raise TypeError(f"LatencyTable.env must be an InferenceEnv, got {type(self.env).__name__}")
        self.dense_time = float(self.dense_time)
        self.prunable_time = float(self.prunable_time)
        if not (math.isfinite(self.dense_time) and self.dense_time > 0):
            raise ValueError(f"LatencyTable.dense_time must be finite and > 0, got {self.dense_time}")
        if not (math.isfinite(self.prunable_time) and 0 <= self.prunable_time <= self.dense_time):
            raise ValueError(
                f"LatencyTable.prunable_time must be in [0, dense_time={self.dense_time}], got {self.prunable_time}"
            )
        clean: Dict[str, Dict[int, float]] = {}
        for name, per in self.layer_times.items():
            if not per:
                raise ValueError(f"LatencyTable.layer_times[{name!r}] is empty")
            row: Dict[int, float] = {}
            for k, t in per.items():
                ki, tf = int(k), float(t)
                if ki < 0 or str(ki) != str(k).strip():
                    raise ValueError(f"LatencyTable.layer_times[{name!r}]: bad structure count {k!r}")
                if not (math.isfinite(tf) and tf >= 0):
                    raise ValueError(f"LatencyTable.layer_times[{name!r}][{ki}] must be finite and >= 0, got {tf}")
                row[ki] = tf
            if row.get(0, 0.0) != 0.0:
                raise ValueError(f"LatencyTable.layer_times[{name!r}][0] must be 0.0 (removed module), got {row[0]}")
            row[0] = 0.0
            clean[str(name)] = dict(sorted(row.items()))
        self.layer_times = clean
        self.meta = dict(self.meta or {})

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "env": self.env.to_dict(),
            "dense_time": self.dense_time,
            "prunable_time": self.prunable_time,
            "layer_times": {n: {str(k): t for k, t in per.items()} for n, per in self.layer_times.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatencyTable":
        if "format_version" not in d:
            raise ValueError("LatencyTable: missing field 'format_version'")
        if d["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"LatencyTable: format_version {d['format_version']!r} is not supported (expected {FORMAT_VERSION})"
            )
        for key in ("env", "dense_time", "prunable_time", "layer_times"):
            if key not in d:
                raise ValueError(f"LatencyTable: missing field {key!r}")
        return cls(
            env=InferenceEnv.from_dict(d["env"]),
            dense_time=d["dense_time"],
            prunable_time=d["prunable_time"],
            layer_times={n: {int(k): float(t) for k, t in per.items()} for n, per in d["layer_times"].items()},
            meta=dict(d.get("meta") or {}),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (temp file in the same directory, then ``os.replace``)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"LatencyTable: {os.fspath(path)} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"LatencyTable: {os.fspath(path)} does not hold a JSON object")
        return cls.from_dict(d)

    # ------------------------------------------------------------ time model
    @property
    def unprunable_time(self) -> float:
        return self.dense_time - self.prunable_time

    def full_count(self, name: str) -> int:
        """The largest kept count measured for ``name`` (the dense width)."""
        return max(self._row(name))

    def _row(self, name: str) -> Dict[int, float]:
        try:
            return self.layer_times[name]
        except KeyError:
            raise KeyError(f"LatencyTable has no layer {name!r}") from None

    def layer_time(self, name: str, count: int) -> float:
        row = self._row(name)
        try:
            return row[int(count)]
        except KeyError:
            raise KeyError(
                f"LatencyTable: layer {name!r} has no time for {count} kept structures (measured: {sorted(row)})"
            ) from None

    def predict_time(self, levels: Mapping[str, int]) -> float:
        """unprunable + sum of layer_times[name][levels[name]].

        ``levels`` maps layer name -> kept structure count. Layers missing from
        ``levels`` are taken at full width; unknown layer names raise ``KeyError``.
        """
        unknown = sorted(set(levels) - set(self.layer_times))
        if unknown:
            raise KeyError(f"LatencyTable has no layer(s) {', '.join(map(repr, unknown))}")
        total = self.unprunable_time
        for name, row in self.layer_times.items():
            total += self.layer_time(name, levels[name]) if name in levels else row[max(row)]
        return total

    def predict_speedup(self, levels: Mapping[str, int]) -> float:
        t = self.predict_time(levels)
        return math.inf if t <= 0 else self.dense_time / t

    def min_time(self) -> float:
        """Predicted time with every layer at its cheapest measured level."""
        return self.unprunable_time + sum(min(row.values()) for row in self.layer_times.values())

    def max_speedup(self) -> float:
        t = self.min_time()
        return math.inf if t <= 0 else self.dense_time / t

    def budget(self, target_speedup: float) -> float:
        """Time available to the prunable layers for ``target_speedup``:
        dense_time / target - unprunable_time (ZipLM paper, structured SPDY search)."""
        target = float(target_speedup)
        if not (target > 1):
            raise ValueError(f"target must be > 1, got {target_speedup!r}")
        b = self.dense_time / target - self.unprunable_time
        if b <= 0:
            from ziplm_ext.errors import UnreachableTargetError

            raise UnreachableTargetError(
                f"target {target:g}x is unreachable: the unprunable part alone takes {self.unprunable_time:.6g}s "
                f">= dense_time/target = {self.dense_time / target:.6g}s (max speedup {self.max_speedup():.4g}x)"
            )
        return b

    def check_env(self, env: InferenceEnv) -> None:
        """Raise ``ValueError`` if this table was measured for a different environment."""
        if isinstance(env, Mapping):
            env = InferenceEnv.from_dict(env)
        if env != self.env:
            diff = [
                f"{f.name}={getattr(self.env, f.name)!r} (table) vs {getattr(env, f.name)!r} (requested)"
                for f in fields(InferenceEnv)
                if getattr(self.env, f.name) != getattr(env, f.name)
            ]
            raise ValueError("latency table was measured for another environment: " + "; ".join(diff))
