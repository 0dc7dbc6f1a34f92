"""Build of ziplm_ext and its native extension ziplm_ext._C.

Environment switches (all optional):

  ZIPLM_FORCE_CPU=1        build only the CPU kernels, even when torch and nvcc could build CUDA.
  ZIPLM_FORCE_CUDA=1       build the CUDA kernels or fail loudly saying why (no CUDA torch, no nvcc).
  TORCH_CUDA_ARCH_LIST     CUDA architectures, e.g. "8.0;9.0". When unset and no GPU is visible
                           we use ZIPLM_DEFAULT_ARCHS below (torch crashes without a list then).
  CUDA_HOME                toolkit root holding bin/nvcc and lib64/libcudart.so (found from nvcc on PATH if unset).
  MAX_JOBS                 parallel compile jobs (default: number of CPUs; CI uses 2).
  ZIPLM_DEBUG=1            -O0 -g instead of -O3.

Install with torch already present and outside build isolation:
    pip install torch==2.13.0 && pip install --no-build-isolation .
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
ZIPLM_DEFAULT_ARCHS = "8.0;9.0"


def read_sources():
    """csrc/SOURCES is the single list of native sources shared with CMakeLists.txt."""
    cpu, cuda = [], []
    for line in (ROOT / "csrc" / "SOURCES").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, path = (s.strip() for s in line.split(":", 1))
        (cpu if kind == "cpu" else cuda).append(path)
    return cpu, cuda


def flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def cuda_decision(torch):
    """Return (build_cuda, reason)."""
    if flag("ZIPLM_FORCE_CPU"):
        return False, "ZIPLM_FORCE_CPU is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or not shutil.which(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), toolkit at {cpp_extension.CUDA_HOME}"


def extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_src, cuda_src = read_sources()
    build_cuda, reason = cuda_decision(torch)
    if flag("ZIPLM_FORCE_CUDA") and not build_cuda:
        sys.exit(f"ziplm_ext: ZIPLM_FORCE_CUDA=1 but CUDA kernels cannot be built: {reason}")
    print(f"ziplm_ext: {'building CUDA + CPU kernels' if build_cuda else 'building CPU kernels only'} ({reason})")

    opt = ["-O0", "-g"] if flag("ZIPLM_DEBUG") else ["-O3", "-g0"]  # -g0: Python's default CFLAGS add -g
    cxx = opt + ["-fopenmp"]
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = ZIPLM_DEFAULT_ARCHS
        nvcc = (["-O0", "-g"] if flag("ZIPLM_DEBUG") else ["-O3"]) + ["--expt-relaxed-constexpr", "-lineinfo"]
        return [CUDAExtension("ziplm_ext._C", cpu_src + cuda_src, define_macros=[("ZIPLM_WITH_CUDA", None)],
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])]
    return [CppExtension("ziplm_ext._C", cpu_src, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(
    packages=find_packages(include=["ziplm_ext", "ziplm_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)
