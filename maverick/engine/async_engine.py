"""The engine in-process, on a thread of its own, with an asyncio streaming API: for scripts,
notebooks and tests. `EngineClient` has the same API with the engine in a child process (what the
Triton model runs, so the engine loop never shares a GIL with the server's Python).

    engine = AsyncEngine(EngineConfig(model_dir=...))
    async for out in engine.generate("req-1", prompt, SamplingParams(max_tokens=64)):
        print(out.text, end="")

One thread owns the LLMEngine and runs its loop: take new requests and aborts from a queue, step,
hand each output to the asyncio loop of the request's caller. The loop sleeps while there is no
work. Requests are validated in the caller's thread, so a bad one raises `RequestError` at once.
Each update carries the tokens of one step, or of several when the caller fell behind: updates
queued meanwhile leave merged, so a slow consumer catches up instead of lagging more. Closing the
stream early (`async with contextlib.aclosing(stream)`, or cancelling the task that iterates it)
aborts the request and frees its blocks at once; a stream merely abandoned is aborted when its
event loop finalises it or closes.
"""

from __future__ import annotations

import logging
import threading
import time

from maverick.engine.api import EngineConfig, Prompt, RequestOutput, SamplingParams
from maverick.engine.errors import EngineDeadError, RequestError, overloaded
from maverick.engine.llm_engine import LLMEngine, stats_as_of
from maverick.engine.output_streams import OutputStreams, Stream, StreamingEngine
from maverick.engine.sequence import Sequence
from maverick.engine.stream_policy import Coalescer

log = logging.getLogger(__name__)


class AsyncEngine(StreamingEngine):
    def __init__(self, config: EngineConfig | None = None, *, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(config)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._new: list[list[Sequence]] = []  # each request's sequences (one per choice)
        self._aborts: list[str] = []
        self._streams = OutputStreams()
        self._coalescer = Coalescer(self.engine.config.stream_interval)
        self._stop = False
        self._error: BaseException | None = None
        self._stats, self._stats_at = self.engine.stats(), time.monotonic()
        self._thread = threading.Thread(target=self._run, name="maverick-engine", daemon=True)
        self._thread.start()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # -- public API: generate (StreamingEngine), abort, healthy, stats, shutdown ---------------------
    def _submit(self, request_id: str, prompt: Prompt, params: SamplingParams) -> Stream:
        self._check_alive()
        seqs = self.engine.make_request(request_id, prompt, params)  # raises RequestError
        stream = self._streams.open(request_id, params.n)  # raises RequestError on a duplicate id
        with self._lock:
            waiting = len(self._new) + int(self._stats["num_waiting"])
            if waiting >= self.engine.config.max_num_waiting:
                self._streams.close(request_id)
                raise overloaded(waiting)
            self._new.append(seqs)
            self._wake.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed on the engine thread's next turn (at once if idle)."""
        with self._lock:
            self._aborts.append(request_id)
            self._wake.notify()

    def healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def stats(self) -> dict[str, float]:
        """Counters of the last step (running, waiting, KV blocks, prefix-cache hit rate, tokens/s)."""
        with self._lock:
            return stats_as_of(self._stats, self._stats_at)

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)
        self.engine.close()  # its tensor-parallel ranks, if any

    # -- engine thread -----------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if not self.healthy():
            raise EngineDeadError(f"the engine is not running: {self._error!r}")

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._stop or self._new or self._aborts or self.engine.has_unfinished()):
                        self._wake.wait()
                    if self._stop:
                        break
                    new, self._new = self._new, []
                    aborts, self._aborts = self._aborts, []
                items: list[tuple[str, RequestOutput | BaseException]] = []
                for seqs in new:
                    try:
                        self.engine.add_sequences(seqs)
                    except RequestError as e:
                        items.append((seqs[0].request_id, e))
                outputs = [out for rid in aborts for out in self.engine.abort(rid)]
                if self.engine.has_unfinished():
                    outputs += self.engine.step()
                items += [(out.request_id, out) for out in self._coalescer.push(outputs)]
                orphans = self._streams.deliver(items)
                stats = self.engine.stats()
                with self._lock:
                    self._aborts += orphans
                    self._stats, self._stats_at = stats, time.monotonic()
        except BaseException as e:  # noqa: BLE001 - report to every waiting caller, then stop
            log.exception("engine thread died")
            self._error = e
        finally:
            self._streams.fail_all(
                EngineDeadError(f"the engine stopped: {self._error!r}" if self._error else "shut down")
            )
