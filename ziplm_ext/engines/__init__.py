"""Inference engines: the runtimes a latency table and end-to-end speedups are measured with.

``get_engine(env)`` returns the :class:`~ziplm_ext.engines.base.Engine` of an inference environment.
PyTorch eager mode (``"torch"``, :mod:`ziplm_ext.engines.torch_eager`), ONNX Runtime
(``"onnxruntime"``, :mod:`ziplm_ext.engines.onnxruntime`) and llama.cpp (``"llama.cpp"``,
:mod:`ziplm_ext.engines.llamacpp`); another runtime is one more entry in :data:`ENGINES`.
"""
from __future__ import annotations

from typing import Callable, Dict

from ziplm_ext.engines.base import BlockTimer, Engine
from ziplm_ext.engines.torch_eager import TorchEagerEngine, in_env
from ziplm_ext.env import InferenceEnv

__all__ = ["BlockTimer", "Engine", "ENGINES", "DEFAULT_ENGINE", "TorchEagerEngine", "get_engine", "in_env"]

def _onnxruntime() -> Engine:
    from ziplm_ext.engines.onnxruntime import OnnxRuntimeEngine  # lazy: onnxruntime is an optional extra

    return OnnxRuntimeEngine()


def _llamacpp() -> Engine:
    from ziplm_ext.engines.llamacpp import LlamaCppEngine  # lazy: llama-cpp-python is an optional extra

    return LlamaCppEngine()


ENGINES: Dict[str, Callable[[], Engine]] = {"torch": TorchEagerEngine, "onnxruntime": _onnxruntime,
                                            "llama.cpp": _llamacpp}
DEFAULT_ENGINE = "torch"


def get_engine(env: InferenceEnv) -> Engine:
    """The engine that runs models in `env` (``env.engine`` when the environment names one, else
    PyTorch eager)."""
    name = getattr(env, "engine", None) or DEFAULT_ENGINE
    if name not in ENGINES:
        raise ValueError(f"unknown inference engine {name!r}; known: {', '.join(sorted(ENGINES))}")
    return ENGINES[name]()
