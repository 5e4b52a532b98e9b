"""The answer side of Llama 4's pythonic tool calling (openai_api/tool_calls.py): the model's text
-> OpenAI tool_calls, whole and streamed. Cases follow the format of Meta's spec
(llama-models models/llama4/prompt_format.md: `[func_name1(param1=value1, ...), func_name2(...)]`)."""

from __future__ import annotations

import json
import re

import pytest

from openai_api.tool_calls import PYTHON_END, PYTHON_START, StreamParser, parse

# (model text, the calls it holds as (name, arguments) or None: not a call, content as it is)
CASES = [
    # the spec's two example answers
    (
        '[get_weather(city="San Francisco"), get_weather(city="Seattle")]',
        [("get_weather", {"city": "San Francisco"}), ("get_weather", {"city": "Seattle"})],
    ),
    (
        "[get_user_info(user_id=7890, special='black')]",
        [("get_user_info", {"user_id": 7890, "special": "black"})],
    ),
    # wrapped in <|python_start|> (when the server's text shows special tokens), with or without its end
    (f"{PYTHON_START}[f(a=1)]{PYTHON_END}", [("f", {"a": 1})]),
    (f"{PYTHON_START} [f(a=1)]", [("f", {"a": 1})]),
    (" \n[now()]\n ", [("now", {})]),
    ("[\n  f(\n    a=1,\n  ),\n]", [("f", {"a": 1})]),  # Python's trailing commas and newlines
    (
        '[search(q="a, b", filters={"tags": ["x", "y]"], "n": -2, "on": True, "off": None}, scale=1.5e3)]',
        [
            (
                "search",
                {
                    "q": "a, b",
                    "filters": {"tags": ["x", "y]"], "n": -2, "on": True, "off": None},
                    "scale": 1500.0,
                },
            )
        ],
    ),
    (
        '[say(text="She said \\"hi\\", then (left) [x] {y}")]',
        [("say", {"text": 'She said "hi", then (left) [x] {y}'})],
    ),
    (
        "[f(a='it\\'s', b=\"\\u00e9\\n\", c=+2.5, d=-0.0)]",
        [("f", {"a": "it's", "b": "é\n", "c": 2.5, "d": -0.0})],
    ),
    ('[translate(text="日本語 🙂 ]),", to="fr")]', [("translate", {"text": "日本語 🙂 ]),", "to": "fr"})]),
    (
        '[f(nested=[[1, [2, {"k": [3]}]], []], empty={})]',
        [("f", {"nested": [[1, [2, {"k": [3]}]], []], "empty": {}})],
    ),
    ("[_private9(x=10**0)]", None),  # an expression, not a literal
    # not calls: the text is content, unchanged
    ('Let me check the weather: [get_weather(location="New York")]', None),  # the spec's INCORRECT
    ('get_weather(location="New York")', None),  # the spec's INCORRECT: not a list
    ("[f(a=1)] and more", None),
    ("[f(a=1)", None),
    ("[f(a=1)]]", None),
    ("[f(1)]", None),
    ("[f(a=b)]", None),
    ("[f(a=1+2)]", None),
    ("[f(**x)]", None),
    ("[f(a={**x})]", None),
    ("[f(a=1, a=2)]", None),
    ("[]", None),
    ("[1, 2]", None),
    ("[f]", None),
    ("[f(a=1), 2]", None),
    ('[os.system(cmd="ls")]', None),
    ('[f(a=__import__("os"))]', None),
    ("[f(a=(1, 2))]", None),
    ("[f(a={1, 2})]", None),
    ("[f(a=b'x')]", None),
    ("[f(a=1j)]", None),
    ("[f(a=...)]", None),
    ("[f(a=1e999)]", None),
    ("[f(a=-True)]", None),
    ("[f(a={1: 2})]", None),
    ("[f(a=[1, 2)]", None),
    ("[é(a=1)]", None),
    ("[f(), é()]", None),
    ("[class(a=1)]", None),
    ("[" + "a" * 65 + "()]", None),
    (f"[f(a=1)]{PYTHON_END}", None),
    (f"{PYTHON_START}hello{PYTHON_END}", None),
    ("[Hello world, how are you?", None),
    ("plain text", None),
    ("", None),
    ("   ", None),
    ("<b>bold</b>", None),
    ("[f(a=" + "[" * 300 + "]" * 300 + ")]", None),  # nested past what Python parses
    ("[f(a=" + "1" * 5000 + ")]", None),  # past Python's int-literal limit
]


def _calls(parsed) -> list | None:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] or None


@pytest.mark.parametrize("text,calls", CASES)
def test_parse(text, calls):
    got = parse(text)
    assert _calls(got) == calls
    assert got.content == (None if calls else text)


def test_openai_shapes_and_ids():
    a, b = parse('[f(x="é"), g()]').tool_calls
    assert a.message() == {
        "id": a.id,
        "type": "function",
        "function": {"name": "f", "arguments": '{"x": "é"}'},
    }
    assert b.delta(1) == {"index": 1, **b.message()}
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in (a, b)) and a.id != b.id
    assert [c.name for c in parse("[f(), g()]", parallel=False).tool_calls] == ["f"]


def _stream(pieces: list[str], parallel: bool = True) -> tuple[str, list, list[str]]:
    parser = StreamParser(parallel)
    out = [parser.feed(p) for p in pieces]
    rest = parser.finish()
    return "".join(out) + (rest.content or ""), rest, out


@pytest.mark.parametrize("text,calls", CASES)
def test_streamed_in_any_pieces_equals_whole(text, calls):
    """Split at every character boundary (two pieces), and one character at a time."""
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        content, rest, _ = _stream(pieces)
        assert _calls(rest) == calls, pieces
        if calls:
            assert content == "" and rest.content is None
        else:
            assert content == text and not rest.tool_calls


def test_content_streams_at_once_and_calls_are_held():
    _, _, out = _stream(list("Hello"))
    assert out == list("Hello")  # nothing held back
    _, _, out = _stream(list("  [Hello world"))
    assert "".join(out[:9]) == "" and "".join(out[:10]) == "  [Hello w"  # held only while it may be a call
    _, _, out = _stream(list("<|python_sta"))
    assert "".join(out) == ""  # may still be <|python_start|>
    content, rest, out = _stream(list('[f(a="x")] then text'))
    assert set(out) == {""} and content == '[f(a="x")] then text' and rest.content == content
    content, rest, out = _stream(["[f(", "), g()]"], parallel=False)
    assert out == ["", ""] and [c.name for c in rest.tool_calls] == ["f"] and rest.content is None
