"""The engine on its own thread, with an asyncio streaming API.

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

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from maverick.engine.llm_engine import EngineConfig, LLMEngine, RequestError, RequestOutput
from maverick.engine.sampling_params import SamplingParams
from maverick.engine.sequence import Prompt, Sequence

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are waiting; this one is refused rather than queued without bound."""


@dataclass
class _Request:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _merge(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive updates of one request as one: deltas joined, totals and state from `then`."""
    logprobs = (
        None
        if first.logprobs is None and then.logprobs is None
        else (first.logprobs or []) + (then.logprobs or [])
    )
    return dataclasses.replace(
        then,
        token_ids=first.token_ids + then.token_ids,
        text=first.text + then.text,
        logprobs=logprobs,
        first_token_time=first.first_token_time
        if first.first_token_time is not None
        else then.first_token_time,
        token_times=first.token_times + then.token_times,
    )


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, *, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(config)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._new: list[Sequence] = []
        self._aborts: list[str] = []
        self._requests: dict[str, _Request] = {}
        self._stop = False
        self._error: BaseException | None = None
        self._tokens_window: list[tuple[float, int]] = []  # (time, tokens) of recent steps
        self._stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="maverick-engine", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt: Prompt, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        self._check_alive()
        seq = self.engine.make_sequence(request_id, prompt, params)  # raises RequestError
        loop = asyncio.get_running_loop()
        req = _Request(loop, asyncio.Queue())
        with self._lock:
            if request_id in self._requests:
                raise RequestError(f"request id {request_id!r} is already in use")
            waiting = len(self._new) + int(self._stats["num_waiting"])
            if waiting >= self.engine.config.max_num_waiting:
                raise EngineOverloadedError(
                    f"the server is overloaded: {waiting} requests are waiting; retry later"
                )
            self._requests[request_id] = req
            self._new.append(seq)
            self._wake.notify()
        finished = False
        held: RequestOutput | BaseException | None = None  # taken from the queue, not yet handled
        try:
            while not finished:
                item, held = held if held is not None else await req.queue.get(), None
                if isinstance(item, BaseException):
                    raise item
                # Updates that queued while the caller was busy leave as one: a slow consumer
                # (e.g. one Triton response per update) catches up instead of falling behind.
                while not item.finished and not req.queue.empty():
                    later = req.queue.get_nowait()
                    if isinstance(later, BaseException):
                        held = later
                        break
                    item = _merge(item, later)
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

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
            return dict(self._stats)

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)

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
                outputs: list[RequestOutput] = []
                for seq in new:
                    try:
                        self.engine.add_sequence(seq)
                    except RequestError as e:
                        self._deliver([(seq.request_id, e)])
                for request_id in aborts:
                    if (out := self.engine.abort(request_id)) is not None:
                        outputs.append(out)
                if self.engine.has_unfinished():
                    outputs += self.engine.step()
                self._deliver([(out.request_id, out) for out in outputs])
                self._update_stats(outputs)
        except BaseException as e:  # noqa: BLE001 - report to every waiting caller, then stop
            log.exception("engine thread died")
            self._error = e
        finally:
            self._fail_all(
                EngineDeadError(f"the engine stopped: {self._error!r}" if self._error else "shut down")
            )

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand a step's outputs to their callers: one wake-up per event loop, not one per output."""
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput | BaseException]]
        ] = {}
        with self._lock:
            for request_id, item in items:
                req = self._requests.get(request_id)
                if req is None:
                    continue
                if isinstance(item, BaseException) or item.finished:
                    del self._requests[request_id]
                by_loop.setdefault(req.loop, []).append((req.queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed: none of its requests has a listener
                with self._lock:
                    for request_id, req in list(self._requests.items()):
                        if req.loop is loop:
                            del self._requests[request_id]
                            self._aborts.append(request_id)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            requests, self._requests = self._requests, {}
        for req in requests.values():
            try:
                req.loop.call_soon_threadsafe(req.queue.put_nowait, error)
            except RuntimeError:
                pass  # that caller's loop is already closed

    def _update_stats(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        self._tokens_window.append((now, sum(len(o.token_ids) for o in outputs)))
        self._tokens_window = [(t, n) for t, n in self._tokens_window if now - t <= 5.0]
        span = now - self._tokens_window[0][0]
        stats = self.engine.stats()
        stats["generation_tokens_per_s"] = sum(n for _, n in self._tokens_window) / span if span > 0 else 0.0
        with self._lock:
            self._stats = stats
