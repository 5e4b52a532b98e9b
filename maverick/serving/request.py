"""A generate request as it arrives at the server, checked and turned into what the engine takes.

Inputs use the TensorRT-LLM ensemble's names, so `/generate`, `/generate_stream`, TensorRT-LLM's
own clients, Triton's OpenAI frontend and genai-perf work unchanged, plus ours for chat messages
and images. They come in as numpy arrays, a row per prompt (`parse_batch`). Everything here
raises `InvalidRequest` with a message meant for the user; nothing is silently dropped or clamped.

Whatever costs work in proportion to the request is done here, bounded, and not in the engine
loop: bad words arrive there as token ids, and a prompt past the context is refused from the
images' headers before any pixel is decoded. How a checked request travels on to the `maverick`
step: request_tensors.py.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from maverick.engine.api import DEFAULT_MAX_TOKENS, Prompt, SamplingParams
from maverick.engine.errors import SamplingParamsError
from maverick.engine.sampling_params import (
    GUIDE_TYPES,
    LOGIT_BIAS_RANGE,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    MAX_LOGITS_BYTES,
    MAX_STOP_STRINGS,
    MAX_WORD_BYTES,
)
from maverick.image import ImageError
from maverick.prompt import MAX_IMAGES, build_chat_prompt, build_prompt
from maverick.serving.step_output import (
    RETURN_BATCH_INDEX,
    RETURN_CONTEXT_LOGITS,
    RETURN_GENERATION_LOGITS,
    RETURN_LOG_PROBS,
    RETURN_NUM_INPUT_TOKENS,
    RETURN_NUM_OUTPUT_TOKENS,
    RETURN_PERF_METRICS,
    RETURN_SEQUENCE_INDEX,
    STREAMED,
)
from maverick.tokenizer import Tokenizer

MAX_TEXT_BYTES = 1 << 20  # 1 MiB of prompt text
MAX_BATCH = 64  # prompts in a batched request: the ensemble's max_batch_size
_BASE64 = re.compile(rb"[A-Za-z0-9+/=\s]+")

# input name -> SamplingParams field, for scalars that map one to one
_SCALARS = {
    "max_tokens": "max_tokens",
    "min_tokens": "min_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "ignore_eos": "ignore_eos",
    "include_stop_str_in_output": "include_stop_str_in_output",
    "return_log_probs": "logprobs",
    "top_log_probs": "top_logprobs",
    "num_return_sequences": "n",
    "return_context_logits": "return_context_logits",
    "return_generation_logits": "return_generation_logits",
}
# TensorRT-LLM's older names, which some clients still send (genai-perf: min_length)
_ALIASES = {"min_length": "min_tokens"}
_FLAGS = (
    "stream",
    "exclude_input_in_output",
    "apply_chat_template",
    "allow_special_tokens",
    "return_num_input_tokens",
    "return_num_output_tokens",
    "return_perf_metrics",
)
# TensorRT-LLM's inputs for what this model does not have: a request that uses one is refused
_NOT_APPLICABLE = {
    "decoder_text_input": "is for encoder-decoder models; Llama 4 is decoder-only",
    "prompt_embedding_table": "(prompt tuning) is not supported by this server",
    "prompt_table_extra_id": "(prompt tuning) is not supported by this server",
    "prompt_vocab_size": "(prompt tuning) is not supported by this server",
    "lora_task_id": "(LoRA adapters) is not supported by this server",
    "lora_weights": "(LoRA adapters) is not supported by this server",
    "lora_config": "(LoRA adapters) is not supported by this server",
}
KNOWN_INPUTS = frozenset(
    {"text_input", "messages", "images", "system_prompt", "stop_words", "bad_words", "end_id", "logit_bias"}
    | {"pad_id", "beam_width", "length_penalty", "embedding_bias_words", "embedding_bias_weights"}
    | {"guided_decoding_guide_type", "guided_decoding_guide"}
    | set(_SCALARS)
    | set(_ALIASES)
    | set(_FLAGS)
    | set(_NOT_APPLICABLE)
    | {"tools"}  # OpenAI's function tools as JSON text, listed in the chat's system message
)


class InvalidRequest(ValueError):
    """A request the server refuses; the message is for the user (INVALID_ARG)."""


@dataclass(frozen=True)
class ResponseOptions:
    stream: bool = False
    echo_text: str | None = None  # prepended to the first response when exclude_input_in_output is false
    default_max_tokens: bool = True  # max_tokens was not given: fit it to the context left
    # streamed responses pass postprocessing, which acknowledges them (set by preprocessing: the
    # ensemble's path; see maverick/serving/response_window.py)
    flow_control: bool = False
    # optional outputs, sent only when asked (TensorRT-LLM's return_* inputs): every output tensor
    # costs each streamed response a copy at every hop of the ensemble
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    return_perf_metrics: bool = False
    # the prompt's place in a batched request (TensorRT-LLM's batch_index), and the batch's size
    batch_index: int = 0
    batch_size: int = 1


@dataclass(frozen=True)
class GenerateRequest:
    prompt: Prompt
    params: SamplingParams
    options: ResponseOptions

    @property
    def returns(self) -> int:
        """The optional outputs asked for, as `step_output.RETURN_*` bits."""
        return (
            (RETURN_NUM_INPUT_TOKENS if self.options.return_num_input_tokens else 0)
            | (RETURN_NUM_OUTPUT_TOKENS if self.options.return_num_output_tokens else 0)
            | (RETURN_LOG_PROBS if self.params.logprobs else 0)
            | (RETURN_SEQUENCE_INDEX if self.params.n > 1 else 0)
            | (RETURN_BATCH_INDEX if self.options.batch_size > 1 else 0)
            | (RETURN_PERF_METRICS if self.options.return_perf_metrics else 0)
            | (RETURN_CONTEXT_LOGITS if self.params.return_context_logits else 0)
            | (RETURN_GENERATION_LOGITS if self.params.return_generation_logits else 0)
            | (STREAMED if self.options.stream else 0)
        )


# -- reading one request's inputs ------------------------------------------------------------------
def _values(inputs: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    arr = inputs.get(name)
    if arr is None:
        return None
    if arr.ndim == 0 or arr.shape[0] != 1:
        raise InvalidRequest(f"{name}: send one request per call (batch size 1), got shape {list(arr.shape)}")
    return arr.reshape(-1)


def _scalar(inputs: dict[str, np.ndarray], name: str) -> Any:
    vals = _values(inputs, name)
    if vals is None:
        return None
    if vals.size != 1:
        raise InvalidRequest(f"{name} must hold exactly one value, got {vals.size}")
    v = vals[0]
    if isinstance(v, (bytes, np.bytes_)):
        raise InvalidRequest(f"{name} must be a number or a boolean, not a string")
    return v.item() if isinstance(v, np.generic) else v


def _text(raw: Any, name: str) -> str:
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, (bytes, np.bytes_)):
        raise InvalidRequest(f"{name} must be a string")
    if len(raw) > MAX_TEXT_BYTES:
        raise InvalidRequest(f"{name} is {len(raw)} bytes; at most {MAX_TEXT_BYTES}")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"{name} is not valid UTF-8 (byte {e.start})") from None


def _string(inputs: dict[str, np.ndarray], name: str) -> str | None:
    vals = _values(inputs, name)
    if vals is None:
        return None
    if vals.size != 1:
        raise InvalidRequest(f"{name} must hold exactly one string, got {vals.size}")
    return _text(vals[0], name)


def _words(inputs: dict[str, np.ndarray], name: str, limit: int) -> list[str]:
    """The non-empty strings of a list input, at most `limit`, each at most MAX_WORD_BYTES (checked
    before anything is decoded)."""
    vals = _values(inputs, name)
    if vals is None:
        return []
    words = [v for v in vals if len(v)]
    if len(words) > limit:
        raise InvalidRequest(f"{name} has {len(words)} strings; at most {limit}")
    for i, w in enumerate(words):
        n = len(w) if isinstance(w, (bytes, np.bytes_)) else len(str(w).encode("utf-8", "surrogatepass"))
        if n > MAX_WORD_BYTES:
            raise InvalidRequest(f"{name}[{i}] is {n} bytes; at most {MAX_WORD_BYTES} each")
    return [_text(w, name) for w in words]


def _image_bytes(raw: Any, i: int) -> bytes:
    """Raw image bytes, or base64 / a data URL of them (JSON over HTTP cannot carry raw bytes)."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    if data.startswith(b"data:"):
        data = data.partition(b",")[2]
    elif not _BASE64.fullmatch(data[:4096]):
        return data
    try:
        return base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"images[{i}] is neither image bytes nor valid base64") from None


