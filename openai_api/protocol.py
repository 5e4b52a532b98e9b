"""OpenAI request bodies -> the ensemble's inputs (client.llm.request_fields' names), validated.

Nothing here does I/O: a bad body raises `APIError` (400, or 404 for an unknown model) before
anything reaches Triton.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from openai_api.errors import APIError, bad_request, unsupported

ROLES = ("system", "developer", "user", "assistant")


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
