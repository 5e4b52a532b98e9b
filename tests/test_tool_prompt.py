"""Llama 4's pythonic tool calling in the prompt (maverick/tool_prompt.py through
Tokenizer.render_chat, and the ensemble's `tools` input): the text is checked against strings
derived by hand from Meta's spec (llama-models models/llama4/prompt_format.md, "Zero shot function
calling - system message"), not against the code that renders it."""

from __future__ import annotations

import hashlib
import json

import pytest

from maverick.serving.request import InvalidRequest, numpy_inputs, parse_request
from maverick.tiny_tokenizer import write_tokenizer
from maverick.tokenizer import Tokenizer
from maverick.tool_prompt import INSTRUCTIONS, MAX_TOOLS
from openai_api.tool_calls import parse

H = "<|header_start|>{}<|header_end|>\n\n"
BOT, EOT = "<|begin_of_text|>", "<|eot|>"
LIST = "\n\nHere is a list of functions in JSON format that you can invoke:\n"

# the spec's tool (its example), in OpenAI's shape
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather info for places",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string", "description": "The name of the city"}},
        },
    },
}
# ... listed as the spec lists functions: {name, description, parameters}, 4-space JSON, by hand
WEATHER_JSON = """[
    {
        "name": "get_weather",
        "description": "Get weather info for places",
        "parameters": {
            "type": "object",
            "required": [
                "city"
            ],
            "properties": {
                "city": {
                    "type": "string",
                    "description": "The name of the city"
                }
            }
        }
    }
]"""
QUESTION = "What is the weather in SF and Seattle?"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(d, base_vocab_size=2000)
    return Tokenizer.from_dir(d)


def test_instructions_are_metas_verbatim():
    """The system prompt of the spec's example, up to its function list: its SHA-256, computed from
    prompt_format.md (llama-models at a9c89c4), not from our copy."""
    assert INSTRUCTIONS.startswith("You are a helpful assistant and an expert in function composition.")
    assert INSTRUCTIONS.endswith("- Don't add supplementary information")
    digest = hashlib.sha256(INSTRUCTIONS.encode()).hexdigest()
    assert (len(INSTRUCTIONS), digest) == (
        2463,
        "3affa0a29ff8792160074a262d4bf1736c2f0ab7457065c3e583e69eaf87b98d",
    )


def test_tools_make_the_system_message(tok):
    """The spec's example: no system message of the caller's, the tools listed in the system turn."""
    chat = tok.render_chat([{"role": "user", "content": QUESTION}], tools=[WEATHER])
    expected = (
        BOT + H.format("system") + INSTRUCTIONS + LIST + WEATHER_JSON + EOT
        + H.format("user") + QUESTION + EOT + H.format("assistant")
    )  # fmt: skip
    assert chat.text == expected
    # control tokens where the template writes them, and nowhere else
    assert tok.encode_chat(chat) == tok.encode(expected)


