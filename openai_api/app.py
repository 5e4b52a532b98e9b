"""The ASGI app: OpenAI's chat completions API over HTTP (JSON and server-sent events).

Requests are translated in `protocol.py`, run as one gRPC stream each in `triton.py` (one shared
`tritonclient.grpc.aio` client), and answered here in OpenAI's response and chunk shapes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from openai_api.errors import APIError, bad_request
from openai_api.protocol import ChatRequest, parse_chat
from openai_api.triton import ENSEMBLE, Delta, triton_stream

log = logging.getLogger("openai_api")

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "stop"}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, d: Delta) -> None:
        self.prompt_tokens = d.num_input_tokens or self.prompt_tokens
        self.completion_tokens += d.num_output_tokens

    def as_dict(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


def create_app(triton_url: str, served_model_name: str = "maverick") -> Starlette:
    from tritonclient.grpc.aio import InferenceServerClient

    state: dict[str, Any] = {}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        state["client"] = InferenceServerClient(triton_url)
        try:
            yield
        finally:
            await state["client"].close()

    async def health(request: Request) -> Response:
        try:
            ready = await state["client"].is_model_ready(ENSEMBLE, client_timeout=5)
        except Exception as e:  # noqa: BLE001 - unreachable, timed out: not ready
            log.debug("health: %s", e)
            ready = False
        return Response(status_code=200 if ready else 503)

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "maverick"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        name = request.path_params["model"]
        if name != served_model_name:
            raise APIError(
                404, f"The model '{name}' does not exist", "invalid_request_error", "model", "model_not_found"
            )
        return JSONResponse(model_card())

    async def chat(request: Request) -> Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON") from None
        req = parse_chat(body, served_model_name)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        deltas = triton_stream(state["client"], req.fields, req.stream)
        if req.stream:
            return await _streamed(deltas, req, cid, now, served_model_name)
        return await _whole(request, deltas, cid, now, served_model_name)

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error},
    )


async def _whole(request: Request, deltas: AsyncIterator[Delta], cid: str, now: int, model: str) -> Response:
    """The non-streamed answer; a client that leaves before it cancels the Triton request."""

    async def collect():
        text, finish, usage = [], None, Usage()
        async for d in deltas:
            text.append(d.text)
            finish = d.finish_reason or finish
            usage.add(d)
        return "".join(text), finish, usage

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)

    work, watcher = asyncio.create_task(collect()), asyncio.create_task(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        left = not work.done()
        if left:
            work.cancel()  # the client left (or this task was cancelled): cancel the Triton request
            await asyncio.gather(work, return_exceptions=True)
            await deltas.aclose()
    if left:
        return Response(status_code=499)
    text, finish, usage = work.result()
    return JSONResponse(
        {
            "id": cid,
            "object": "chat.completion",
            "created": now,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": FINISH_REASONS.get(finish or "stop", "stop"),
                }
            ],
            "usage": usage.as_dict(),
            "system_fingerprint": None,
        }
    )


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _streamed(
    deltas: AsyncIterator[Delta], req: ChatRequest, cid: str, now: int, model: str
) -> Response:
    """Server-sent events as OpenAI sends them. The first response from Triton is awaited before
    the 200 goes out, so a refused request (bad input, overload) gets its HTTP status."""
    try:
        first = await deltas.__anext__()
    except StopAsyncIteration:
        first = None

    def chunk(
        delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True
    ) -> bytes:
        obj = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": now,
            "model": model,
            "system_fingerprint": None,
        }
        obj["choices"] = (
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []
        )
        if req.include_usage:
            obj["usage"] = usage
        return _sse(obj)

    async def events():
        usage, finish = Usage(), None
        try:
            yield chunk({"role": "assistant", "content": ""})
            pending = [first] if first is not None else []
            while True:
                if pending:
                    d = pending.pop()
                else:
                    try:
                        d = await deltas.__anext__()
                    except StopAsyncIteration:
                        break
                usage.add(d)
                finish = d.finish_reason or finish
                if d.text:
                    yield chunk({"content": d.text})
            yield chunk({}, FINISH_REASONS.get(finish or "stop", "stop"))
            if req.include_usage:
                yield chunk({}, usage=usage.as_dict(), choices=False)
            yield b"data: [DONE]\n\n"
        except APIError as e:  # after the 200: an error event, as OpenAI sends it
            yield _sse(e.body())
            yield b"data: [DONE]\n\n"
        finally:
            await deltas.aclose()  # a client that left: cancels the Triton request

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
