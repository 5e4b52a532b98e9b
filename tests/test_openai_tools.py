"""Tool calling through the OpenAI API, with the real OpenAI SDK against the real stack
(tritonserver + openai_api): the tools reach the prompt as Llama 4's spec writes them (counted by
an independent tokenizer), tool turns go through, what cannot be honoured is refused, and an answer
that is a tool call comes back as OpenAI's tool_calls, whole and streamed.

The tiny model's answers are gibberish, so the tool-call answers come from a copy of it whose
weights script its greedy answer (tests/scripted_checkpoint.py): a real forward pass, detokenized
and streamed by the real server."""

from __future__ import annotations

import json

import pytest
from conftest import start_triton
from openai_server import MODEL, serve
from scripted_checkpoint import write_scripted_checkpoint
from test_tool_prompt import BOT, EOT, LIST, QUESTION, WEATHER, WEATHER_JSON, H

from client.llm import GrpcClient
from maverick.tokenizer import Tokenizer
from maverick.tool_prompt import INSTRUCTIONS

openai = pytest.importorskip("openai")

SCRIPT = '[get_weather(city="Paris", days=3), now()]'  # what the scripted model answers
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}
NOW_JSON = '    {\n        "name": "now",\n        "description": "The time"\n    }'
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris, and the time?"}]}
CALLS = [("get_weather", {"city": "Paris", "days": 3}), ("now", {})]


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oai(triton, tmp_path_factory):
    with serve(triton.grpc_url, tmp_path_factory.mktemp("openai_tools") / "server.log") as url:
        yield _client(url)


@pytest.fixture(scope="module")
def count_tokens(tiny_ckpt):
    """Tokens of a text, by Hugging Face's tokenizers on the checkpoint's tokenizer.json (special
    tokens in the text are parsed: the hand-built prompts have them where the format puts them)."""
    from tokenizers import Tokenizer as HF

    hf = HF.from_file(str(tiny_ckpt / "tokenizer.json"))
    return lambda text: len(hf.encode(text, add_special_tokens=False).ids)


def test_tools_reach_the_prompt_as_the_spec_writes_them(triton, oai, count_tokens):
    messages = [{"role": "user", "content": QUESTION}]
    got = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=4, temperature=0
    )
    spec = BOT + H.format("system") + INSTRUCTIONS + LIST + WEATHER_JSON + EOT
    spec += H.format("user") + QUESTION + EOT + H.format("assistant")
    assert got.usage.prompt_tokens == count_tokens(spec) > 500
    with GrpcClient(triton.grpc_url) as c:  # the ensemble's own answer, from its tools input
        want = c.generate(messages=messages, tools=[WEATHER], max_tokens=4, temperature=0.0)
    assert got.usage.prompt_tokens == want.num_input_tokens
    assert got.choices[0].message.content == want.text and not got.choices[0].message.tool_calls
    # tool_choice "none": the model is not shown the tools
    none = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=1
    )
    assert none.usage.prompt_tokens == count_tokens(
        BOT + H.format("user") + QUESTION + EOT + H.format("assistant")
    )


def test_a_conversation_with_tool_calls_and_results(oai, count_tokens):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_a", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "San Francisco"}'}},
                {"id": "call_b", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Seattle", "days": 2}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 14}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "rain"},
    ]  # fmt: skip
    got = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=2)
    spec = (
        BOT + H.format("system") + INSTRUCTIONS + LIST + WEATHER_JSON + "\nBe brief." + EOT
        + H.format("user") + QUESTION + EOT
        + H.format("assistant")
        + '[get_weather(city="San Francisco"), get_weather(city="Seattle", days=2)]' + EOT
        + H.format("ipython") + '{"temp": 14}' + EOT
        + H.format("ipython") + "rain" + EOT
        + H.format("assistant")
    )  # fmt: skip
    assert got.usage.prompt_tokens == count_tokens(spec)


def _refused(oai, **kw):
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(**kw)
    assert e.value.status_code == 400 and set(e.value.body) == {"message", "type", "param", "code"}
    assert e.value.body["type"] == "invalid_request_error"
    return e.value.body


