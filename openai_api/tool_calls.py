"""Llama 4's pythonic tool calls in the model's answer -> OpenAI `tool_calls`. Pure: no I/O.

The model calls tools by answering only a Python list of calls, `[get_weather(city="Paris",
days=3), now()]`, sometimes wrapped in `<|python_start|>...<|python_end|>` (those are special
tokens, which the server's text skips by default; both forms parse). As vLLM's `llama4_pythonic`
parser: the whole answer is the list, or it is plain content; a tool-call answer has no content.
Values must be Python literals (str, int, float, bool, None, lists, dicts with string keys); the
text is parsed with `ast`, never evaluated. Anything else is content, returned unchanged.

`StreamParser` gives the same result as `parse` from the same text in any pieces: it passes
content on at once unless the answer may still be a call (it starts with `[name(` or
`<|python_start|>`, after whitespace), and then holds it until the end.
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # OpenAI's names that Python can write
_NAME_START = re.compile(r"[A-Za-z_]")
_NAME_CHAR = re.compile(r"[A-Za-z0-9_]")
_SPACE = " \t\n\r\f\v"  # the whitespace Python's tokenizer skips between tokens (and a bit more)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def message(self) -> dict:
        """As in a chat.completion's message.tool_calls."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def delta(self, index: int) -> dict:
        """As in a chat.completion.chunk's delta.tool_calls (the whole call in one delta)."""
        return {"index": index, **self.message()}


@dataclass(frozen=True)
class Parsed:
    content: str | None  # None when the answer is tool calls
    tool_calls: tuple[ToolCall, ...] = ()


def parse(text: str, parallel: bool = True) -> Parsed:
    """A whole answer -> its tool calls (content None), or the text itself as content. Not
    `parallel` (OpenAI's parallel_tool_calls=false): the first call only."""
    if _head(text) != "call":
        return Parsed(text)
    body = text.strip()
    if body.startswith(PYTHON_START):
        body = body[len(PYTHON_START) :].strip()
        if body.endswith(PYTHON_END):
            body = body[: -len(PYTHON_END)].strip()
    calls = _calls(body)
    return Parsed(text) if calls is None else Parsed(None, calls if parallel else calls[:1])


def _head(text: str) -> str:
    """Whether a (partial) answer starts as a tool call: "call" once it reads `[name(` (after
    whitespace and an optional <|python_start|>), "no" once it cannot, else "maybe". Extending
    the text never changes "call" or "no"."""
    s = text.lstrip()
    if s.startswith(PYTHON_START):
        s = s[len(PYTHON_START) :].lstrip()
    elif PYTHON_START.startswith(s):
        return "maybe"  # empty, or a piece of <|python_start|>
    if not s:
        return "maybe"
    if s[0] != "[":
        return "no"
    i = _skip_space(s, 1)
    if i == len(s):
        return "maybe"
    if not _NAME_START.match(s, i):
        return "no"
    while i < len(s) and _NAME_CHAR.match(s, i):
        i += 1
    i = _skip_space(s, i)
    if i == len(s):
        return "maybe"
    return "call" if s[i] == "(" else "no"


def _skip_space(s: str, i: int) -> int:
    while i < len(s) and s[i] in _SPACE:
        i += 1
    return i


class _NotACall(Exception):
    pass


def _calls(body: str) -> tuple[ToolCall, ...] | None:
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: e.g. a huge int literal
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    try:
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return None
            if not _NAME.fullmatch(node.func.id):  # ast takes any Unicode identifier
                return None
            args: dict[str, Any] = {}
            for kw in node.keywords:
                if kw.arg is None or kw.arg in args:  # **spread, or a repeated name
                    return None
                args[kw.arg] = _value(kw.value)
            arguments = json.dumps(args, ensure_ascii=False, allow_nan=False)
            calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", node.func.id, arguments))
    except (_NotACall, RecursionError, ValueError):
        return None
    return tuple(calls)


def _value(node: ast.expr) -> Any:
    """A Python literal's value, if JSON can hold it."""
    if isinstance(node, ast.Constant):
        v = node.value
        if v is None or isinstance(v, (str, bool, int)):
            return v
        if isinstance(v, float) and math.isfinite(v):
            return v
        raise _NotACall  # bytes, complex, Ellipsis, inf
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if isinstance(operand, ast.Constant) and type(operand.value) in (int, float):
            return -operand.value if isinstance(node.op, ast.USub) else operand.value
        raise _NotACall
    if isinstance(node, ast.List):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                raise _NotACall  # JSON keys are strings; None here is a **spread
            out[k.value] = _value(v)
        return out
    raise _NotACall  # names, calls, tuples, sets, expressions


class StreamParser:
    """Text deltas in, content deltas out; `finish()` gives the rest and the tool calls."""

    def __init__(self, parallel: bool = True) -> None:
        self._parallel = parallel
        self._held: list[str] = []
        self._state = "maybe"  # "content": passing text on; "call": holding all of it

    def feed(self, delta: str) -> str:
        """The content to send now (possibly "")."""
        if self._state == "content":
            return delta
        self._held.append(delta)
        if self._state == "maybe":
            head = _head("".join(self._held))
            if head == "no":  # not a call: what was held goes out, and from now on all of it
                self._state = "content"
                text, self._held = "".join(self._held), []
                return text
            if head == "call":
                self._state = "call"
        return ""

    def finish(self) -> Parsed:
        """The content still held (None for tool calls) and the tool calls, at the answer's end."""
        text, self._held = "".join(self._held), []
        return Parsed(text) if self._state == "content" else parse(text, self._parallel)
