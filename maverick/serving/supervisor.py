"""The `maverick` model's engine, started again when it dies.

Triton's Python backend cannot mark a model not ready from inside it, so a dead engine process
(a crash, an out-of-memory kill, a tensor-parallel rank that stopped) would leave a model that
answers ready and fails every request for ever. Instead the engine is restarted: requests that
were running, and any that arrive while the new one loads, fail at once with `EngineDeadError`
(UNAVAILABLE: retry), and the model serves again once it is up. Restarts back off (1 s, doubling
up to a minute) while the engine keeps failing to start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable

from maverick.engine.api import Prompt, RequestOutput, SamplingParams
from maverick.engine.engine_client import EngineClient

log = logging.getLogger(__name__)

FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 60.0


class SupervisedEngine:
    """EngineClient's API over whichever engine process is current. `start` makes one; the first
    start's failure is the caller's (the model fails to load)."""

    def __init__(self, start: Callable[[], EngineClient]):
        self._start = start
        self._engine = start()
        self.max_model_len = self._engine.max_model_len
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="maverick-supervisor", daemon=True)
        self._thread.start()

    def generate(
        self, request_id: str, prompt: Prompt, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        return self._engine.generate(request_id, prompt, params)  # a dead one: EngineDeadError

    def abort(self, request_id: str) -> None:
        self._engine.abort(request_id)

    def healthy(self) -> bool:
        return self._engine.healthy()

    def stats(self) -> dict[str, float]:
        """The engine's counters while it runs, with `engine_up` (1 or 0) and `engine_restarts`.
        While it is down: nothing runs, waits or holds KV blocks (its last figures would freeze on
        a dashboard), and the totals stay where they were."""
        engine = self._engine
        up = engine.healthy()
        stats = dict(engine.stats())
        if not up:
            stats.update(num_running=0, num_waiting=0, kv_blocks_used=0)
        return {**stats, "engine_up": float(up), "engine_restarts": float(self.restarts)}

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._engine.shutdown(timeout)
        self._thread.join(timeout)

    def _supervise(self) -> None:
        backoff = FIRST_BACKOFF_S
        while True:
            self._engine.wait_stopped()
            if self._stopping.is_set():
                return
            log.error("the engine stopped (%s); starting it again", self._engine.error)
            self._engine.shutdown()  # its threads and socket; the process is gone
            while not self._stopping.wait(backoff):
                try:
                    engine = self._start()
                except Exception:  # noqa: BLE001 - keep trying, less often
                    log.exception("the engine did not start again; next try in %.0f s", backoff)
                    backoff = min(2 * backoff, MAX_BACKOFF_S)
                    continue
                if self._stopping.is_set():
                    engine.shutdown()
                    return
                self._engine = engine
                self.restarts += 1
                backoff = FIRST_BACKOFF_S
                log.warning("the engine serves again (restart %d)", self.restarts)
                break
            else:
                return
