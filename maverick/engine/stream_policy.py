"""When a request's streamed update leaves, and how updates that wait are merged: the one policy
behind every place that holds updates back.

An update waits (and later leaves merged with the ones after it: deltas joined, totals and state
from the newest) when its sender has a reason to send less often:
- the engine's `stream_interval` (`Coalescer`, in the engine process): at least N new tokens per
  update, so each response's fixed cost is paid once per N tokens;
- flow control in the Triton stub: while a stream has its quota of responses unacknowledged;
- a caller that fell behind (`OutputStreams.iterate`): whatever queued while it was busy.
An update with a request's first token or its last one never waits, so neither TTFT nor the end
is delayed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from maverick.engine.api import RequestOutput


def merge(first: RequestOutput, then: RequestOutput) -> RequestOutput:
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


def has_first_token(update: RequestOutput) -> bool:
    return bool(update.token_ids) and update.num_output_tokens == len(update.token_ids)


class HeldUpdates:
    """Updates that have not left yet, merged per request."""

    def __init__(self) -> None:
        self._held: dict[str, RequestOutput] = {}

    def offer(self, out: RequestOutput, ready: Callable[[RequestOutput], bool]) -> RequestOutput | None:
        """`out` merged after what its request holds; returned when it leaves (finished, its first
        token, or `ready(update)`), else held and None."""
        held = self._held.pop(out.request_id, None)
        update = out if held is None else merge(held, out)
        if update.finished or has_first_token(update) or ready(update):
            return update
        self._held[out.request_id] = update
        return None

    def discard(self, request_id: str) -> None:
        """Forget a request that ended without a finished update (its stream failed)."""
        self._held.pop(request_id, None)


class Coalescer(HeldUpdates):
    """The engine's `stream_interval` (SGLang's name): an update leaves once it carries `interval`
    new tokens; interval 1 passes every update through."""

    def __init__(self, interval: int):
        super().__init__()
        self.interval = interval

    def push(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        if self.interval == 1:
            return outputs
        return [update for out in outputs if (update := self.offer(out, self._due)) is not None]

    def _due(self, update: RequestOutput) -> bool:
        return len(update.token_ids) >= self.interval
