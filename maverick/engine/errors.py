"""The errors the engine raises to its callers; front-ends (the Triton adapters, scripts) catch
these and nothing else of the engine's."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine refuses, with a message for the user (INVALID_ARG)."""


class SamplingParamsError(RequestError):
    """A sampling parameter is invalid; the message names it, its value and the allowed range."""


class EngineDeadError(RuntimeError):
    """The engine stopped; no request can be served (UNAVAILABLE)."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are waiting; this one is refused rather than queued without bound
    (UNAVAILABLE)."""


def overloaded(num_waiting: int) -> EngineOverloadedError:
    return EngineOverloadedError(f"the server is overloaded: {num_waiting} requests are waiting; retry later")
