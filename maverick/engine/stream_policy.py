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

import numpy as np

from maverick.engine.api import RequestOutput


def _join(a: list | None, b: list | None) -> list | None:
    return None if a is None and b is None else (a or []) + (b or [])


def _stack(a, b):
    return b if a is None else a if b is None else np.concatenate([a, b])


def merge(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive updates of one request as one: deltas joined, totals and state (the
    cumulative log-prob included) from `then`."""
    return dataclasses.replace(
        then,
        token_ids=first.token_ids + then.token_ids,
        text=first.text + then.text,
        logprobs=_join(first.logprobs, then.logprobs),
        top_token_ids=_join(first.top_token_ids, then.top_token_ids),
        top_logprobs=_join(first.top_logprobs, then.top_logprobs),
        first_token_time=first.first_token_time
        if first.first_token_time is not None
        else then.first_token_time,
        token_times=first.token_times + then.token_times,
        context_logits=first.context_logits if first.context_logits is not None else then.context_logits,
        generation_logits=_stack(first.generation_logits, then.generation_logits),
    )


def has_first_token(update: RequestOutput) -> bool:
    return bool(update.token_ids) and update.num_output_tokens == len(update.token_ids)


class HeldUpdates:
    """Updates that have not left yet, merged per request and choice."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], RequestOutput] = {}

    def offer(self, out: RequestOutput, ready: Callable[[RequestOutput], bool]) -> RequestOutput | None:
        """`out` merged after what its choice holds; returned when it leaves (finished, its first
        token, or `ready(update)`), else held and None."""
        key = (out.request_id, out.index)
        held = self._held.pop(key, None)
        update = out if held is None else merge(held, out)
        if update.finished or has_first_token(update) or ready(update):
            return update
        self._held[key] = update
        return None

    def discard(self, request_id: str) -> None:
        """Forget a request that ended without a finished update (its stream failed)."""
        for key in [k for k in self._held if k[0] == request_id]:
            del self._held[key]


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
