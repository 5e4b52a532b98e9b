"""The launcher's liveness probe (server/liveness.py) against a real server: a dead `maverick` stub
wedges Triton 2.51 (requests hang or fail "not healthy" while /v2/health/live answers 200), and the
launcher must notice, stop the server and exit non-zero within a bound; a paused engine is not a
wedge once it resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from conftest import free_ports, ready_url, wait_ok

from client.llm import HttpClient
from server.launch import EXIT_WEDGED

ROOT = Path(__file__).resolve().parents[1]
INTERVAL_S, TIMEOUT_S, FAILURES = 1.0, 5.0, 2
# the first failed probe comes at most one interval plus one timeout after the kill, each later
# one an interval plus a timeout after that; then the server's clean stop (30 s at most)
BOUND_S = FAILURES * (INTERVAL_S + TIMEOUT_S) + 30 + 10


def _launch(tiny_ckpt, tmp_path) -> tuple[subprocess.Popen, int]:
    http, grpc, metrics, openai = free_ports(4)
    cmd = [
        sys.executable,
        "-m",
        "server.launch",
        f"--model-dir={tiny_ckpt}",
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        f"--metrics-port={metrics}",
        f"--build-dir={tmp_path}",
        f"--liveness-interval={INTERVAL_S}",
        f"--liveness-timeout={TIMEOUT_S}",
        f"--liveness-failures={FAILURES}",
        f"--openai-port={openai}",  # the OpenAI API server beside it: it must go with it
    ]
    log = open(tmp_path / "launch.log", "w")  # noqa: SIM115 - the process holds it
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if wait_ok(ready_url(http), 180, proc) and wait_ok(f"http://localhost:{openai}/health", 60, proc):
        return proc, http
    proc.kill()
    raise AssertionError((tmp_path / "launch.log").read_text()[-3000:])


def _processes(proc: subprocess.Popen, needle: str) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if needle in " ".join(p.cmdline())]


def test_a_dead_maverick_stub_stops_the_server_and_the_launcher_fails(tiny_ckpt, tmp_path):
    proc, http = _launch(tiny_ckpt, tmp_path)
    everything = psutil.Process(proc.pid).children(recursive=True)
    try:
        assert HttpClient(f"localhost:{http}").generate(text="hello", max_tokens=2).num_output_tokens == 2
        [stub] = [
            p
            for p in _processes(proc, "triton_python_backend_stub")
            if "/maverick/1/" in " ".join(p.cmdline())
        ]
        stub.kill()
        killed = time.monotonic()
        status = proc.wait(BOUND_S)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    log = (tmp_path / "launch.log").read_text()
    # Triton 2.51 either aborts on the dead stub (its own non-zero status) or keeps running wedged
    # until the probe stops it (EXIT_WEDGED)
    assert status != 0, log[-3000:]
    assert status != EXIT_WEDGED or "liveness: the stack does not answer" in log
    print(f"launcher exited {status} {took:.1f} s after the stub was killed (bound {BOUND_S:.0f} s)")
    _, alive = psutil.wait_procs(everything, timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive


def test_a_paused_engine_delays_requests_then_they_finish(tiny_ckpt, tmp_path):
    """SIGSTOP the engine process for less than the probe's patience: the requests in flight wait,
    then finish once it continues, and the launcher keeps serving."""
    proc, http = _launch(tiny_ckpt, tmp_path)
    try:
        [engine] = _processes(proc, "maverick.engine.engine_core")
        client = HttpClient(f"localhost:{http}")
        want = client.generate(text="pause here", max_tokens=6, temperature=0.0)
        os.kill(engine.pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(2) as pool:
                futures = [
                    pool.submit(client.generate, text="pause here", max_tokens=6, temperature=0.0)
                    for _ in range(2)
                ]
                time.sleep(3.0)
                assert not any(f.done() for f in futures)  # held by the paused engine
                os.kill(engine.pid, signal.SIGCONT)
                got = [f.result(timeout=60) for f in futures]
        finally:
            os.kill(engine.pid, signal.SIGCONT)
        assert [(g.text, g.token_ids) for g in got] == [(want.text, want.token_ids)] * 2
        time.sleep(2 * INTERVAL_S)
        assert proc.poll() is None  # the probe did not stop a server that answers again
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