def parse_request(
    inputs: dict[str, np.ndarray],
    tokenizer: Tokenizer,
    defaults: dict[str, Any] | None = None,
    max_model_len: int | None = None,
) -> GenerateRequest:
    """Check one request's inputs and build the prompt and sampling parameters.

    `defaults` fill sampling fields the request leaves out (the checkpoint's generation_config:
    temperature 0.6 and top_p 0.9 for Llama 4); then SamplingParams' own defaults apply. A prompt
    that leaves no token of `max_model_len` to generate is refused (None: the engine refuses it).
    """
    unknown = set(inputs) - KNOWN_INPUTS
    if unknown:
        raise InvalidRequest(f"unknown inputs {sorted(unknown)}")
    for name in sorted(set(inputs) & set(_NOT_APPLICABLE)):
        raise InvalidRequest(f"{name} {_NOT_APPLICABLE[name]}")
    _check_trtllm_only(inputs, tokenizer)
    text = _string(inputs, "text_input")
    messages_json = _string(inputs, "messages")
    system = _string(inputs, "system_prompt")
    tools = _tools(inputs)
    raw_images = _values(inputs, "images")
    images = [] if raw_images is None else [_image_bytes(v, i) for i, v in enumerate(raw_images)]
    if len(images) > MAX_IMAGES:
        raise InvalidRequest(f"{len(images)} images; at most {MAX_IMAGES} per request")
    flags = {name: _flag(inputs, name) for name in _FLAGS}
    params = _sampling(inputs, defaults or {}, tokenizer)  # first: its limits are cheap to check
    try:
        chat = _Chat(bool(flags["apply_chat_template"]), bool(flags["allow_special_tokens"]), tools)
        prompt, echo = _prompt(tokenizer, text, messages_json, system, images, chat, max_model_len)
    except (ImageError, ValueError) as e:
        raise InvalidRequest(str(e)) from None
    options = ResponseOptions(
        stream=bool(flags["stream"]),
        # TensorRT-LLM's: the prompt comes back only in a non-streamed answer
        echo_text=None if flags["exclude_input_in_output"] in (None, True) or flags["stream"] else echo,
        default_max_tokens="max_tokens" not in inputs,
        return_num_input_tokens=bool(flags["return_num_input_tokens"]),
        return_num_output_tokens=bool(flags["return_num_output_tokens"]),
        return_perf_metrics=bool(flags["return_perf_metrics"]),
    )
    return GenerateRequest(prompt, params, options)


