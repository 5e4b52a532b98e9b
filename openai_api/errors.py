"""Errors in OpenAI's JSON shape, and what Triton's errors become (HTTP status, type, code)."""

from __future__ import annotations

import grpc
from starlette.responses import JSONResponse

# Seconds a client should wait before retrying a 503 (overloaded, engine restarting, Triton down):
# the engine's queue drains in about a step, an engine restart backs off from 1 s.
RETRY_AFTER_S = 1

# Ensemble messages (no status code over a gRPC stream, docs/api.md) that mean "retry later".
_UNAVAILABLE = ("the server is overloaded", "the engine stopped", "is not ready", "unknown model")
_INTERNAL = ("engine step failed", "internal error")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        retry = {"Retry-After": str(RETRY_AFTER_S)} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=retry)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unsupported(param: str) -> APIError:
    return bad_request(f"'{param}' is unsupported yet by this server", param, "unsupported_parameter")


def triton_error(message: str) -> APIError:
    """An error message from the ensemble (a gRPC stream carries no status code) -> HTTP status."""
    low = message.lower()
    if any(s in low for s in _UNAVAILABLE):
        return APIError(503, message, "service_unavailable", code="service_unavailable")
    if any(s in low for s in _INTERNAL):
        return APIError(500, message, "server_error", code="internal_error")
    return bad_request(message)


def rpc_error(e: grpc.aio.AioRpcError) -> APIError:
    code = e.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN):
        return APIError(503, f"the inference server is unavailable: {e.details()}", "service_unavailable")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return bad_request(e.details() or "invalid request")
    return APIError(500, f"inference server error ({code.name}): {e.details()}", "server_error")
