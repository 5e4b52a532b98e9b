"""The OpenAI server's own Prometheus metrics, on its `GET /metrics` (text exposition format 0.0.4).

Written by hand: four families do not justify a dependency (prometheus_client is not installed with
the `openai` extra). Requests are counted by an ASGI middleware around the whole app, so refusals
made before any handler runs (404, 405, bad JSON) count too; a streamed request ends when its last
event is sent. Label values are fixed route names and status codes: no client text in a label.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

# Whole requests run from milliseconds (refusals) to minutes (long answers).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# The routes, by path; anything else is "other" (a scanner's paths must not grow the series).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
STARTED = "openai_api.started"  # scope key: when the middleware saw the request (time.monotonic())


def endpoint_of(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # per bucket (not cumulative), +Inf last
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # the exposition is read while requests update it
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.ttft: dict[str, _Histogram] = {}

    def started(self, endpoint: str) -> None:
        with self._lock:
            self.in_flight[endpoint] += 1

    def finished(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight[endpoint] -= 1
            self.requests[(endpoint, str(status))] += 1
            self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def first_token(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            self.ttft.setdefault(endpoint, _Histogram(TTFT_BUCKETS)).observe(seconds)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            lines += [
                "# HELP openai_api_requests_total HTTP requests answered, by endpoint and status code.",
                "# TYPE openai_api_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'openai_api_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += [
                "# HELP openai_api_requests_in_flight HTTP requests being answered now.",
                "# TYPE openai_api_requests_in_flight gauge",
            ]
            for endpoint, n in sorted(self.in_flight.items()):
                lines.append(f'openai_api_requests_in_flight{{endpoint="{endpoint}"}} {n}')
            lines += _histogram(
                "openai_api_request_duration_seconds",
                "Arrival to the last byte of the answer (a stream: its last event).",
                self.latency,
            )
            lines += _histogram(
                "openai_api_time_to_first_token_seconds",
                "Streamed requests: arrival to the first generated text from Triton.",
                self.ttft,
            )
        return "\n".join(lines) + "\n"


def _histogram(name: str, help_: str, series: dict[str, _Histogram]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    for endpoint, h in sorted(series.items()):
        total = 0
        for bound, count in zip((*h.buckets, float("inf")), h.counts, strict=True):
            total += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            lines.append(f'{name}_bucket{{endpoint="{endpoint}",le="{le}"}} {total}')
        lines.append(f'{name}_sum{{endpoint="{endpoint}"}} {h.sum!r}')
        lines.append(f'{name}_count{{endpoint="{endpoint}"}} {total}')
    return lines


class MetricsMiddleware:
    """Counts every HTTP request: in flight from arrival, then its status and duration once the
    answer's last byte is sent; 500 for an exception before any answer, 499 for a client that left
    before one (a stream cut short keeps the 200 it got)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint, began = endpoint_of(scope["path"]), time.monotonic()
        scope[STARTED] = began
        status, done = None, False
        self.metrics.started(endpoint)

        async def counting_send(message):
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
                self.metrics.finished(endpoint, status, time.monotonic() - began)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            status = status or 500
            raise
        finally:
            if not done:
                self.metrics.finished(endpoint, status or 499, time.monotonic() - began)


async def first_token_timer(
    deltas: AsyncIterator, began: float, observe: Callable[[float], None]
) -> AsyncIterator:
    """`deltas` as they are, calling `observe(seconds since began)` at the first one with text.
    Closing it closes `deltas` (so a client that leaves still cancels the Triton request)."""
    try:
        async for d in deltas:
            if observe is not None and d.text:
                observe(time.monotonic() - began)
                observe = None
            yield d
    finally:
        await deltas.aclose()
