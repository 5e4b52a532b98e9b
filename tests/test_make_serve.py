"""The README's two commands, as a newcomer runs them: `make serve`, then the client streams an
answer; `make stop` ends the server cleanly."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
from conftest import free_ports

from maverick.serving.response_window import BOARD_PREFIX, board_dir

ROOT = Path(__file__).resolve().parents[1]


def _ready(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def _ack_boards() -> set[Path]:
    """The maverick instances' flow-control boards (maverick/serving/response_window.py)."""
    return set(board_dir().glob(f"{BOARD_PREFIX}*"))


def test_make_serve_then_stream_an_answer_then_make_stop(tmp_path):
    http, grpc, metrics = free_ports(3)
    boards_before = _ack_boards()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    serve = subprocess.Popen(
        ["make", "serve", f"HTTP_PORT={http}", f"GRPC_PORT={grpc}", f"METRICS_PORT={metrics}"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        assert _ready(http, 180), (tmp_path / "serve.log").read_text()[-3000:]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "client",
                "chat",
                "Hello!",
                "--stream",
                "--max-tokens",
                "8",
                "--url",
                f"localhost:{grpc}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "8 generated tokens" in out.stderr and "TTFT" in out.stderr
        printed = (tmp_path / "serve.log").read_text()
        assert f"http://localhost:{http}" in printed and f"localhost:{grpc}" in printed
        processes = psutil.Process(serve.pid).children(recursive=True)
        assert any("maverick.engine.engine_core" in " ".join(p.cmdline()) for p in processes)
    finally:
        subprocess.run(["make", "stop"], cwd=ROOT, capture_output=True, timeout=30)
        assert serve.wait(timeout=30) == 0
        log.close()
    # Nothing outlives the server: tritonserver, the models' stubs and the engine process, and
    # the maverick instance's shared-memory board.
    _, alive = psutil.wait_procs(processes, timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    assert _ack_boards() <= boards_before
