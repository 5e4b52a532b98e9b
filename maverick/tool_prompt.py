"""Llama 4's pythonic tool calling, on the prompt side: the tool list in the system message, and an
assistant's earlier tool calls written back as the model writes them, `[f(a=1), g(b="x")]`.

The reference is Meta's: llama-models `models/llama4/prompt_format.md`, "Zero shot function calling
- system message" (its system prompt is llama-stack's Llama 4 `PythonListCustomToolGenerator`,
`llama_stack/models/llama/llama4/prompt_templates/system_prompts.py`; the instructions are kept
verbatim in data/llama4_tool_instructions.txt). The system message is those instructions, a blank
line, `Here is a list of functions in JSON format that you can invoke:`, the functions as a JSON
list with 4-space indents; a caller's own system message follows on a new line, as llama-stack's
default (`system_message_behavior=append`) writes it. The functions are OpenAI's function objects
({name, description, parameters}: JSON Schema as given) where Meta's generator rewrites parameters
into its own flat `"type": "dict"` form, which cannot hold nested schemas.

Tool calls are written `[name(key=value, ...), ...]` with Python literals (strings double-quoted),
as the spec's example answer, without `<|python_start|>` (Meta wraps only code-interpreter calls).
"""

from __future__ import annotations

import json
import keyword
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTRUCTIONS = (Path(__file__).parent / "data" / "llama4_tool_instructions.txt").read_text().rstrip("\n")
LIST_HEADER = "Here is a list of functions in JSON format that you can invoke:"
MAX_TOOLS = 128  # OpenAI's own limit
MAX_TOOLS_BYTES = 256 << 10  # the functions' JSON, as listed in the prompt
# OpenAI's names are ^[a-zA-Z0-9_-]{1,64}$; Llama 4 writes a call as Python, so a name must also be
# a Python identifier (no hyphen, no leading digit) or its calls would not parse
OPENAI_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
PYTHON_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FUNCTION_KEYS = ("name", "description", "parameters", "strict")


def check_tools(tools: Any) -> list[dict]:
    """OpenAI's `tools` ([{"type": "function", "function": {...}}]) -> the function definitions the
    prompt lists, {name, description?, parameters?}. Raises ValueError saying what is wrong."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of {'type': 'function', 'function': {...}}")
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"{len(tools)} tools; at most {MAX_TOOLS}")
    functions, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(tool.get("function"), dict)
        ):
            raise ValueError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        if extra := sorted(set(tool) - {"type", "function"}):
            raise ValueError(f"{where} has unknown keys {extra}")
        fn = tool["function"]
        if extra := sorted(set(fn) - set(_FUNCTION_KEYS)):
            raise ValueError(
                f"{where}.function has unknown keys {extra} (expected {', '.join(_FUNCTION_KEYS)})"
            )
        name = check_name(fn.get("name"), f"{where}.function.name")
        if name in seen:
            raise ValueError(f"{where}.function.name {name!r} is given twice")
        seen.add(name)
        out = {"name": name}
        if fn.get("description") is not None:
            if not isinstance(fn["description"], str):
                raise ValueError(f"{where}.function.description must be a string")
            out["description"] = fn["description"]
        if fn.get("parameters") is not None:
            if not isinstance(fn["parameters"], dict):
                raise ValueError(f"{where}.function.parameters must be a JSON Schema object")
            out["parameters"] = fn["parameters"]
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ValueError(f"{where}.function.strict must be a boolean")
        if strict:
            raise ValueError(
                f"{where}.function.strict=true (arguments held to their schema) is not supported: a forced "
                "tool_choice holds a call's syntax and names, not its arguments' types"
            )
        functions.append(out)
    size = len(_listing(functions).encode("utf-8", "surrogatepass"))
    if size > MAX_TOOLS_BYTES:
        raise ValueError(f"the tools take {size} bytes as JSON; at most {MAX_TOOLS_BYTES}")
    return functions


def check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not OPENAI_NAME.fullmatch(name):
        raise ValueError(f"{where} must match ^[a-zA-Z0-9_-]{{1,64}}$, got {_short(name)}")
    if not PYTHON_NAME.fullmatch(name) or keyword.iskeyword(name):
        raise ValueError(
            f"{where} {name!r}: Llama 4 writes tool calls as Python, so a name must be a Python "
            "identifier (letters, digits and underscores, not starting with a digit; not a keyword)"
        )
    return name


def system_message(functions: Sequence[dict], system: str = "") -> str:
    """The system message that lists `functions` (from check_tools), then the caller's own."""
    text = f"{INSTRUCTIONS}\n\n{LIST_HEADER}\n{_listing(functions)}"
    return f"{text}\n{system}" if system else text


def _listing(functions: Sequence[dict]) -> str:
    return json.dumps(list(functions), indent=4, ensure_ascii=False)


def tool_calls_text(tool_calls: Any, where: str) -> str:
    """OpenAI's assistant `tool_calls` -> `[name(key=value, ...), ...]`, as the model writes them.
    `function.arguments` is a JSON object as text (OpenAI's shape) or as a dict."""
    if not isinstance(tool_calls, list):
        raise ValueError(f"{where} must be a list of {{'type': 'function', 'function': {{...}}}}")
    calls = []
    for k, call in enumerate(tool_calls):
        at = f"{where}[{k}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise ValueError(
                f"{at} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}"
            )
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{at}.function must be {{'name': ..., 'arguments': ...}}")
        name = check_name(fn.get("name"), f"{at}.function.name")
        args = _arguments(fn.get("arguments"), f"{at}.function.arguments")
        for key in args:
            if not PYTHON_NAME.fullmatch(key) or keyword.iskeyword(key):
                raise ValueError(
                    f"{at}.function.arguments: {_short(key)} cannot be written as a Python keyword argument"
                )
        try:
            rendered = ", ".join(f"{key}={_literal(value)}" for key, value in args.items())
        except RecursionError:
            raise ValueError(f"{at}.function.arguments are nested too deeply") from None
        except ValueError as e:
            raise ValueError(f"{at}.function.arguments: {e}") from None
        calls.append(f"{name}({rendered})")
    return "[" + ", ".join(calls) + "]"


def _arguments(raw: Any, where: str) -> dict:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"{where} must be a JSON object, got {_short(raw)}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a JSON object (as text), got {_short(raw)}")
    return raw


def _literal(value: Any) -> str:
    """A JSON value as the Python literal Llama 4 writes: "text", 3, 2.5, True, None, [..], {"k": ..}."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are Python's too
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{_literal(str(k))}: {_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise ValueError(f"a {type(value).__name__} is not a JSON value")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 70 else text[:67] + "..."
