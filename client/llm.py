"""A small client for the `ensemble` model over gRPC (tritonclient, streaming) or HTTP
(`/generate` and `/generate_stream`, server-sent events).

    from client.llm import GrpcClient, HttpClient
    with GrpcClient("localhost:8001") as c:
        for chunk in c.stream(messages=[{"role": "user", "content": "Hi"}], max_tokens=64):
            print(chunk.text, end="", flush=True)

Both clients take the same request fields: `text` (raw prompt), or `messages` (OpenAI shape) with
`images` (bytes, in the order of the image parts), `system` and `tools`; sampling fields by their server
names (`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop_words`, ...).
"""

from __future__ import annotations

import base64
import json
import queue
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODEL = "ensemble"

# server input name -> (tritonclient dtype, numpy dtype) for the optional scalar fields
SCALARS = {
    "max_tokens": ("INT32", np.int32),
    "min_tokens": ("INT32", np.int32),
    "min_length": ("INT32", np.int32),
    "temperature": ("FP32", np.float32),
    "top_p": ("FP32", np.float32),
    "top_k": ("INT32", np.int32),
    "min_p": ("FP32", np.float32),
    "seed": ("UINT64", np.uint64),
    "repetition_penalty": ("FP32", np.float32),
    "presence_penalty": ("FP32", np.float32),
    "frequency_penalty": ("FP32", np.float32),
    "end_id": ("INT32", np.int32),
    "ignore_eos": ("BOOL", bool),
    "include_stop_str_in_output": ("BOOL", bool),
    "exclude_input_in_output": ("BOOL", bool),
    "apply_chat_template": ("BOOL", bool),
    "allow_special_tokens": ("BOOL", bool),
    "return_log_probs": ("BOOL", bool),
    "return_num_input_tokens": ("BOOL", bool),
    "return_num_output_tokens": ("BOOL", bool),
    "top_log_probs": ("INT32", np.int32),
    "num_return_sequences": ("INT32", np.int32),
    "return_context_logits": ("BOOL", bool),
    "return_generation_logits": ("BOOL", bool),
    "return_perf_metrics": ("BOOL", bool),
    "pad_id": ("INT32", np.int32),
    "beam_width": ("INT32", np.int32),
    "length_penalty": ("FP32", np.float32),
}
LISTS = ("stop_words", "bad_words", "embedding_bias_words")
# one string each; logit_bias is OpenAI's JSON object {"token id": bias} (a dict is sent as JSON)
STRINGS = (
    "text_input", "messages", "system_prompt", "logit_bias", "tools",
    "guided_decoding_guide_type", "guided_decoding_guide",
)  # fmt: skip


class ServerError(RuntimeError):
    """The server refused or failed a request; `.message` is its text."""

    def __init__(self, message: str, status: str | int | None = None):
        super().__init__(message if status is None else f"[{status}] {message}")
        self.message, self.status = message, status


