#!/usr/bin/env bash
# CUDA compile check for ziplm_ext: builds the extension with its CUDA kernels against a
# CUDA build of torch and imports it, without touching the main (CPU) environment.
#
# No GPU is needed: this only proves the .cu sources compile, link and register their ops.
# When nvcc is not on PATH the check prints a skip line and exits 0.
#
# Environment (all optional):
#   ZIPLM_CUDA_VENV        venv holding the CUDA torch (default: <repo>/.venv-cuda, git-ignored;
#                          reused when it already has torch $TORCH_VERSION)
#   ZIPLM_CUDA_TORCH       torch version to install (default 2.14.1, the CUDA 13.0 build)
#   TORCH_CUDA_ARCH_LIST   architectures to compile for (default "9.0")
#   MAX_JOBS               parallel compile jobs (default 2)
#   ZIPLM_KEEP_BUILD=1     keep the scratch build directory and print its path
#   ZIPLM_REQUIRE_FAKE=0   report ops without a fake/meta kernel instead of failing (default 1)
set -euo pipefail

START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

elapsed() { echo "$(( $(date +%s) - START ))s"; }

if ! command -v nvcc >/dev/null 2>&1; then
  echo "cuda_compile_check: SKIP (nvcc not on PATH)"
  exit 0
fi

# Toolkit root: nvcc may be a wrapper script or a symlink, so ask nvcc where it lives.
NVCC_BIN_DIR="$(nvcc --dryrun -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1 || true)"
if [[ -z "$NVCC_BIN_DIR" || ! -x "$NVCC_BIN_DIR/nvcc" ]]; then
  NVCC_BIN_DIR="$(dirname "$(readlink -f "$(command -v nvcc)")")"
fi
CUDA_ROOT="$(cd "$NVCC_BIN_DIR/.." && pwd)"
echo "cuda_compile_check: toolkit at $CUDA_ROOT ($(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"

VENV="${ZIPLM_CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_VERSION="${ZIPLM_CUDA_TORCH:-2.14.1}"
PY="$VENV/bin/python"

venv_ready() {
  [[ -x "$PY" ]] && "$PY" - "$TORCH_VERSION" <<'EOF' >/dev/null 2>&1
import sys
import numpy, ninja, pybind11, setuptools, wheel  # noqa: F401
import torch
want = sys.argv[1]
assert torch.__version__.split("+")[0] == want, torch.__version__
assert torch.version.cuda is not None, "CPU build of torch"
EOF
}

if venv_ready; then
  echo "cuda_compile_check: reusing $VENV (torch $TORCH_VERSION)"
else
  echo "cuda_compile_check: preparing $VENV with torch==$TORCH_VERSION (a few minutes the first time)"
  if [[ ! -x "$PY" ]]; then
    # A half-made venv (interrupted earlier run) is rebuilt from scratch.
    rm -rf "$VENV"
    # Outside any active venv, so the new one gets a plain interpreter.
    SYS_PY="$(env -u VIRTUAL_ENV PATH="$(echo "$PATH" | tr ':' '\n' | grep -v '/\.venv' | paste -sd:)" \
              bash -c 'command -v python3')"
    "$SYS_PY" -m venv "$VENV"
  fi
  "$PY" -m pip install "torch==$TORCH_VERSION" numpy ninja pybind11 setuptools wheel
  venv_ready || { echo "cuda_compile_check: FAIL ($VENV has no CUDA torch $TORCH_VERSION)"; exit 1; }
fi
echo "cuda_compile_check: venv ready after $(elapsed)"

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/ziplm_cuda_check.XXXXXX")"
if [[ "${ZIPLM_KEEP_BUILD:-0}" == "1" ]]; then
  echo "cuda_compile_check: keeping build dir $SCRATCH"
else
  trap 'rm -rf "$SCRATCH"' EXIT
fi

# A minimal toolkit (nvcc + cudart only) lacks the cuBLAS/cuSPARSE/cuSOLVER headers that
# ATen/cuda/CUDAContext.h includes; the CUDA torch wheel brings them (nvidia/cu*/ packages), so
# fall back to those (searched after the toolkit's own -I paths).
# (Only set when needed: an empty CPATH element would mean "the current directory" to gcc.)
EXTRA_ENV=()
if [[ ! -f "$CUDA_ROOT/include/cusparse.h" ]]; then
  PIP_CUDA="$("$PY" -c 'import glob, os, nvidia; d = [p for p in sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "cu*"))) if os.path.exists(os.path.join(p, "include", "cusparse.h"))]; print(d[-1] if d else "")' 2>/dev/null || true)"
  if [[ -n "$PIP_CUDA" ]]; then
    echo "cuda_compile_check: toolkit has no cusparse.h; adding $PIP_CUDA/{include,lib} from the torch wheel"
    EXTRA_ENV=(CPATH="${CPATH:+$CPATH:}$PIP_CUDA/include" LIBRARY_PATH="${LIBRARY_PATH:+$LIBRARY_PATH:}$PIP_CUDA/lib")
  fi