def test_the_callers_system_message_follows_the_tool_list(tok):
    """As llama-stack appends it (system_message_behavior=append): on the line after the list."""
    messages = [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": QUESTION}]
    expected = (
        BOT + H.format("system") + INSTRUCTIONS + LIST + WEATHER_JSON + "\nBe brief." + EOT
        + H.format("user") + QUESTION + EOT + H.format("assistant")
    )  # fmt: skip
    assert tok.render_chat(messages, tools=[WEATHER]).text == expected
    assert tok.render_chat(messages[1:], system="Be brief.", tools=[WEATHER]).text == expected
    without = (
        BOT
        + H.format("system")
        + "Be brief."
        + EOT
        + H.format("user")
        + QUESTION
        + EOT
        + H.format("assistant")
    )
    assert tok.render_chat(messages).text == without


def test_optional_fields_and_unicode_are_listed_as_given(tok):
    tools = [
        {"type": "function", "function": {"name": "now"}},
        {"type": "function", "function": {"name": "meteo", "description": "Météo — 天気", "strict": False}},
    ]
    listing = (
        '[\n    {\n        "name": "now"\n    },\n'
        '    {\n        "name": "meteo",\n        "description": "Météo — 天気"\n    }\n]'
    )
    text = tok.render_chat([{"role": "user", "content": "hi"}], tools=tools).text
    assert text == BOT + H.format("system") + INSTRUCTIONS + LIST + listing + EOT + H.format(
        "user"
    ) + "hi" + EOT + (H.format("assistant"))


CALL_ARGS = {
    "city": 'San "Fran"\ncisco',
    "days": 3,
    "units": None,
    "flags": [True, False],
    "extra": {"ratio": 1.5, "tags": ["a, b", "[c]"]},
}


def test_tool_calls_and_results_as_the_model_writes_them(tok):
    """The spec's answer format, `[f(a=...), g(...)]`, then the tool's result as an ipython turn."""
    messages = [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "San Francisco"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps(CALL_ARGS)}},
                {"id": "call_3", "type": "function", "function": {"name": "now", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 14}'},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "sunny"}]},
    ]  # fmt: skip
    calls = (
        '[get_weather(city="San Francisco"), '
        'get_weather(city="San \\"Fran\\"\\ncisco", days=3, units=None, flags=[True, False], '
        'extra={"ratio": 1.5, "tags": ["a, b", "[c]"]}), now()]'
    )
    expected = (
        BOT + H.format("user") + QUESTION + EOT
        + H.format("assistant") + calls + EOT
        + H.format("ipython") + '{"temp": 14}' + EOT
        + H.format("ipython") + "sunny" + EOT
        + H.format("assistant")
    )  # fmt: skip
    assert tok.render_chat(messages).text == expected
    # what the prompt says the model called is what the answer parser reads back
    parsed = parse(calls)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "San Francisco"}),
        ("get_weather", CALL_ARGS),
        ("now", {}),
    ]


def test_tool_calls_after_content_and_as_a_dict(tok):
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Checking."}],
            "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": {"x": -2, "y": 1e100}}}
            ],
        },
    ]
    text = tok.render_chat(messages, add_generation_prompt=False).text
    assert (
        text
        == BOT + H.format("user") + "hi" + EOT + H.format("assistant") + "Checking.[f(x=-2, y=1e+100)]" + EOT
    )


def test_a_tool_result_as_a_json_object(tok):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "tool", "content": {"temp": 14, "sky": "clair, ☀"}},
    ]
    text = tok.render_chat(messages, add_generation_prompt=False).text
    assert (
        text
        == BOT + H.format("user") + "hi" + EOT + H.format("ipython") + '{"temp": 14, "sky": "clair, ☀"}' + EOT
    )
    with pytest.raises(ValueError, match="str or a list of parts"):  # only a tool's result is JSON
        tok.render_chat([{"role": "user", "content": {"temp": 14}}])


def _fn(**function):
    return {"type": "function", "function": function}


@pytest.mark.parametrize(
    "tools,match",
    [
        ([], "non-empty list"),
        ({"type": "function"}, "non-empty list"),
        (["f"], r"tools\[0\] must be"),
        ([{"type": "code_interpreter"}], r"tools\[0\] must be"),
        ([{"type": "function", "function": {"name": "f"}, "x": 1}], r"tools\[0\] has unknown keys \['x'\]"),
        ([_fn(name="f", returns="int")], r"unknown keys \['returns'\]"),
        ([_fn(name="get-weather")], "must be a Python identifier"),
        ([_fn(name="2fast")], "must be a Python identifier"),
        ([_fn(name="class")], "not a keyword"),
        ([_fn(name="a" * 65)], r"must match \^\[a-zA-Z0-9_-\]\{1,64\}\$"),
        ([_fn(name="")], "must match"),
        ([_fn(name="météo")], "must match"),
        ([_fn(name=3)], "must match"),
        ([_fn(name="f"), _fn(name="f")], r"tools\[1\].function.name 'f' is given twice"),
        ([_fn(name="f", description=3)], "description must be a string"),
        ([_fn(name="f", parameters=[])], "parameters must be a JSON Schema object"),
        ([_fn(name="f", strict="yes")], "strict must be a boolean"),
        ([_fn(name="f", strict=True)], r"strict=true \(arguments held to their schema\) is not supported"),
        ([_fn(name=f"f{i}") for i in range(MAX_TOOLS + 1)], f"{MAX_TOOLS + 1} tools; at most {MAX_TOOLS}"),
        ([_fn(name="f", description="x" * (300 << 10))], "bytes as JSON; at most"),
    ],
)
def test_bad_tools_are_refused(tok, tools, match):
    with pytest.raises(ValueError, match=match):
        tok.render_chat([{"role": "user", "content": "hi"}], tools=tools)


