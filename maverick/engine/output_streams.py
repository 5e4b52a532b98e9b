"""Per-request output streams, fed from a thread that is not the caller's.

The engine's outputs are produced on one thread (the in-process engine loop, or the reader of an
engine process) and consumed by coroutines on any number of asyncio event loops. Each request has
an asyncio queue on its caller's loop; a batch of outputs wakes each loop once (one
`call_soon_threadsafe` per loop per step, not one per output). Updates that queued while the caller
was busy leave merged (stream_policy.py), so a slow consumer (e.g. one Triton response per update)
catches up instead of falling behind. Used by `AsyncEngine` and `EngineClient`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from maverick.engine.api import Prompt, RequestOutput, SamplingParams
from maverick.engine.errors import RequestError
from maverick.engine.stream_policy import merge

Item = RequestOutput | BaseException  # an exception ends its stream with that error


@dataclass
class Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    n: int = 1  # choices (SamplingParams.n): the stream ends with the finished update of each
    undelivered: int = 1  # finished updates not yet delivered (deliver's count, under the lock)


def _put_all(batch: list[tuple[asyncio.Queue, Item]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


class StreamingEngine:
    """`generate` for an engine front-end: `_submit` registers the request (raising if it is
    refused at once) and returns its stream; leaving the stream before the finished update of each
    of its choices (closing it, being cancelled, an error) aborts the request, which frees its
    blocks."""

    _streams: OutputStreams  # set by the subclass

    def _submit(self, request_id: str, prompt: Prompt, params: SamplingParams) -> Stream:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    async def generate(
        self, request_id: str, prompt: Prompt, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        stream = self._submit(request_id, prompt, params)
        unfinished = params.n
        try:
            async for item in self._streams.iterate(stream):
                unfinished -= item.finished
                yield item
        finally:
            if unfinished:
                self.abort(request_id)


class OutputStreams:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, Stream] = {}
        self._closed: BaseException | None = None  # set by fail_all: no stream opens any more

    def open(self, request_id: str, n: int = 1) -> Stream:
        """Register a request of n choices on the running event loop (call from that loop). Raises
        the error that closed the streams (the engine stopped), so a request never waits on a dead
        engine."""
        stream = Stream(asyncio.get_running_loop(), asyncio.Queue(), n, n)
        with self._lock:
            if self._closed is not None:
                raise type(self._closed)(*self._closed.args)
            if request_id in self._streams:
                raise RequestError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        return stream

    def close(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._streams)

    async def iterate(self, stream: Stream) -> AsyncIterator[RequestOutput]:
        """The stream's updates up to the finished one of each choice; an exception item is raised
        (after the updates queued before it). Whatever queued meanwhile leaves merged, one update
        per choice, in the order the choices first appear."""
        unfinished = stream.n
        while unfinished:
            items = [await stream.queue.get()]
            while not stream.queue.empty():
                items.append(stream.queue.get_nowait())
            merged: dict[int, RequestOutput] = {}
            error = None
            for item in items:
                if isinstance(item, BaseException):
                    error = item
                    break
                held = merged.get(item.index)
                merged[item.index] = item if held is None else merge(held, item)
            for out in merged.values():
                unfinished -= out.finished
                yield out
            if error is not None:
                raise error

    def deliver(self, items: list[tuple[str, Item]]) -> list[str]:
        """Hand a batch of updates to their callers (from any thread): one wake-up per event loop.
        A stream ends with its finished update or an exception. Returns the ids of requests whose
        event loop is closed (nobody listens: the caller should abort them)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Item]]] = {}
        with self._lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                if not isinstance(item, BaseException) and item.finished:
                    stream.undelivered -= 1
                if isinstance(item, BaseException) or stream.undelivered == 0:
                    del self._streams[request_id]
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        orphans: list[str] = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed: none of its requests has a listener
                with self._lock:
                    for request_id, stream in list(self._streams.items()):
                        if stream.loop is loop:
                            del self._streams[request_id]
                            orphans.append(request_id)
        return orphans

    def fail_all(self, error: BaseException) -> None:
        """End every open stream with `error`, and refuse new ones with it (the engine stopped)."""
        with self._lock:
            self._closed = error
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
            except RuntimeError:
                pass  # that caller's loop is already closed