def test_what_cannot_be_honoured_is_refused(oai):
    unknown = {"type": "function", "function": {"name": "get_time"}}
    body = _refused(oai, tools=[WEATHER], tool_choice=unknown)
    assert "'get_time', which is not one of the tools" in body["message"] and body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError):  # streamed: before the 200
        list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                         tools=[WEATHER], tool_choice=unknown, stream=True))  # fmt: skip
    body = _refused(oai, tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})
    assert "exclude each other" in body["message"]
    strict = {"type": "function", "function": {"name": "f", "parameters": {}, "strict": True}}
    assert "strict=true" in _refused(oai, tools=[strict])["message"]  # the ensemble's INVALID_ARG
    hyphen = {"type": "function", "function": {"name": "get-weather"}}
    assert "Python identifier" in _refused(oai, tools=[hyphen])["message"]
    assert _refused(oai, tool_choice="auto")["param"] == "tool_choice"  # no tools
    assert _refused(oai, tools=[])["param"] == "tools"
    assert _refused(oai, tools=[WEATHER], parallel_tool_calls="yes")["param"] == "parallel_tool_calls"
    orphan = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]
    assert "tool_call_id" in _refused(oai, messages=orphan)["message"]


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_forced_tool_choice_makes_even_gibberish_a_call(oai, stream):
    """tool_choice "required" or naming a function: guided decoding holds the tiny model's
    gibberish to Llama 4's call syntax, so the answer comes back as OpenAI tool calls of the given
    tools, with keywords from their schemas."""
    keys = set(WEATHER["function"]["parameters"]["properties"])
    for choice, names in (
        ("required", {"get_weather", "now"}),
        ({"type": "function", "function": {"name": "now"}}, {"now"}),
    ):
        for parallel in (True, False):
            kw = dict(**ASK, tools=[WEATHER, NOW], tool_choice=choice, parallel_tool_calls=parallel,
                      max_tokens=200, temperature=0)  # fmt: skip
            if stream:
                calls: dict[int, dict] = {}
                finish = None
                for chunk in oai.chat.completions.create(**kw, stream=True):
                    for tc in chunk.choices[0].delta.tool_calls or []:
                        call = calls.setdefault(tc.index, {"name": tc.function.name, "arguments": ""})
                        call["arguments"] += tc.function.arguments or ""
                    finish = chunk.choices[0].finish_reason or finish
                got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
            else:
                answer = oai.chat.completions.create(**kw)
                got, finish = _calls(answer.choices[0].message), answer.choices[0].finish_reason
                assert answer.choices[0].message.content is None
            assert finish == "tool_calls" and got and {n for n, _ in got} <= names
            assert all(set(args) <= keys for _, args in got) and (parallel or len(got) == 1)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_response_format_json_object_and_schema(oai, tiny_ckpt, stream):
    """JSON valid against the schema, from the tiny model's gibberish. Any object (json_object) is
    unbounded, which the gibberish fills with keys: a bias on `"` and `}` (which the grammar admits
    only where they are valid) makes it close."""
    import jsonschema

    tok = Tokenizer.from_dir(tiny_ckpt)
    close = {str(t): 10 for t in tok.encode('"}', parse_special=False)}

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "rain": {"type": "boolean"}},
        "required": ["city", "rain"],
        "additionalProperties": False,
    }
    formats = [
        ({"type": "json_object"}, {"type": "object"}, close),
        ({"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}, schema, None),
    ]
    for fmt, check, bias in formats:
        kw = dict(**ASK, response_format=fmt, max_tokens=300, temperature=0, logit_bias=bias)
        if stream:
            chunks = list(oai.chat.completions.create(**kw, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            answer = oai.chat.completions.create(**kw)
            text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert finish == "stop"
        jsonschema.validate(json.loads(text), check)
    body = _refused(
        oai, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}
    )
    assert "not a valid json_schema" in body["message"]
    assert _refused(oai, response_format={"type": "yaml"})["param"] == "response_format"


# -- a model that answers with tool calls ---------------------------------------------------------


@pytest.fixture(scope="module")
def scripted(tiny_ckpt, tmp_path_factory):
    """An OpenAI client on a second tritonserver, whose model answers SCRIPT to any chat."""
    tok = Tokenizer.from_dir(tiny_ckpt)
    (after,) = tok.encode("\n\n", parse_special=False)  # the end of the assistant header
    answer = [*tok.encode(SCRIPT, parse_special=False), tok.eot_id]
    ckpt = write_scripted_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("scripted") / "ckpt", after, answer)
    build = tmp_path_factory.mktemp("triton-scripted")
    server = start_triton(ckpt, build)
    try:
        with serve(server.grpc_url, build / "openai.log") as url:
            yield _client(url)
    finally:
        assert server.stop() == 0, f"tritonserver did not exit cleanly; see {build / 'server.log'}"


def test_a_tool_call_answer(scripted):
    got = scripted.chat.completions.create(**ASK, tools=[WEATHER, NOW], temperature=0, max_tokens=40)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == CALLS
    assert (
        all(c.type == "function" and c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    )
    assert got.usage.completion_tokens == 21  # the script's 20 tokens and <|eot|>
    one = scripted.chat.completions.create(
        **ASK, tools=[WEATHER, NOW], parallel_tool_calls=False, max_tokens=40
    )
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    # no tools, or tool_choice "none": the same answer is content
    for kw in ({}, {"tools": [WEATHER, NOW], "tool_choice": "none"}):
        plain = scripted.chat.completions.create(**ASK, **kw, max_tokens=40)
        assert plain.choices[0].message.content == SCRIPT and not plain.choices[0].message.tool_calls
        assert plain.choices[0].finish_reason == "stop"


def test_a_tool_call_answer_streamed(scripted):
    chunks = list(
        scripted.chat.completions.create(
            **ASK, tools=[WEATHER, NOW], max_tokens=40, stream=True, stream_options={"include_usage": True}
        )
    )
    *answer, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens == 21
    deltas = [c.choices[0].delta for c in answer]
    assert deltas[0].role == "assistant" and not any(d.content for d in deltas)
    assert [c.choices[0].finish_reason for c in answer] == [None] * (len(answer) - 1) + ["tool_calls"]
    # OpenAI's streamed shape: calls by index, the first delta of each with its id, type and name
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            call["arguments"] += tc.function.arguments or ""
            assert tc.type in (None, "function")
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == CALLS
    assert all(c["id"].startswith("call_") for c in calls.values())
    # without tools the same answer streams as content
    plain = list(scripted.chat.completions.create(**ASK, max_tokens=40, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in plain) == SCRIPT
    assert plain[-1].choices[0].finish_reason == "stop"
