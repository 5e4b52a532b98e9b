"""`python -m openai_api` as its own process for the tests of openai_api/: started on a free port,
ready once a URL answers 200, stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import free_ports, wait_ok

MODEL = "maverick-tiny"


@contextlib.contextmanager
def serve(
    triton_url: str, log: Path, ready: str = "/health", args: tuple[str, ...] = (), env: dict | None = None
):
    """The server against `triton_url` with `args` (its flags) and `env` over this environment,
    yielding its base URL."""
    (port,) = free_ports(1)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "openai_api", "--triton-url", triton_url, "--port", str(port),
             "--host", "127.0.0.1", "--served-model-name", MODEL, "--log-level", "warning", *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip
    try:
        assert wait_ok(f"http://127.0.0.1:{port}{ready}", 30, proc), log.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
