"""The README's two commands, as a newcomer runs them: `make serve`, then the client streams an
answer; `make stop` ends the server cleanly."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
from conftest import free_ports, ready_url, wait_ok

from maverick.serving.response_window import BOARD_PREFIX, board_dir
from server.launch import shm_region_prefix

ROOT = Path(__file__).resolve().parents[1]


def _ack_boards() -> set[Path]:
    """The maverick instances' flow-control boards (maverick/serving/response_window.py)."""
    return set(board_dir().glob(f"{BOARD_PREFIX}*"))


def _held(board: Path) -> bool:
    """Whether a living process holds the board's lock (its creator does while it lives)."""
    try:
        fd = os.open(board, os.O_RDWR)
    except FileNotFoundError:
        return True  # removed meanwhile: not left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_make_serve_then_stream_an_answer_then_make_stop(tmp_path, triton):
    """`triton`: another server from this checkout, on other ports, which `make stop HTTP_PORT=`
    must leave serving. A shared-memory region that a killed server on the same port left behind
    is removed at start."""
    http, grpc, metrics, openai = free_ports(4)
    boards_before = _ack_boards()
    stale = Path("/dev/shm") / f"{shm_region_prefix(http)}left_by_a_killed_server"
    stale.write_bytes(b"\0" * 4096)
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    serve = subprocess.Popen(
        [
            "make",
            "serve",
            f"HTTP_PORT={http}",
            f"GRPC_PORT={grpc}",
            f"METRICS_PORT={metrics}",
            f"OPENAI_PORT={openai}",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_ok(ready_url(http), 180, serve), (tmp_path / "serve.log").read_text()[-3000:]
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
        # the OpenAI-compatible API beside it (tests/test_openai_api.py holds its answers)
        assert wait_ok(f"http://localhost:{openai}/health", 60, serve)
        with urllib.request.urlopen(f"http://localhost:{openai}/v1/models", timeout=5) as r:
            assert [m["id"] for m in json.load(r)["data"]] == ["maverick"]
        printed = (tmp_path / "serve.log").read_text()
        assert f"http://localhost:{http}" in printed and f"localhost:{grpc}" in printed
        processes = psutil.Process(serve.pid).children(recursive=True)
        assert any("maverick.engine.engine_core" in " ".join(p.cmdline()) for p in processes)
    finally:
        subprocess.run(["make", "stop", f"HTTP_PORT={http}"], cwd=ROOT, capture_output=True, timeout=30)
        assert serve.wait(timeout=30) == 0
        log.close()
    assert not stale.exists()
    assert wait_ok(ready_url(triton.cfg.http_port), 1)  # the other server serves on
    # Nothing outlives the server: tritonserver, the models' stubs and the engine process, and
    # the maverick instance's shared-memory board.
    _, alive = psutil.wait_procs(processes, timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    # (boards that appeared meanwhile and are still held belong to other servers on this host)
    assert not [b for b in _ack_boards() - boards_before if not _held(b)]
