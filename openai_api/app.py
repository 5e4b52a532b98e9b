"""The ASGI app: OpenAI's chat completions and (legacy) completions APIs over HTTP (JSON and
server-sent events), with its own Prometheus metrics on /metrics.

Requests are translated in `protocol.py`, their remote images fetched in `images.py`, run as one
gRPC stream each in `triton.py` (one shared `tritonclient.grpc.aio` client), and answered here in
OpenAI's response and chunk shapes (`shapes.py`: what differs between the two APIs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from client.llm import Chunk
from openai_api import tool_calls
from openai_api.errors import APIError, bad_request
from openai_api.images import ImagePolicy, resolve_images
from openai_api.logprobs import TokenLogprobs
from openai_api.metrics import STARTED, Metrics, MetricsMiddleware, endpoint_of, first_token_timer
from openai_api.protocol import ChatRequest, parse_chat, parse_completion
from openai_api.shapes import CHAT, COMPLETION, Shape
from openai_api.triton import ENSEMBLE, triton_stream

log = logging.getLogger("openai_api")

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "stop", "tool_calls": "tool_calls"}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # prompt tokens served from the engine's prefix cache, as choice 0 found them (with n > 1 the
    # other choices reuse its prompt blocks: the prompt is counted once)
    cached_tokens: int = 0

    def add(self, d: Chunk) -> None:
        if d.num_input_tokens:
            self.prompt_tokens = d.num_input_tokens
            if d.sequence_index == 0:
                self.cached_tokens = d.num_cached_tokens
        self.completion_tokens += d.num_output_tokens

    def as_dict(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def create_app(
    triton_url: str,
    served_model_name: str = "maverick",
    image_policy: ImagePolicy | None = None,
    tokenizer_dir: str | None = None,
) -> Starlette:
    """`image_policy`: which remote image URLs are fetched (images.py); None: none, data URLs only.
    `tokenizer_dir`: the checkpoint whose tokenizer names the tokens of `logprobs` (logprobs.py);
    None: requests for logprobs are refused."""
    from tritonclient.grpc.aio import InferenceServerClient

    token_logprobs = TokenLogprobs.from_dir(tokenizer_dir) if tokenizer_dir else None
    state: dict[str, Any] = {}
    created = int(time.time())
    metrics = Metrics()

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
        return await answer(request, parse_chat(await _json(request), served_model_name), CHAT)

    async def completions(request: Request) -> Response:
        return await answer(request, parse_completion(await _json(request), served_model_name), COMPLETION)

    async def answer(request: Request, req: ChatRequest, shape: Shape) -> Response:
        """One request to the ensemble, answered whole or streamed in `shape`."""
        if req.logprobs and token_logprobs is None:
            raise bad_request(
                "'logprobs' needs the model's tokenizer: this server was started without --tokenizer",
                "logprobs",
            )
        tokens = token_logprobs if req.logprobs else None
        if req.fields.get("images"):
            req.fields["images"] = await resolve_images(req.fields["images"], image_policy)
        cid, now = f"{shape.id_prefix}{uuid.uuid4().hex}", int(time.time())
        deltas = triton_stream(state["client"], req.fields, req.stream)
        if req.stream:
            endpoint = endpoint_of(request.url.path)
            began = request.scope.get(STARTED, time.monotonic())
            deltas = first_token_timer(deltas, began, lambda s: metrics.first_token(endpoint, s))
            return await _streamed(deltas, req, cid, now, served_model_name, shape, tokens)
        return await _whole(request, deltas, cid, now, served_model_name, shape, req, tokens)

    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

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
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error},
        middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
    )


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None


async def _whole(
    request: Request,
    deltas: AsyncIterator[Chunk],
    cid: str,
    now: int,
    model: str,
    shape: Shape = CHAT,
    req: ChatRequest | None = None,
    tokens: TokenLogprobs | None = None,
) -> Response:
    """The non-streamed answer, a choice per `sequence_index` (n > 1: the ensemble answers each
    choice apart); a client that leaves before it cancels the Triton request."""

    async def collect():
        choices: dict[int, _Choice] = {}
        usage = Usage()  # the prompt once, the completion tokens of every choice
        async for d in deltas:
            choices.setdefault(d.sequence_index, _Choice()).add(d, tokens)
            usage.add(d)
        return choices, usage

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
    by_index, usage = work.result()
    choices = []
    for index, choice in sorted(by_index.items()):
        text, finish = "".join(choice.text), choice.finish
        message = shape.message(text)
        if req is not None and req.tool_calls:  # Llama 4's tool calls: the whole answer, or none
            found = tool_calls.parse(text, req.parallel_tool_calls)
            if found.tool_calls:
                message["message"].update(content=None, tool_calls=[c.message() for c in found.tool_calls])
                finish = "tool_calls"
        logprobs = shape.logprobs(choice.logprobs) if tokens is not None else None
        choices.append(
            {
                "index": index,
                **message,
                "logprobs": logprobs,
                "finish_reason": FINISH_REASONS.get(finish or "stop", "stop"),
            }
        )
    return JSONResponse(
        {
            "id": cid,
            "object": shape.object,
            "created": now,
            "model": model,
            "choices": choices,
            "usage": usage.as_dict(),
            "system_fingerprint": None,
        }
    )


@dataclass
class _Choice:
    """One choice's deltas, gathered (a non-streamed answer)."""

    text: list[str] = field(default_factory=list)
    finish: str | None = None
    logprobs: list[dict] = field(default_factory=list)

    def add(self, d: Chunk, tokens: TokenLogprobs | None) -> None:
        self.text.append(d.text)
        self.finish = d.finish_reason or self.finish
        if tokens is not None:
            self.logprobs += tokens.content(d)


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _streamed(
    deltas: AsyncIterator[Chunk],
    req: ChatRequest,
    cid: str,
    now: int,
    model: str,
    shape: Shape = CHAT,
    tokens: TokenLogprobs | None = None,
) -> Response:
    """Server-sent events as OpenAI sends them, each chunk one choice's (its `index`; n > 1: the
    choices' chunks interleave, each ends with its own finish_reason). The first response from
    Triton is awaited before the 200 goes out, so a refused request (bad input, overload) gets its
    HTTP status."""
    try:
        first = await deltas.__anext__()
    except StopAsyncIteration:
        first = None

    def chunk(
        part: dict,
        finish: str | None = None,
        usage: dict | None = None,
        choices: bool = True,
        index: int = 0,
        logprobs: dict | None = None,
    ) -> bytes:
        """`part`: the choice's delta (chat) or text (completions), from `shape`."""
        obj = {
            "id": cid,
            "object": shape.chunk_object,
            "created": now,
            "model": model,
            "system_fingerprint": None,
        }
        obj["choices"] = (
            [{"index": index, **part, "logprobs": logprobs, "finish_reason": finish}] if choices else []
        )
        if req.include_usage:
            obj["usage"] = usage
        return _sse(obj)

    # text that may be a tool call is held until its choice ends (tool_calls.py): a parser per choice
    parsers: dict[int, tool_calls.StreamParser] = {}

    def ending(index: int, finish: str | None) -> list[bytes]:
        """A choice's last chunks: what its parser held, then its finish_reason."""
        out = []
        if (parser := parsers.get(index)) is not None:
            rest = parser.finish()
            if rest.content:
                out.append(chunk(shape.content(rest.content), index=index))
            for i, call in enumerate(rest.tool_calls):
                out.append(chunk({"delta": {"tool_calls": [call.delta(i)]}}, index=index))
            finish = "tool_calls" if rest.tool_calls else finish
        out.append(chunk(shape.closing(), FINISH_REASONS.get(finish or "stop", "stop"), index=index))
        return out

    async def events():
        usage, ended = Usage(), set()  # usage: the prompt once, the completion tokens of every choice
        offsets: dict[int, int] = {}  # completions' text_offset: each choice's token text so far
        echoed: set[int] = set()  # choices whose prompt (req.echo) went out
        try:
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
                i = d.sequence_index  # the choice
                if req.tool_calls and i not in parsers:
                    parsers[i] = tool_calls.StreamParser(req.parallel_tool_calls)
                parser = parsers.get(i)
                text = parser.feed(d.text) if parser else d.text
                if req.echo and i not in echoed:
                    text = req.echo + text
                    echoed.add(i)
                logprobs = None
                if tokens is not None and d.token_ids:
                    entries = tokens.content(d)
                    logprobs = shape.logprobs(entries, offsets.get(i, 0))
                    offsets[i] = offsets.get(i, 0) + sum(len(e["token"]) for e in entries)
                if text or logprobs:
                    yield chunk(shape.content(text), index=i, logprobs=logprobs)
                if d.finish_reason:
                    ended.add(i)
                    for event in ending(i, d.finish_reason):
                        yield event
            for index in range(req.n):
                if index not in ended:
                    for event in ending(index, None):
                        yield event
            if req.include_usage:
                yield chunk({}, usage=usage.as_dict(), choices=False)
            yield b"data: [DONE]\n\n"
        except APIError as e:  # after the 200: an error event, as OpenAI sends it
            yield _sse(e.body())
            yield b"data: [DONE]\n\n"
        finally:
            await deltas.aclose()  # a client that left: cancels the Triton request

    opening = shape.opening()
    head = b"".join(chunk(opening, index=i) for i in range(req.n)) if opening is not None else b""
    return StreamingResponse(
        _leading(head, events()),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _leading(head: bytes, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`events` with `head` (chat's role chunks) sent in the same write as the first of them: the
    role and the first content reach the client in one packet, not two."""
    async for event in events:
        yield head + event
        head = b""
    if head:
        yield head