def _assistant(*calls, content=None):
    return [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": content, "tool_calls": list(calls)},
    ]


def _call(name="f", arguments="{}"):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.mark.parametrize(
    "messages,match",
    [
        (
            _assistant(_call(arguments="{not json")),
            r"messages\[1\].tool_calls\[0\].function.arguments must be",
        ),
        (_assistant(_call(arguments="[1]")), "must be a JSON object"),
        (_assistant(_call(arguments=None)), "must be a JSON object"),
        (_assistant(_call(arguments='{"my-arg": 1}')), "cannot be written as a Python keyword argument"),
        (_assistant(_call(arguments='{"for": 1}')), "cannot be written as a Python keyword argument"),
        (_assistant(_call(arguments='{"x": NaN}')), "not a finite number"),
        (_assistant(_call(arguments='{"x": ' + "[" * 5000 + "]" * 5000 + "}")), "arguments"),
        (_assistant(_call(name="get-weather")), "Python identifier"),
        (_assistant({"type": "retrieval"}), r"tool_calls\[0\] must be"),
        (_assistant({"type": "function", "function": "f()"}), r"tool_calls\[0\].function must be"),
        (
            [{"role": "user", "content": "hi", "tool_calls": [_call()]}],
            "only assistant messages carry tool_calls",
        ),
        ([{"role": "tool", "content": None}], "has no content"),
    ],
)
def test_bad_tool_calls_are_refused(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_chat(messages)


# -- the ensemble's `tools` input (preprocessing) ---------------------------------------------------


def test_the_tools_input(tok):
    """Through the request parser, as preprocessing runs it: the prompt ids are the spec text's."""
    messages = [{"role": "user", "content": QUESTION}]
    fields = {"messages": json.dumps(messages), "tools": json.dumps([WEATHER])}
    req = parse_request(numpy_inputs(fields), tok)
    expected = BOT + H.format("system") + INSTRUCTIONS + LIST + WEATHER_JSON + EOT
    expected += H.format("user") + QUESTION + EOT + H.format("assistant")
    assert req.prompt.token_ids == tok.encode(expected)
    # a chat-templated text_input takes tools too
    fields = {"text_input": QUESTION, "apply_chat_template": True, "tools": fields["tools"]}
    req = parse_request(numpy_inputs(fields), tok)
    assert req.prompt.token_ids == tok.encode(expected)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"text_input": "hi"}, "tools needs messages or apply_chat_template=true"),
        ({"messages": '[{"role": "user", "content": "hi"}]', "tools": "[{"}, "tools is not valid JSON"),
        (
            {"messages": '[{"role": "user", "content": "hi"}]', "tools": "[" * 100_000},
            "tools is not valid JSON",
        ),
        ({"messages": '[{"role": "user", "content": "hi"}]', "tools": "{}"}, "non-empty list"),
        (
            {"messages": '[{"role": "user", "content": "hi"}]', "tools": json.dumps([_fn(name="a.b")])},
            "must match",
        ),
    ],
)
def test_bad_tools_input_is_invalid_arg(tok, fields, match):
    fields = {"tools": json.dumps([WEATHER]), **fields}
    with pytest.raises(InvalidRequest, match=match):
        parse_request(numpy_inputs(fields), tok)