def parse_batch(
    inputs: dict[str, np.ndarray],
    tokenizer: Tokenizer,
    defaults: dict[str, Any] | None = None,
    max_model_len: int | None = None,
) -> list[GenerateRequest]:
    """A request of batch size k (TensorRT-LLM's batched requests: each input stacked along its
    first dimension) as k requests, each parsed alone and tagged with its batch index."""
    sizes = {name: (arr.shape[0] if arr.ndim else 0) for name, arr in inputs.items()}
    k = max(sizes.values(), default=1)
    if any(n != k for n in sizes.values()):
        raise InvalidRequest(f"every input of a batched request needs the same batch size, got {sizes}")
    if not 1 <= k <= MAX_BATCH:
        raise InvalidRequest(f"a request holds 1 to {MAX_BATCH} prompts, got {k}")
    if k == 1:
        return [parse_request(inputs, tokenizer, defaults, max_model_len)]
    reqs = []
    for b in range(k):
        try:
            req = parse_request(
                {n: a[b : b + 1] for n, a in inputs.items()}, tokenizer, defaults, max_model_len
            )
        except InvalidRequest as e:
            raise InvalidRequest(f"batch index {b}: {e}") from None
        options = dataclasses.replace(req.options, batch_index=b, batch_size=k)
        reqs.append(dataclasses.replace(req, options=options))
    if len({r.options.stream for r in reqs}) > 1:
        raise InvalidRequest("stream must be the same for every prompt of a batched request")
    rows = sum(r.params.logits_rows(len(r.prompt.token_ids)) for r in reqs)
    if rows * tokenizer.vocab_size * 4 > MAX_LOGITS_BYTES:
        raise InvalidRequest(
            f"the batch's prompts ask for {rows} rows of logits of {tokenizer.vocab_size} fp32 values "
            f"together; at most {MAX_LOGITS_BYTES >> 20} MiB per request"
        )
    return reqs


