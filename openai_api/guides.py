"""OpenAI's constrained outputs as the ensemble's guided decoding (guided_decoding_guide_type /
guided_decoding_guide, held to by xgrammar in the engine):

- `response_format` {"type": "json_object"}: any JSON object; {"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}}: JSON valid against the schema;
- `tool_choice` "required" or naming a function: the answer is Llama 4's pythonic tool-call list,
  `[name(arg=value, ...), ...]`, written by an EBNF grammar made from the tools: function names and
  keyword names from the tools' schemas, values Python literals (what tool_calls.py parses; the
  values' types are not checked against the schemas).
"""

from __future__ import annotations

import json
import keyword
import unicodedata
from typing import Any

from openai_api.errors import bad_request

ANY_OBJECT = json.dumps({"type": "object"})


def response_format(fmt: Any) -> tuple[str, str] | None:
    """(guide type, guide) for a `response_format`, or None for plain text."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("'response_format' must be an object", "response_format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_schema", ANY_OBJECT
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            needs = "response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}}"
            raise bad_request(needs, "response_format")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise bad_request(
                "response_format json_schema.schema must be a JSON schema object", "response_format"
            )
        return "json_schema", json.dumps(schema)
    raise bad_request(
        f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        "response_format",
    )


def _literal(text: str) -> str:
    return json.dumps(text)  # an EBNF string literal: JSON's quoting is xgrammar's


def _keyword_name(name: Any) -> bool:
    """A property that can be a Python keyword argument as written, and parses back as itself."""
    return (
        isinstance(name, str)
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and unicodedata.normalize("NFKC", name) == name
    )


# Python literals as tool_calls.py reads them (ast.literal_eval of keyword values): strings with
# Python's escapes and no control characters, numbers that stay finite, lists and dicts of them
_VALUES = r"""
value ::= string | number | "True" | "False" | "None" | list | dict
string ::= "\"" ([^"\\\x00-\x1f] | escape)* "\"" | "'" ([^'\\\x00-\x1f] | escape)* "'"
escape ::= "\\" ([\"\\'bfnrt] | "u" [0-9a-fA-F]{4})
number ::= "-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})?
list ::= "[" (value (", " value)*)? "]"
dict ::= "{" (string ": " value (", " string ": " value)*)? "}"
"""


def _arguments(i: int, keys: list[str]) -> list[str]:
    """Rules for call i's keyword arguments: each of `keys` at most once, in the schema's order
    (so no keyword repeats, which Python refuses): first{i}_j starts with key j or a later one,
    rest{i}_j continues after a comma."""
    n = len(keys)
    rules = [f'first{i}_{n} ::= ""', f'rest{i}_{n} ::= ""']
    for j in reversed(range(n)):
        arg = f"{_literal(keys[j] + '=')} value"
        rules.append(f"first{i}_{j} ::= {arg} rest{i}_{j + 1} | first{i}_{j + 1}")
        rules.append(f'rest{i}_{j} ::= ", " {arg} rest{i}_{j + 1} | rest{i}_{j + 1}')
    return rules


def forced_tool_calls(tools: list, choice: Any, parallel: bool) -> str:
    """An EBNF grammar (xgrammar's) for a Llama 4 tool-call list: any of the tools for
    tool_choice "required", the named one otherwise; one call unless `parallel`. Keywords are the
    tools' schema properties (those a Python call can carry), each at most once, in schema order."""
    by_name = {
        t["function"]["name"]: t["function"]
        for t in tools
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    }
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in by_name:
            raise bad_request(f"tool_choice names {name!r}, which is not one of the tools", "tool_choice")
        names = [name]
    else:
        names = list(by_name)
    rules = []
    for i, name in enumerate(names):
        params = by_name[name].get("parameters") or {}
        props = params.get("properties") if isinstance(params, dict) else None
        keys = [k for k in (props if isinstance(props, dict) else {}) if _keyword_name(k)]
        rules.append(f'call{i} ::= {_literal(name + "(")} first{i}_0 ")"')
        rules += _arguments(i, keys)
    call = " | ".join(f"call{i}" for i in range(len(names)))
    root = 'root ::= "[" call (", " call)* "]"' if parallel else 'root ::= "[" call "]"'
    return "\n".join([root, f"call ::= {call}", *rules]) + _VALUES
