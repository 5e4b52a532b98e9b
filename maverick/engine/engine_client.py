"""The engine in a child process, behind AsyncEngine's asyncio API.

    engine = EngineClient(EngineConfig(model_dir=...))
    async for out in engine.generate("req-1", prompt, SamplingParams(max_tokens=64)):
        print(out.text, end="")

The child runs `maverick.engine.engine_core` (the engine loop, its own interpreter and GIL); this
side keeps two threads: a sender (requests and aborts, in order, so no event loop ever blocks on
the socket) and a reader (each step's outputs, handed to the callers' event loops by
`OutputStreams`). Requests are validated in the child: a bad one ends its stream with
`RequestError` (as the first item), a refused one with `EngineOverloadedError`. If the child dies,
every open stream and every later request gets `EngineDeadError`; if this process dies, the child
sees its socket close and exits.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from maverick.engine.api import EngineConfig, Prompt, RequestOutput, SamplingParams
from maverick.engine.engine_core import recv, send
from maverick.engine.errors import EngineDeadError, EngineOverloadedError, RequestError
from maverick.engine.llm_engine import stats_as_of
from maverick.engine.output_streams import OutputStreams, Stream, StreamingEngine

log = logging.getLogger(__name__)

_ERRORS = {"request": RequestError, "overloaded": EngineOverloadedError}


def python_executable() -> str:
    """The interpreter for the child: $MAVERICK_PYTHON, else this one. Inside Triton's Python
    backend `sys.executable` is the stub, not Python; the interpreter the stub embeds lives under
    its exec_prefix."""
    if exe := os.environ.get("MAVERICK_PYTHON"):
        return exe
    if sys.executable and os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (os.path.join(sys.exec_prefix, "bin", version), shutil.which(version)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"no {version} interpreter found for the engine process; set MAVERICK_PYTHON")


class EngineClient(StreamingEngine):
    def __init__(self, config: EngineConfig):
        ours, theirs = socket.socketpair()
        # The child imports what this process imports: its sys.path (the venv's site-packages
        # that a Triton stub added at run time included) goes first on the child's.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        with theirs:
            self._proc = subprocess.Popen(
                [python_executable(), "-m", "maverick.engine.engine_core", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=env,
            )
        self._conn = Connection(ours.detach())
        try:
            send(self._conn, ("config", config))
            kind, info = recv(self._conn)  # blocks while the child loads the model
        except (EOFError, OSError):
            kind, info = "failed", f"the engine process exited with status {self._proc.wait()}"
        if kind != "ready":
            self._conn.close()
            self._proc.wait()
            raise RuntimeError(f"the engine process did not start: {info}")
        self.config = config
        self.max_model_len: int = info["max_model_len"]
        self._stats: dict[str, float] = info["stats"]
        self._stats_at = time.monotonic()
        self._error: str | None = None
        self._streams = OutputStreams()
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="maverick-engine-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="maverick-engine-recv", daemon=True)
        self._sender.start()
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    # -- public API (AsyncEngine's): generate (StreamingEngine), abort, healthy, stats, shutdown --
    def _submit(self, request_id: str, prompt: Prompt, params: SamplingParams) -> Stream:
        stream = self._streams.open(request_id, params.n)  # raises EngineDeadError once the child is gone
        self._outbox.put(("add", request_id, prompt, params))
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request; the child frees its blocks on its next turn."""
        self._outbox.put(("abort", request_id))

    def healthy(self) -> bool:
        return self._error is None and self._reader.is_alive() and self._proc.poll() is None

    def stats(self) -> dict[str, float]:
        """The child's counters after its last step that produced outputs."""
        return stats_as_of(self._stats, self._stats_at)

    @property
    def error(self) -> str | None:
        """Why the engine process stopped, once it has (None while it runs, or after a shutdown)."""
        return self._error

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the engine process has stopped (died, or shut down); False on timeout."""
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._outbox.put(("shutdown",))
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._outbox.put(None)
        self._reader.join(timeout)
        self._sender.join(timeout)
        self._conn.close()

    # -- threads -----------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                send(self._conn, message)
            except OSError:
                return  # the child is gone; the reader reports it
            except Exception as e:  # noqa: BLE001 - e.g. a prompt that does not pickle: that request fails
                if message[0] == "add":
                    self._streams.deliver([(message[1], RequestError(f"cannot send the request: {e}"))])
            if message[0] == "shutdown":
                return

    def _read_loop(self) -> None:
        reason = "shut down"
        try:
            while True:
                message = recv(self._conn)
                if message[0] == "died":
                    reason = message[1]
                    break
                _, outputs, errors, stats = message
                items: list[tuple[str, RequestOutput | BaseException]] = [(o.request_id, o) for o in outputs]
                items += [(rid, _ERRORS[kind](text)) for rid, kind, text in errors]
                self._stats, self._stats_at = stats, time.monotonic()
                for request_id in self._streams.deliver(items):
                    self.abort(request_id)  # its caller's event loop is closed
        except (EOFError, OSError):
            status = self._proc.wait()
            if status != 0:
                reason = f"the engine process exited with status {status}"
        except Exception as e:  # noqa: BLE001 - a message this side cannot read: stop cleanly
            log.exception("reading from the engine process failed")
            reason = f"{type(e).__name__}: {e}"
            self._proc.kill()
        if reason != "shut down":
            self._error = reason
            log.error("the engine process stopped: %s", reason)
        self._streams.fail_all(EngineDeadError(f"the engine stopped: {reason}"))
