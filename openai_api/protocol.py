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

from maverick.engine.sampling_params import MAX_N, MAX_TOP_LOGPROBS
from openai_api import guides
from openai_api.errors import APIError, bad_request, unsupported
from openai_api.images import RemoteImage

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class ChatRequest:
    fields: dict[str, Any]  # ensemble inputs, client.llm.request_fields' names
    stream: bool = False
    include_usage: bool = False
    tool_calls: bool = False  # the answer may be Llama 4 tool calls (tool_calls.py parses it)
    parallel_tool_calls: bool = True  # False: the first call only
    n: int = 1  # choices (the ensemble's num_return_sequences)
    logprobs: bool = False  # each choice's `logprobs.content` (top_logprobs entries per token)
    echo: str = ""  # streamed completions' echo: the prompt, before each choice's first text


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
_UNSUPPORTED = ("functions", "function_call", "audio", "prediction")


def _convert_messages(messages: Any) -> tuple[list[dict], list[bytes]]:
    """OpenAI messages -> the ensemble's messages (image parts as {"type": "image"}) and the images
    in order: bytes, or RemoteImage for the app to fetch (nothing is fetched here)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", "messages")
        role = m.get("role")
        if role == "function" or m.get("function_call"):
            raise unsupported("functions")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        role = "system" if role == "developer" else role
        content = m.get("content")
        calls = _tool_calls_of(m, role, where)
        if calls is not None and content is None:  # an assistant turn that only calls tools
            out.append({"role": role, "content": None, "tool_calls": calls})
            continue
        if isinstance(content, str):
            out.append({"role": role, "content": content, **({"tool_calls": calls} if calls else {})})
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
        out.append({"role": role, "content": parts, **({"tool_calls": calls} if calls else {})})
    return out, images


def _tool_calls_of(m: dict, role: str, where: str) -> list | None:
    """An assistant message's tool_calls, passed on as they are: the ensemble checks and writes them
    the way Llama 4 wrote them. A tool message's tool_call_id has no place in Llama 4's format."""
    calls = m.get("tool_calls")
    if role == "tool" and not isinstance(m.get("tool_call_id"), str):
        raise bad_request(f"{where}: a tool message needs its 'tool_call_id' (a string)", "messages")
    if calls is None or calls == []:
        return None
    if role != "assistant":
        raise bad_request(f"{where}: only assistant messages carry tool_calls", "messages")
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise bad_request(f"{where}.tool_calls must be a list of objects", "messages")
    return calls


def _tools(body: dict) -> tuple[list | None, bool, str | None]:
    """OpenAI's tools and tool_choice -> (the tools to list in the prompt, or None; whether to look
    for tool calls in the answer; for 'required' or a named function, the EBNF grammar that makes
    the answer a call). The ensemble checks each tool (names, schemas, size)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and (not isinstance(tools, list) or not tools):
        raise bad_request("'tools' must be a non-empty list of function tools", "tools")
    if choice is None:
        choice = "none" if tools is None else "auto"
    forced = choice == "required" or isinstance(choice, dict)
    if not forced and choice not in ("none", "auto"):
        raise bad_request(
            "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', ...}", "tool_choice"
        )
    if choice != "none" and tools is None:
        raise bad_request(f"tool_choice {choice!r} needs 'tools'", "tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if forced:  # Llama 4's call syntax, enforced by guided decoding
        return tools, True, guides.forced_tool_calls(tools, choice, parallel is not False)
    # 'none' (OpenAI): the model sees no tools and its answer is content
    return (tools, True, None) if choice == "auto" else (None, False, None)


def _image_bytes(image_url: Any, where: str) -> bytes | RemoteImage:
    """A data URL's bytes; an http(s) URL as a RemoteImage, which the app fetches (images.py) if
    the operator allows its host, before the request goes to Triton."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise bad_request(f"{where}.image_url.url must be a string", "messages")
    if url[:8].lower().startswith(("http://", "https://")):
        return RemoteImage(url, where)
    if not url.startswith("data:"):
        raise bad_request(
            f"{where}: image URLs must be data URLs (data:image/...;base64,...) or, where this server "
            "allows their host, http(s) URLs",
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


def _check_model(body: Any, model_name: str) -> None:
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


def parse_chat(body: Any, model_name: str) -> ChatRequest:
    _check_model(body, model_name)
    for name in _UNSUPPORTED:
        if body.get(name):
            raise unsupported(name)
    guide = guides.response_format(body.get("response_format"))
    messages, images = _convert_messages(body.get("messages"))
    tools, tool_calls, forced = _tools(body)
    if forced is not None:
        if guide is not None:
            raise bad_request(
                "a forced tool_choice and a JSON response_format exclude each other", "tool_choice"
            )
        guide = "ebnf_grammar", forced
    fields: dict[str, Any] = {"messages": json.dumps(messages)}
    if guide is not None:
        fields["guided_decoding_guide_type"], fields["guided_decoding_guide"] = guide
    if images:
        fields["images"] = images
    if tools is not None:
        fields["tools"] = json.dumps(tools)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    req = _with_sampling(body, fields, max_tokens)
    req.tool_calls, req.parallel_tool_calls = tool_calls, body.get("parallel_tool_calls") is not False
    _choices_and_bias(body, req)
    _chat_logprobs(body, req)
    return req


def _int_in(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi):
        raise bad_request(f"'{name}' must be an integer from {lo} to {hi}, got {value!r}", name)
    return value


def _choices_and_bias(body: dict, req: ChatRequest) -> None:
    """`n` and `logit_bias` (the ensemble checks the biases' ids and ranges, and names logit_bias
    as OpenAI does)."""
    n = _int_in(body, "n", 1, MAX_N)
    if n is not None and n > 1:
        req.n = req.fields["num_return_sequences"] = n
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise bad_request("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
        if bias:
            req.fields["logit_bias"] = json.dumps(bias)


def _chat_logprobs(body: dict, req: ChatRequest) -> None:
    """Chat's `logprobs` (a boolean) and `top_logprobs`."""
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad_request("'logprobs' must be a boolean", "logprobs")
    top = _int_in(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if logprobs:
        req.logprobs = req.fields["return_log_probs"] = True
        if top:
            req.fields["top_log_probs"] = top


def _with_sampling(body: dict, fields: dict[str, Any], max_tokens: Any) -> ChatRequest:
    """The parameters chat and (legacy) completions share, added to `fields`: the request."""
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


COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for the legacy completions API
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy API's integer logprobs


def parse_completion(body: Any, model_name: str) -> ChatRequest:
    """A legacy completions body (`POST /v1/completions`) -> the ensemble's raw prompt request:
    `text_input` without the chat template, so the text is the whole prompt (one BOS is added)."""
    _check_model(body, model_name)
    if body.get("suffix"):
        raise unsupported("suffix")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and not all(isinstance(p, str) for p in prompt):
        raise bad_request(
            "'prompt' as token ids is unsupported by this server: send the text",
            "prompt", "unsupported_parameter",
        )  # fmt: skip
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request(
            "several prompts in one request are unsupported yet: send one request per prompt",
            "prompt", "unsupported_parameter",
        )  # fmt: skip
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (or a list of one string)", "prompt")
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise bad_request("'echo' must be a boolean", "echo")
    fields: dict[str, Any] = {"text_input": prompt, "apply_chat_template": False}
    max_tokens = body.get("max_tokens")
    req = _with_sampling(body, fields, COMPLETIONS_MAX_TOKENS if max_tokens is None else max_tokens)
    if echo and req.stream:  # the ensemble streams no prompt back (TensorRT-LLM's rule): the app does
        req.echo = prompt
    elif echo:
        fields["exclude_input_in_output"] = False  # the ensemble puts the prompt first
    _choices_and_bias(body, req)
    # completions' logprobs: how many most likely tokens besides the chosen one (0 to 5)
    logprobs = _int_in(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    if logprobs is not None:
        if echo:
            raise bad_request("'logprobs' with 'echo' (the prompt's log-probs) is unsupported", "logprobs")
        req.logprobs = req.fields["return_log_probs"] = True
        if logprobs:
            req.fields["top_log_probs"] = logprobs
    if body.get("best_of") not in (None, req.n):  # best_of > n: rank candidates, return the best n
        raise unsupported("best_of")
    return req