def _check_trtllm_only(inputs: dict[str, np.ndarray], tokenizer: Tokenizer) -> None:
    """TensorRT-LLM's inputs that change nothing here, checked: beam_width (1: no beam search),
    length_penalty (beam search's, so no effect at width 1, as in TensorRT-LLM) and pad_id (no
    output is padded: every response carries one sequence)."""
    beam = _scalar(inputs, "beam_width")
    if beam is not None and beam != 1:
        raise InvalidRequest(
            f"beam_width must be 1 (beam search is not supported), got {beam!r}; for several "
            "sampled answers use num_return_sequences"
        )
    penalty = _scalar(inputs, "length_penalty")
    if penalty is not None and not (isinstance(penalty, float) and np.isfinite(penalty)):
        raise InvalidRequest(f"length_penalty must be a finite number, got {penalty!r}")
    pad = _scalar(inputs, "pad_id")
    if pad is not None and (
        isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < tokenizer.vocab_size
    ):
        raise InvalidRequest(f"pad_id must be a token id in [0, {tokenizer.vocab_size}), got {pad!r}")


def fit_max_tokens(req: GenerateRequest, max_model_len: int) -> GenerateRequest:
    """A default max_tokens shrinks to the context the prompt leaves; an explicit one is kept (and
    refused by the engine if it does not fit)."""
    room = max_model_len - len(req.prompt.token_ids)
    if not req.options.default_max_tokens or req.params.max_tokens <= room or room < 1:
        return req
    params = dataclasses.replace(req.params, max_tokens=room, min_tokens=min(req.params.min_tokens, room))
    return dataclasses.replace(req, params=params)


def _tools(inputs: dict[str, np.ndarray]) -> list | None:
    """The tools input, JSON text, parsed; what it holds is checked with the chat (tool_prompt)."""
    raw = _string(inputs, "tools")
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"tools is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("tools is not valid JSON: nested too deeply") from None


def _flag(inputs: dict[str, np.ndarray], name: str) -> bool | None:
    v = _scalar(inputs, name)
    if v is not None and not isinstance(v, bool):
        raise InvalidRequest(f"{name} must be a boolean, got {v!r}")
    return v


@dataclass(frozen=True)
class _Chat:
    template: bool  # apply_chat_template: text_input is a user turn
    allow_special_tokens: bool  # special-token text in messages becomes control tokens (trusted)
    tools: list | None = None  # OpenAI's function tools (checked by the chat template)


def _prompt(tokenizer, text, messages_json, system, images, chat: _Chat, max_model_len) -> tuple[Prompt, str]:
    def chat_prompt(messages):
        return build_chat_prompt(
            tokenizer,
            messages,
            images,
            system=system,
            tools=chat.tools,
            allow_special_tokens=chat.allow_special_tokens,
            max_model_len=max_model_len,
        )

    if messages_json is not None:
        if text is not None:
            raise InvalidRequest("give either text_input or messages, not both")
        try:
            messages = json.loads(messages_json)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"messages is not valid JSON: {e}") from None
        return chat_prompt(messages), messages_json
    if text is None:
        raise InvalidRequest("text_input (or messages) is required")
    if not text.strip() and not images:
        raise InvalidRequest("text_input is empty")
    if chat.template:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        return chat_prompt([{"role": "user", "content": content}]), text
    if system is not None:
        raise InvalidRequest("system_prompt needs messages or apply_chat_template=true")
    if chat.tools is not None:
        raise InvalidRequest("tools needs messages or apply_chat_template=true")
    if images and text.count("<|image|>") != len(images):
        raise InvalidRequest(f"a raw prompt with {len(images)} images needs as many <|image|> placeholders")
    # A raw prompt is the caller's own format: its special-token text is parsed. It gets one BOS,
    # as transformers' tokenizer gives it, unless it brings its own.
    add_bos = not text.startswith("<|begin_of_text|>")
    return build_prompt(tokenizer, text, images, add_bos=add_bos, max_model_len=max_model_len), text


