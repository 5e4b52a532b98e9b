"""The ASGI app: OpenAI's chat completions API, served by the Triton `ensemble` over gRPC.

One shared `tritonclient.grpc.aio` client; each request is one gRPC `ModelStreamInfer` stream with
Triton's empty final response enabled, so the answer ends on `triton_final_response`. Cancelling
the gRPC call (a client that leaves) cancels the request in Triton, which frees its KV cache.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from client.llm import grpc_inputs

log = logging.getLogger("openai_api")

ENSEMBLE = "ensemble"
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "stop"}
ROLES = ("system", "developer", "user", "assistant")
_OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens")
# Ensemble messages (no status code over a gRPC stream, docs/api.md) that mean "retry later".
_UNAVAILABLE = ("the server is overloaded", "the engine stopped", "is not ready", "unknown model")
_INTERNAL = ("engine step failed", "internal error")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

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


# ---------------------------------------------------------------------------- the request


@dataclass
class ChatRequest:
    fields: dict[str, Any]  # ensemble inputs, client.llm.request_fields' names
    stream: bool = False
    include_usage: bool = False


# OpenAI (and vLLM's extra) sampling parameters -> (ensemble input, type)
_PARAMS = {
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
    "seed": ("seed", int),
    # vLLM's extra sampling parameters
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "repetition_penalty": ("repetition_penalty", float),
    "min_tokens": ("min_tokens", int),
    "ignore_eos": ("ignore_eos", bool),
}
_UNSUPPORTED = ("logit_bias", "tools", "tool_choice", "functions", "function_call", "audio", "prediction")


def _convert_messages(messages: Any) -> tuple[list[dict], list[bytes]]:
    """OpenAI messages -> the ensemble's messages (image parts as {"type": "image"}) and the images'
    bytes in order. Only data URLs: nothing is fetched."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", "messages")
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise unsupported("tools")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        role = "system" if role == "developer" else role
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content must be a string or a list of parts", "messages")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if role not in ("user", "assistant"):
                    raise bad_request(
                        f"{where}: image parts are allowed in user and assistant messages", "messages"
                    )
                images.append(_image_bytes(part.get("image_url"), f"{where}.content[{j}]"))
                parts.append({"type": "image"})
            else:
                raise bad_request(
                    f"{where}.content[{j}]: unsupported part type {kind!r} (expected text or image_url)",
                    "messages",
                )
        out.append({"role": role, "content": parts})
    return out, images


def _image_bytes(image_url: Any, where: str) -> bytes:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise bad_request(f"{where}.image_url.url must be a string", "messages")
    if not url.startswith("data:"):
        raise bad_request(
            f"{where}: only data URLs (data:image/...;base64,...) are accepted; "
            "this server does not fetch remote image URLs",
            "messages",
            "invalid_image_url",
        )
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise bad_request(f"{where}: image data URLs must be base64-encoded", "messages", "invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(
            f"{where}: invalid base64 in the image data URL", "messages", "invalid_image_url"
        ) from None


def parse_chat(body: Any, model_name: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required", "model")
    if model != model_name:
        raise APIError(
            404, f"The model '{model}' does not exist; this server serves '{model_name}'",
            "invalid_request_error", "model", "model_not_found",
        )  # fmt: skip
    if body.get("n") not in (None, 1):
        raise unsupported("n")
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        raise unsupported("logprobs")
    for name in _UNSUPPORTED:
        if body.get(name):
            raise unsupported(name)
    fmt = body.get("response_format")
    if fmt and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise unsupported("response_format")

    messages, images = _convert_messages(body.get("messages"))
    fields: dict[str, Any] = {"messages": json.dumps(messages)}
    if images:
        fields["images"] = images
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise bad_request("'max_tokens' must be a positive integer", "max_tokens")
        fields["max_tokens"] = max_tokens
    for name, (wire, kind) in _PARAMS.items():
        value = body.get(name)
        if value is None:
            continue
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        )  # fmt: skip
        if not ok or (name == "seed" and not 0 <= value < 2**64):
            raise bad_request(
                f"'{name}' must be a {'non-negative ' if name == 'seed' else ''}{kind.__name__}", name
            )
        fields[wire] = kind(value)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad_request("'stop' must be a string or a list of strings", "stop")
        if stop:
            fields["stop_words"] = stop
    fields["return_num_input_tokens"] = True
    fields["return_num_output_tokens"] = True
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    return ChatRequest(
        fields, stream=bool(body.get("stream")), include_usage=bool(options.get("include_usage"))
    )


# ---------------------------------------------------------------------------- Triton


@dataclass
class Delta:
    text: str
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int


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


def _first(result, name: str, default):
    arr = result.as_numpy(name)
    if arr is None:
        return default
    flat = np.asarray(arr, dtype=object).reshape(-1)
    return flat[0] if flat.size else default


async def triton_stream(client, fields: dict[str, Any], stream: bool) -> AsyncIterator[Delta]:
    """One request on its own gRPC stream; yields a Delta per response. Leaving the iterator before
    the final response (a disconnect, cancellation) cancels the call, and so the Triton request."""
    from tritonclient.grpc._utils import _get_inference_request
    from tritonclient.grpc.aio import InferResult

    request = _get_inference_request(
        model_name=ENSEMBLE, inputs=grpc_inputs({**fields, "stream": stream}), model_version="",
        request_id=uuid.uuid4().hex, outputs=None, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, parameters=None,
    )  # fmt: skip
    # tritonclient's aio stream_infer cannot ask for the empty final response: build the request here
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    done = asyncio.Event()

    async def requests():
        yield request
        await done.wait()  # keep the stream open until the final response

    # the shared aio client's stub (tritonclient.grpc.aio has no public way to set the flag above)
    call = client._client_stub.ModelStreamInfer(requests(), metadata=client._get_metadata(None))
    try:
        async for response in call:
            if response.error_message:
                raise triton_error(response.error_message)
            params = response.infer_response.parameters
            final = "triton_final_response" in params and params["triton_final_response"].bool_param
            if response.infer_response.outputs:
                result = InferResult(response.infer_response)
                text = _first(result, "text_output", b"")
                finish = _first(result, "finish_reason", b"")
                yield Delta(
                    text=text.decode() if isinstance(text, bytes) else str(text),
                    finish_reason=(finish.decode() if isinstance(finish, bytes) else str(finish)) or None,
                    num_input_tokens=int(_first(result, "num_input_tokens", 0)),
                    num_output_tokens=int(_first(result, "num_output_tokens", 0)),
                )
            if final:
                done.set()
                return
    except grpc.aio.AioRpcError as e:
        raise rpc_error(e) from None
    finally:
        done.set()
        if not call.done():
            call.cancel()


# ---------------------------------------------------------------------------- the app


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
