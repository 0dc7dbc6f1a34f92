"""The inference environment a family of pruned models is built for (ZipLM section 3.3: the
speedup targets are defined, timed and guaranteed in one environment)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional

__all__ = ["InferenceEnv"]

_DTYPES = ("float32", "float16", "bfloat16")
_MODES = ("prefill", "decode")
_ENGINES = ("torch", "llama.cpp", "onnxruntime")
# Fields added after tables and families were first saved: absent in an old file means this default.
_QUANTS = ("q8_0", "q4_k_m")  # llama.cpp quantisation types a family can be delivered and timed in
_OPTIONAL_DEFAULTS = {"engine": "torch", "threads": None, "quant": None}


@dataclass(frozen=True)
class InferenceEnv:
    """Where and how the pruned model will run.

    ``mode="prefill"``: one forward pass over ``batch_size x seq_len`` tokens.
    ``mode="decode"``: one new token per sequence per step, attending to a KV cache
    of ``seq_len`` tokens.
    """

    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 1
    seq_len: int = 128
    mode: str = "prefill"  # "prefill" or "decode" (decode = one new token per step with a KV cache of seq_len)
    engine: str = "torch"  # the runtime the targets are measured in: "torch" (eager), "llama.cpp", "onnxruntime"
    threads: Optional[int] = None  # CPU threads of the engine (None: the engine's default)
    quant: Optional[str] = None  # llama.cpp only: weights quantised to "q8_0" / "q4_k_m" (None: dtype as is)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"InferenceEnv.device must be a non-empty string, got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"InferenceEnv.dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        for name in ("batch_size", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"InferenceEnv.{name} must be an integer >= 1, got {v!r}")
        if self.mode not in _MODES:
            raise ValueError(f"InferenceEnv.mode must be one of {', '.join(_MODES)}, got {self.mode!r}")
        if self.engine not in _ENGINES:
            raise ValueError(f"InferenceEnv.engine must be one of {', '.join(_ENGINES)}, got {self.engine!r}")
        if self.quant is not None and (self.quant not in _QUANTS or self.engine != "llama.cpp"):
            raise ValueError(f"InferenceEnv.quant must be one of {', '.join(_QUANTS)} with engine='llama.cpp', "
                             f"got quant={self.quant!r} with engine={self.engine!r}")
        if self.engine == "llama.cpp" and self.dtype == "bfloat16":
            raise ValueError("InferenceEnv: llama.cpp runs float32 or float16 weights (or quant=...), not bfloat16")
        if self.engine == "onnxruntime" and self.dtype != "float32":
            raise ValueError(f"InferenceEnv: the onnxruntime engine runs float32 models, got dtype={self.dtype!r}")
        if self.engine != "torch" and self.device != "cpu":
            raise ValueError(f"InferenceEnv: the {self.engine} engine runs on the CPU here, got device={self.device!r}")
        t = self.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"InferenceEnv.threads must be an integer >= 1 or None, got {t!r}")

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InferenceEnv":
        """Strict inverse of :meth:`to_dict`: every field must be present, no unknown keys."""
        names = [f.name for f in fields(cls)]
        d = {**{k: v for k, v in _OPTIONAL_DEFAULTS.items() if k not in d}, **d}
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"InferenceEnv: missing field(s) {', '.join(missing)}")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"InferenceEnv: unknown field(s) {', '.join(unknown)}")
        return cls(**{n: d[n] for n in names})

    @property
    def torch_dtype(self):
        import torch  # lazy: keep this module importable without torch

        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]

    def describe(self) -> str:
        base = f"{self.device}/{self.dtype}/{self.mode}/bs{self.batch_size}x{self.seq_len}"
        if self.engine != "torch":
            base = f"{self.engine}:{base}" + (f"/{self.quant}" if self.quant else "")
        return base if self.threads is None else f"{base}/t{self.threads}"
