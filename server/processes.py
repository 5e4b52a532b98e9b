"""The server's processes on this host: tritonserver as the launcher's child, stopped cleanly on a
signal or by the liveness probe when wedged; the OpenAI API server beside it; and the host
resources a server owns (its ports, its shared-memory regions), checked and cleaned before a start."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from server.companion import Companion
from server.liveness import LivenessPolicy, LivenessProbe

if TYPE_CHECKING:
    from server.launch import ServeConfig

EXIT_WEDGED = 3  # the liveness probe stopped the server (server/liveness.py)


def run_server(cmd: list[str], env: dict[str, str], cfg: ServeConfig, policy: LivenessPolicy) -> int:
    """tritonserver as this process's child, in a session of its own: Ctrl-C and SIGTERM reach this
    launcher, which passes one SIGINT on (Triton's clean stop); if the launcher dies the server gets
    SIGTERM (PR_SET_PDEATHSIG). The liveness probe stops a wedged server. Returns the server's
    exit status, or EXIT_WEDGED."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    wedged = threading.Event()

    def on_wedged(reason: str) -> None:
        if proc.poll() is not None:
            return  # it stopped on its own meanwhile
        print(f"liveness: the stack does not answer ({reason}); stopping the server", file=sys.stderr)
        wedged.set()
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
            return
        proc.kill()

    probe = LivenessProbe(
        f"localhost:{cfg.http_port}", policy, lambda: server_ready(cfg.http_port), on_wedged
    )

    def stop(*_):
        probe.stop()  # a server on its way down stops answering: not a wedge
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    probe.start()
    openai = None
    if cfg.openai_port:
        openai = Companion("the OpenAI API server", openai_command(cfg), _die_with_parent).start()
    status = proc.wait()
    probe.stop()
    if openai is not None:
        openai.stop()
    # stubs and engine processes left by a server that gave up at its exit timeout share its group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return EXIT_WEDGED if wedged.is_set() else status


def openai_command(cfg: ServeConfig) -> list[str]:
    """openai_api/ against this server's gRPC port (it answers 503 until the ensemble is ready)."""
    return [
        sys.executable,
        "-m",
        "openai_api",
        f"--triton-url=localhost:{cfg.grpc_port}",
        f"--port={cfg.openai_port}",
        f"--tokenizer={Path(cfg.model_dir).resolve()}",  # the tokens of `logprobs`
        "--log-level=warning",
    ]


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def server_ready(http_port: int) -> bool:
    """Whether Triton on this HTTP port answers ready."""
    try:
        with urllib.request.urlopen(f"http://localhost:{http_port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def shm_region_prefix(http_port: int) -> str:
    """The Python backend's shared-memory regions of the server on this HTTP port."""
    return f"maverick_{http_port}_"


def remove_stale_regions(http_port: int) -> list[Path]:
    """Remove /dev/shm regions a killed server on this port left (call with the port free: no
    living server owns them then); returns them."""
    shm = Path("/dev/shm")
    stale = sorted(shm.glob(f"{shm_region_prefix(http_port)}*")) if shm.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