@dataclass
class Chunk:
    """One streamed response: a text delta and the tokens behind it."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int  # in this chunk
    time: float  # time.monotonic() when it arrived
    sequence_index: int = 0  # the choice, with num_return_sequences > 1
    log_probs: list[float] | None = None  # with return_log_probs: one per token
    cum_log_prob: float | None = None  # with return_log_probs: the choice's sum so far
    # with top_log_probs = K: [tokens][K] most likely token ids and their log-probs
    top_log_prob_ids: list[list[int]] | None = None
    top_log_probs: list[list[float]] | None = None
    num_cached_tokens: int = 0  # of num_input_tokens, from the prefix cache (with return_num_input_tokens)


@dataclass
class Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    start: float = 0.0
    first_token_time: float | None = None
    end: float = 0.0
    # with return_log_probs (and top_log_probs): one per token; the cumulative of the last chunk
    log_probs: list[float] = field(default_factory=list)
    cum_log_prob: float | None = None
    top_log_probs: list[list[float]] = field(default_factory=list)
    top_log_prob_ids: list[list[int]] = field(default_factory=list)

    def add(self, chunk: Chunk) -> None:
        self.text += chunk.text
        self.token_ids += chunk.token_ids
        self.log_probs += chunk.log_probs or []
        self.cum_log_prob = chunk.cum_log_prob if chunk.cum_log_prob is not None else self.cum_log_prob
        self.top_log_probs += chunk.top_log_probs or []
        self.top_log_prob_ids += chunk.top_log_prob_ids or []
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.num_input_tokens = chunk.num_input_tokens or self.num_input_tokens
        self.num_output_tokens += chunk.num_output_tokens
        if self.first_token_time is None and chunk.num_output_tokens:
            self.first_token_time = chunk.time
        self.end = chunk.time

    def summary(self) -> str:
        ttft = (self.first_token_time - self.start) if self.first_token_time else float("nan")
        span = self.end - (self.first_token_time or self.start)
        rate = (
            (self.num_output_tokens - 1) / span if span > 0 and self.num_output_tokens > 1 else float("nan")
        )
        return (
            f"[{self.num_input_tokens} prompt + {self.num_output_tokens} generated tokens, "
            f"TTFT {ttft * 1e3:.0f} ms, {rate:.1f} tokens/s, {self.end - self.start:.2f} s, "
            f"finish: {self.finish_reason}]"
        )


def request_fields(
    text: str | None = None,
    messages: list[dict] | None = None,
    images: list[bytes] = (),
    system: str | None = None,
    tools: list[dict] | None = None,
    **sampling: Any,
) -> dict[str, Any]:
    """The request as {input name: python value} (lists for the list-valued inputs). `tools`:
    OpenAI's function tools, listed in the chat's system message (sent as JSON text)."""
    unknown = set(sampling) - set(SCALARS) - set(LISTS) - {"logit_bias", "embedding_bias_weights"}
    unknown -= {"guided_decoding_guide_type", "guided_decoding_guide"}
    if unknown:
        raise ValueError(f"unknown request fields {sorted(unknown)}")
    fields: dict[str, Any] = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(fields.get("logit_bias"), dict):
        fields["logit_bias"] = json.dumps({str(k): v for k, v in fields["logit_bias"].items()})
    # the summary line shows the prompt's size, which the server only sends when asked
    fields.setdefault("return_num_input_tokens", True)
    if messages is not None:
        fields["messages"] = json.dumps(messages)
    if text is not None:
        fields["text_input"] = text
    if system is not None:
        fields["system_prompt"] = system
    if tools is not None:
        fields["tools"] = json.dumps(tools)
    if images:
        fields["images"] = list(images)
    return fields


def grpc_inputs(fields: dict[str, Any]) -> list:
    """Request fields (`request_fields`' names) -> tritonclient.grpc InferInputs, one row each."""
    import tritonclient.grpc as grpcclient  # here: a gevent caller sets gRPC up before importing it

    inputs = []

    def add(name: str, arr: np.ndarray, dtype: str) -> None:
        inp = grpcclient.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)

    for name, value in fields.items():
        if name in STRINGS:
            add(
                name, np.array([[value.encode() if isinstance(value, str) else value]], dtype=object), "BYTES"
            )
        elif name == "images":
            add(name, np.array([value], dtype=object), "BYTES")
        elif name in LISTS:
            add(name, np.array([[w.encode() for w in value]], dtype=object), "BYTES")
        elif name == "embedding_bias_weights":
            add(name, np.array([value], dtype=np.float32), "FP32")
        else:
            dtype, np_dtype = SCALARS.get(name, ("BOOL", bool))
            add(name, np.array([[value]], dtype=np_dtype), dtype)
    return inputs


class GrpcClient:
    """gRPC streaming (`start_stream`); `stream()` yields chunks as they arrive."""

    def __init__(self, url: str = "localhost:8001", model: str = MODEL):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.model = model

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def _inputs(self, fields: dict[str, Any], stream: bool):
        return grpc_inputs({**fields, "stream": stream})

    def stream(self, *, request_id: str | None = None, stream: bool = True, **kwargs) -> Iterator[Chunk]:
        """Send one request on a gRPC stream and yield its responses. Closing the iterator early
        cancels the request on the server."""
        return self.stream_fields(request_fields(**kwargs), stream=stream, request_id=request_id)

    def stream_fields(self, fields: dict[str, Any], *, stream: bool = True, request_id: str | None = None):
        """Like stream(), from {input name: value} as they go on the wire."""
        return self.stream_inputs(self._inputs(fields, stream), request_id=request_id)

    def stream_inputs(self, inputs: list, *, request_id: str | None = None) -> Iterator[Chunk]:
        """Like stream(), from tritonclient InferInputs."""
        responses: queue.Queue = queue.Queue()
        self.client.start_stream(
            callback=lambda result, error: responses.put((result, error, time.monotonic()))
        )
        done = False
        try:
            self.client.async_stream_infer(
                self.model,
                inputs,
                request_id=request_id or uuid.uuid4().hex,
                enable_empty_final_response=True,
            )
            while not done:
                result, error, t = responses.get()
                if error is not None:
                    raise ServerError(error.message(), error.status())
                params = result.get_response().parameters
                done = bool(
                    params.get("triton_final_response") and params["triton_final_response"].bool_param
                )
                if result.as_numpy("text_output") is None:
                    continue  # the empty final response
                yield chunk_from({n: result.as_numpy(n) for n in OUTPUTS}, t)
        finally:
            self.client.stop_stream(cancel_requests=not done)

    def generate(self, **kwargs) -> Result:
        result = Result(start=time.monotonic())
        for chunk in self.stream(**kwargs):
            result.add(chunk)
        return result


