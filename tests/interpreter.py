"""Run Python under Triton's interpreter (TRITON_INTERPRET=1: kernels execute on CPU tensors).

Triton reads the variable when `@triton.jit` decorates a kernel, so it must be set before the
kernel modules are imported: a subprocess, whatever this test process imported already.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(args: list[str], timeout: float = 300) -> None:
    """`python ARGS` with the interpreter on and the project importable; fails the test on error."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


# Runs in the subprocess: checks the kernel really is interpreted, then every case through the
# wrapper; a failing case reports its traceback instead of stopping the others.
_CASES_RUNNER = """
import sys, traceback
import importlib
import torch
from triton.runtime.interpreter import InterpretedFunction
module = importlib.import_module(sys.argv[1])
kernel = getattr(module, sys.argv[2])
assert isinstance(kernel, InterpretedFunction), type(kernel)
function = getattr(module, sys.argv[3])
results = {}
for name, case in torch.load(sys.argv[4]).items():
    try:
        results[name] = function(**case)
    except Exception:
        results[name] = traceback.format_exc()
torch.save(results, sys.argv[5])
"""


def run_cases(module: str, kernel: str, function: str, cases: dict, tmp: Path) -> dict:
    """{name: kwargs} -> {name: `module.function(**kwargs)`, or the traceback it raised}, with
    `module.kernel` (a Triton kernel the function launches) running in the interpreter."""
    import torch

    torch.save(cases, tmp / "cases.pt")
    run_interpreted(
        ["-c", _CASES_RUNNER, module, kernel, function, str(tmp / "cases.pt"), str(tmp / "out.pt")]
    )
    return torch.load(tmp / "out.pt")
