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