def _sampling(inputs: dict[str, np.ndarray], defaults: dict[str, Any], tok: Tokenizer) -> SamplingParams:
    fields = {k: v for k, v in defaults.items() if k in {f.name for f in dataclasses.fields(SamplingParams)}}
    fields.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    for name, field in _SCALARS.items():
        v = _scalar(inputs, name)
        if v is not None:
            fields[field] = v
    for alias, name in _ALIASES.items():
        v = _scalar(inputs, alias)
        if v is not None and fields.setdefault(_SCALARS[name], v) != v:
            raise InvalidRequest(f"{alias} is another name for {name}: give one, or both the same")
    if (stop := _words(inputs, "stop_words", MAX_STOP_STRINGS)) or "stop_words" in inputs:
        fields["stop"] = tuple(stop)
    if bad := _words(inputs, "bad_words", MAX_BAD_WORDS):
        fields["bad_words_ids"] = tuple(tuple(ids) for ids in tok.bad_words_ids(bad))
    end_id = _scalar(inputs, "end_id")
    if end_id is not None:  # TensorRT-LLM: end_id replaces the model's end tokens
        fields["stop_token_ids"] = (end_id,)
        fields["ignore_eos"] = True
    if fields.get("top_logprobs") and not fields.get("logprobs"):
        raise InvalidRequest("top_log_probs needs return_log_probs=true")
    if (bias := _string(inputs, "logit_bias")) is not None:
        fields["logit_bias"] = _logit_bias(bias)
    if embedding := _embedding_bias(inputs, tok):
        merged = dict(fields.get("logit_bias", ()))
        for token, b in embedding.items():
            merged[token] = merged.get(token, 0.0) + b
        lo, hi = LOGIT_BIAS_RANGE
        if len(merged) > MAX_LOGIT_BIAS or not all(lo <= b <= hi for b in merged.values()):
            raise InvalidRequest(
                f"embedding_bias_weights (with logit_bias) give {len(merged)} tokens a bias: at most "
                f"{MAX_LOGIT_BIAS}, each summed bias in [{lo:g}, {hi:g}]"
            )
        fields["logit_bias"] = tuple(merged.items())
    kind, guide = _string(inputs, "guided_decoding_guide_type"), _string(inputs, "guided_decoding_guide")
    if kind is not None or guide is not None:
        if kind not in GUIDE_TYPES:
            raise InvalidRequest(
                f"guided_decoding_guide_type must be one of {', '.join(GUIDE_TYPES)}, got {kind!r}"
            )
        if not guide and kind != "json":
            raise InvalidRequest(f"guided_decoding_guide is required with guided_decoding_guide_type {kind}")
        fields["guided_decoding"] = (kind, guide or "")
    try:
        return SamplingParams(**fields)
    except SamplingParamsError as e:
        # SamplingParams names its own fields: say the input's name where it differs
        message, field_name = str(e), str(e).partition(" ")[0]
        raise InvalidRequest(_INPUT_OF.get(field_name, field_name) + message[len(field_name) :]) from None


_INPUT_OF = {field: name for name, field in _SCALARS.items() if field != name}


def _embedding_bias(inputs: dict[str, np.ndarray], tok: Tokenizer) -> dict[int, float]:
    """TensorRT-LLM's embedding_bias_words / _weights as its preprocessing reads them: each word
    tokenized as its tokenizer's encode() does by default (with the BOS token), and the word's weight
    added to the logit bias of every one of its tokens (summed where tokens repeat)."""
    words, weights = _values(inputs, "embedding_bias_words"), _values(inputs, "embedding_bias_weights")
    if words is None and weights is None:
        return {}
    if words is None or weights is None:
        raise InvalidRequest("embedding_bias_words and embedding_bias_weights go together: give both")
    words = _words(inputs, "embedding_bias_words", MAX_BAD_WORDS)
    if len(words) != weights.size:
        raise InvalidRequest(
            f"embedding_bias_words has {len(words)} words but embedding_bias_weights {weights.size} weights"
        )
    if weights.dtype.kind != "f" or not np.isfinite(weights).all():
        raise InvalidRequest("embedding_bias_weights must be finite numbers (FP32)")
    bias: dict[int, float] = {}
    for word, weight in zip(words, weights.tolist(), strict=True):
        for token in tok.encode(word, add_bos=True):
            bias[token] = bias.get(token, 0.0) + weight
    return bias


def _logit_bias(text: str) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias as JSON text, {"token id": bias}, as (id, bias) pairs; the counts and
    ranges are SamplingParams' to check."""
    try:
        bias = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise InvalidRequest('logit_bias must be a JSON object {"token id": bias}') from None
    if not isinstance(bias, dict):
        raise InvalidRequest(f'logit_bias must be a JSON object {{"token id": bias}}, got {text[:64]!r}')
    pairs = []
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 18):
            raise InvalidRequest(
                f"logit_bias keys must be token ids (decimal integers >= 0), got {key[:64]!r}"
            )
        pairs.append((int(key), value))
    return tuple(pairs)


def numpy_inputs(fields: dict[str, Any]) -> dict[str, np.ndarray]:
    """Plain request fields ({input name: value}) as the preprocessing model receives them
    (batch dimension 1): for running the same request through the engine directly."""
    out = {}
    for name, value in fields.items():
        if isinstance(value, str):
            out[name] = np.array([[value.encode()]], dtype=object)
        elif name in ("images", "stop_words", "bad_words"):
            out[name] = np.array([[v.encode() if isinstance(v, str) else v for v in value]], dtype=object)
        else:
            out[name] = np.array([[value]])
    return out