fi

echo "cuda_compile_check: building CUDA extension into $SCRATCH"
# build_ext writes only under --build-lib/--build-temp, so neither the tree nor the main venv changes.
env -u VIRTUAL_ENV ${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"} \
  PATH="$VENV/bin:$CUDA_ROOT/bin:$PATH" \
  CUDA_HOME="$CUDA_ROOT" \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS="${MAX_JOBS:-2}" \
  ZIPLM_FORCE_CUDA=1 ZIPLM_FORCE_CPU=0 \
  "$PY" setup.py --quiet build_ext --build-lib "$SCRATCH/lib" --build-temp "$SCRATCH/tmp"

# The package's Python files next to the built _C*.so, so "import ziplm_ext._C" resolves there.
mkdir -p "$SCRATCH/lib/ziplm_ext"
(cd "$ROOT/ziplm_ext" && find . -name '*.py' -not -path '*/__pycache__/*' -print0 |
   while IFS= read -r -d '' f; do mkdir -p "$SCRATCH/lib/ziplm_ext/$(dirname "$f")"; cp "$f" "$SCRATCH/lib/ziplm_ext/$f"; done)
ls "$SCRATCH"/lib/ziplm_ext/_C*.so >/dev/null

echo "cuda_compile_check: importing the built extension"
# Every op that csrc/ops.cpp defines must have a CPU and a CUDA kernel (fails the check otherwise).
# So must a fake (meta) kernel, registered in C++ (Meta key) or in Python by ziplm_ext.native;
# ZIPLM_REQUIRE_FAKE=0 reports a missing one without failing.
(cd "$SCRATCH" && env -u VIRTUAL_ENV PYTHONPATH="$SCRATCH/lib" ZIPLM_OPS_CPP="$ROOT/csrc/ops.cpp" \
   ZIPLM_CUDA_DIR="$ROOT/csrc/cuda" ZIPLM_REQUIRE_FAKE="${ZIPLM_REQUIRE_FAKE:-1}" "$PY" - <<'EOF'
import glob, os, re
import torch
import ziplm_ext._C as C

print(f"  module: {C.__file__}")
print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), GPU visible: {torch.cuda.is_available()}")
assert C.__file__.startswith(os.getcwd()), "imported a _C that is not the scratch build"
assert C.cuda_built() is True, "ziplm_ext._C.cuda_built() is False in a ZIPLM_FORCE_CUDA build"
try:  # Python-registered fake kernels, if the package registers any on import
    import ziplm_ext.native  # noqa: F401
    import ziplm_ext.native.ops  # noqa: F401
except Exception as e:  # the check below then reports what is missing
    print(f"  note: importing ziplm_ext.native failed ({type(e).__name__}: {e})")

ops = re.findall(r'm\.def\("(\w+)\(', open(os.environ["ZIPLM_OPS_CPP"]).read())
assert ops, "found no m.def(...) op schema in csrc/ops.cpp"
missing = [f"{op} ({key})" for op in ops for key in ("CPU", "CUDA")
           if not (hasattr(torch.ops.ziplm, op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"ziplm::{op}", key))]
assert not missing, f"ops of csrc/ops.cpp without a kernel: {', '.join(missing)}"
print(f"  all {len(ops)} ops of csrc/ops.cpp have CPU and CUDA kernels: {', '.join(ops)}")


def has_fake(op):
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"ziplm::{op}", "Meta"):
        return True
    try:
        from torch._library.simple_registry import singleton
        return singleton.find(f"ziplm::{op}").fake_impl.kernel is not None
    except Exception:
        return False


no_fake = [op for op in ops if not has_fake(op)]
if no_fake:
    msg = f"ops without a fake/meta kernel: {', '.join(no_fake)}"
    assert os.environ["ZIPLM_REQUIRE_FAKE"] != "1", msg
    print(f"  WARNING: {msg} (ZIPLM_REQUIRE_FAKE=0: not failing)")
else:
    print(f"  all {len(ops)} ops have fake/meta kernels")

# Which CUDA kernels are hand-written (a __global__ function in the .cu file that registers the
# op) and which are library calls (ATen/cuBLAS/cuSOLVER only).
for path in sorted(glob.glob(os.path.join(os.environ["ZIPLM_CUDA_DIR"], "*.cu"))):
    src = open(path).read()
    impls = re.findall(r'm\.impl\("(\w+)"', src)
    kernels = re.findall(r'__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)', src)
    kind = f"hand-written __global__ kernels: {', '.join(kernels)}" if kernels else "library calls only"
    print(f"  {os.path.basename(path)}: {', '.join(impls)} -> {kind}")
EOF
)

echo "cuda_compile_check: OK in $(elapsed)"
