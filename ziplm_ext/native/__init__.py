"""The compiled extension ``ziplm_ext._C``: OBS kernels (:mod:`.ops`), slice timing (:mod:`.timing`),
their pure-PyTorch oracles (:mod:`.reference`) and fake kernels for tracing (:mod:`.fake`).

:func:`_native` is the one loader of the extension; importing this package never fails on a
missing build, the first native call does, with a clear message.
"""
from __future__ import annotations

import importlib


def _native():
    """The ``torch.ops.ziplm`` namespace, after loading the compiled extension.

    Loaded lazily (importing ``ziplm_ext._C`` registers ``torch.ops.ziplm.*``), so a missing or
    broken build fails here with a clear message instead of an opaque "no such operator".
    """
    import torch  # first: _C links against libtorch/libc10, which importing torch loads

    try:
        importlib.import_module("ziplm_ext._C")
    except ImportError as e:
        raise RuntimeError(
            "ziplm_ext: the native extension ziplm_ext._C is not built or failed to load "
            f"({e}); reinstall with `pip install --no-build-isolation .` (torch installed first)"
        ) from e
    importlib.import_module("ziplm_ext.native.fake")  # fake kernels of every op (once, on first load)
    return torch.ops.ziplm


def native_available() -> bool:
    """Whether the compiled extension loads."""
    try:
        _native()
    except RuntimeError:
        return False
    return True


def cuda_kernels_built() -> bool:
    """Whether the extension loads and was built with its CUDA kernels."""
    return native_available() and bool(importlib.import_module("ziplm_ext._C").cuda_built())
