"""A process the launcher runs beside tritonserver (the OpenAI-compatible API server): started with
it, started again when it dies on its own (backing off 1 s, doubling to 30 s), stopped with it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable

FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0
HEALTHY_AFTER_S = 30.0  # a run this long resets the backoff


class Companion:
    def __init__(self, name: str, cmd: list[str], preexec_fn: Callable[[], None] | None = None):
        self.name, self.cmd, self._preexec_fn = name, cmd, preexec_fn
        self._stopping = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name=f"companion-{name}", daemon=True)

    def start(self) -> Companion:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = FIRST_BACKOFF_S
        while not self._stopping.is_set():
            began = time.monotonic()
            self._proc = subprocess.Popen(self.cmd, preexec_fn=self._preexec_fn)
            status = self._proc.wait()
            if self._stopping.is_set():
                return
            # a run that lasted resets the backoff; one that dies at once waits longer each time
            lasted = time.monotonic() - began >= HEALTHY_AFTER_S
            backoff = FIRST_BACKOFF_S if lasted else min(2 * backoff, MAX_BACKOFF_S)
            print(
                f"{self.name} exited with status {status}; starting it again in {backoff:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            self._stopping.wait(backoff)
