"""One streamed request's flow control in the `maverick` stub: the ack board (response_window.py)
counts its responses in flight; the engine's stream policy holds and merges its updates while the
window is full."""

from __future__ import annotations

from maverick.engine.api import RequestOutput
from maverick.engine.stream_policy import HeldUpdates
from maverick.serving.response_window import NO_ACK, ResponseWindow

Ack = tuple[int, int, int]  # (board id, slot, value), carried by the response's StepOutput


class FlowControlledStream:
    """`offer` each engine update of the request and send what it returns; `window` None (no free
    slot, or a non-streamed request) sends every update, unacknowledged."""

    def __init__(self, window: ResponseWindow | None):
        self.window = window
        self._held = HeldUpdates()

    def offer(self, out: RequestOutput) -> tuple[RequestOutput, Ack] | None:
        """(every update held so far merged with `out`, its ack), or None while the window is full
        (out is held). The last update always leaves."""
        if self.window is None:
            return out, NO_ACK
        update = self._held.offer(out, lambda _: self.window.has_room())
        return None if update is None else (update, self.window.send())

    def close(self) -> None:
        if self.window is not None:
            self.window.close()