OUTPUTS = (  # the ensemble's outputs a Chunk reads
    "text_output",
    "output_token_ids",
    "finish_reason",
    "num_input_tokens",
    "num_cached_tokens",
    "num_output_tokens",
    "sequence_index",
    "output_log_probs",
    "cum_log_probs",
    "output_top_log_probs",
    "output_top_log_prob_ids",
)


def _first(arr, default=None):
    if arr is None:
        return default
    flat = np.asarray(arr, dtype=object).reshape(-1)
    return flat[0] if flat.size else default


def chunk_from(values: dict[str, Any], t: float) -> Chunk:
    """One response's outputs (name -> array, or JSON values over HTTP), arrived at t."""
    text = _first(values.get("text_output"), b"")
    finish = _first(values.get("finish_reason"), b"")
    text = text.decode() if isinstance(text, bytes) else str(text)
    finish = finish.decode() if isinstance(finish, bytes) else str(finish)
    ids = values.get("output_token_ids")
    token_ids = [int(i) for i in np.asarray(ids).reshape(-1)] if ids is not None else []
    lps, cum = values.get("output_log_probs"), values.get("cum_log_probs")
    top, top_ids = values.get("output_top_log_probs"), values.get("output_top_log_prob_ids")
    return Chunk(
        text=text,
        token_ids=token_ids,
        finish_reason=finish or None,
        num_input_tokens=int(_first(values.get("num_input_tokens"), 0)),
        num_cached_tokens=int(_first(values.get("num_cached_tokens"), 0)),
        # sent when asked (return_num_output_tokens); the token ids always are
        num_output_tokens=int(_first(values.get("num_output_tokens"), len(token_ids))),
        time=t,
        sequence_index=int(_first(values.get("sequence_index"), 0)),
        log_probs=None if lps is None else np.asarray(lps, dtype=np.float64).reshape(-1).tolist(),
        cum_log_prob=None if cum is None else float(_first(cum)),
        # [1, tokens, K] over gRPC; over HTTP, JSON gives them flat: one row per token
        top_log_probs=None if top is None else _rows(top, len(token_ids), float),
        top_log_prob_ids=None if top_ids is None else _rows(top_ids, len(token_ids), int),
    )


def _rows(values: Any, n: int, kind: type) -> list[list]:
    flat = np.asarray(values).reshape(-1).tolist()
    k = len(flat) // n if n else 0
    return [[kind(v) for v in flat[i * k : (i + 1) * k]] for i in range(n)]


class HttpClient:
    """HTTP `/generate` (one JSON answer) and `/generate_stream` (server-sent events)."""

    def __init__(self, url: str = "localhost:8000", model: str = MODEL, timeout: float = 600.0):
        self.base = url if url.startswith("http") else f"http://{url}"
        self.model, self.timeout = model, timeout

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _post(self, endpoint: str, fields: dict[str, Any]):
        body = dict(fields)
        if "images" in body:  # JSON cannot carry raw bytes: base64, which the server accepts
            body["images"] = [base64.b64encode(b).decode() for b in body["images"]]
        req = urllib.request.Request(
            f"{self.base}/v2/models/{self.model}/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310 - a URL the user gave
        except urllib.error.HTTPError as e:
            raise ServerError(_error_text(e.read()), e.code) from None

    def generate(self, **kwargs) -> Result:
        return self.generate_fields(request_fields(**kwargs))

    def generate_fields(self, fields: dict[str, Any]) -> Result:
        """`/generate` from {input name: value} as they go on the wire."""
        result = Result(start=time.monotonic())
        with self._post("generate", {**fields, "stream": False}) as resp:
            answer = json.loads(resp.read())
            if "error" in answer:  # e.g. num_return_sequences > 1: Triton 2.51 answers 200 and an error
                raise ServerError(answer["error"], resp.status)
            result.add(chunk_from(answer, time.monotonic()))
        return result

    def stream(self, **kwargs) -> Iterator[Chunk]:
        """Yield one chunk per server-sent event. An error event after the 200 raises ServerError.
        Closing the iterator early closes the connection, which cancels the request."""
        with self._post("generate_stream", {**request_fields(**kwargs), "stream": True}) as resp:
            for line in resp:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise ServerError(event["error"])
                yield chunk_from(event, time.monotonic())


def _error_text(body: bytes) -> str:
    body = body.strip()
    if body.startswith(b"data:"):  # /generate_stream answers an early error as one SSE event
        body = body[5:]
    try:
        return json.loads(body).get("error", body.decode(errors="replace"))
    except (ValueError, AttributeError):
        return body.decode(errors="replace")
