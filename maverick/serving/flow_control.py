"""One request's flow control in the `maverick` stub: the ack board (response_window.py) counts its
responses in flight; the engine's stream policy holds and merges its updates while the window is
full; and a request that has been silent for HEARTBEAT_S sends a heartbeat (nothing in flight), so
that postprocessing, the only model Triton tells about a cancelled ensemble request, gets a
chance to see it."""

from __future__ import annotations

import time
from collections.abc import Callable

from maverick.engine.api import RequestOutput
from maverick.engine.stream_policy import HeldUpdates
from maverick.serving.response_window import NO_ACK, ResponseWindow

Ack = tuple[int, int, int]  # (board id, slot, value), carried by the response's StepOutput
# Silence after which a heartbeat leaves: the latency of stopping an abandoned request, against a
# postprocessing call per silent request per period.
HEARTBEAT_S = 0.5


class FlowControlledStream:
    """`offer` each engine update of a streamed request and send what it returns; `window` None (no
    free slot) sends every update, unacknowledged. `heartbeat()` says when a silent request (a
    non-streamed one, or one that waits for its first token) should send a heartbeat."""

    def __init__(
        self,
        window: ResponseWindow | None,
        heartbeat_s: float = HEARTBEAT_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.window = window
        self._held = HeldUpdates()
        self._heartbeat_s, self._clock = heartbeat_s, clock
        self._last_sent = clock()

    def offer(self, out: RequestOutput) -> tuple[RequestOutput, Ack] | None:
        """(every update held so far merged with `out`, its ack), or None while the window is full
        (out is held). The last update always leaves."""
        if self.window is None:
            self._last_sent = self._clock()
            return out, NO_ACK
        update = self._held.offer(out, lambda _: self.window.has_room())
        if update is None:
            return None
        self._last_sent = self._clock()
        return update, self.window.send()

    def heartbeat(self) -> Ack | None:
        """The ack of a heartbeat due now, or None: something left within the last heartbeat_s,
        or a response is still in flight (postprocessing has yet to see it, which does as well)."""
        now = self._clock()
        if now - self._last_sent < self._heartbeat_s:
            return None
        if self.window is None:
            self._last_sent = now
            return NO_ACK
        if self.window.in_flight():
            return None
        self._last_sent = now
        return self.window.send()

    def close(self) -> None:
        if self.window is not None:
            self.window.close()
