"""Guided decoding in the engine (xgrammar): the tiny model's gibberish, held to a JSON schema, a
regex or an EBNF grammar, always parses and validates; greedy and sampled, alone and in a busy
batch, where unguided requests keep exactly their tokens; a guide that does not compile is the
request's error, named."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from test_engine import make_engine

from maverick.engine.api import Prompt, SamplingParams
from maverick.engine.errors import RequestError
from maverick.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "ok"],
    "additionalProperties": False,
}
REGEX = r"(yes|no), [0-9]{1,3} (apples|pears)\."
EBNF = 'root ::= "(" item (" " item)? (" " item)? ")"\nitem ::= [a-z] [a-z]? [a-z]? | "(" [a-z] ")"'
EBNF_AS_REGEX = r"\((?:[a-z]{1,3}|\([a-z]\))(?: (?:[a-z]{1,3}|\([a-z]\))){0,2}\)"


@pytest.fixture(scope="module")
def prompts(tiny_ckpt) -> list[Prompt]:
    tok = Tokenizer.from_dir(tiny_ckpt)
    texts = ["Give me a JSON record.", "Answer the question", "Lisp:", "Describe a person in JSON"]
    return [Prompt(tok.encode(t, add_bos=True)) for t in texts]


def _run(engine, requests: dict[str, tuple[Prompt, SamplingParams]]) -> dict[str, tuple[str, list[int], str]]:
    """(text, ids, finish reason) of each request, all running together."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    text: dict[str, str] = {rid: "" for rid in requests}
    ids: dict[str, list[int]] = {rid: [] for rid in requests}
    reason = {}
    while engine.has_unfinished():
        for out in engine.step():
            text[out.request_id] += out.text
            ids[out.request_id] += out.token_ids
            if out.finished:
                reason[out.request_id] = out.finish_reason
                assert out.error is None, out.error
    return {rid: (text[rid], ids[rid], reason[rid]) for rid in requests}


def _guided(kind: str, guide: str = "", **kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 256), guided_decoding=(kind, guide), **kw)


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 7), (1.0, 8)])
def test_json_schema_answers_validate_alone_and_in_a_busy_batch(tiny_ckpt, prompts, temperature, seed):
    params = _guided("json_schema", json.dumps(SCHEMA), temperature=temperature, seed=seed)
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = _run(make_engine(tiny_ckpt), {"guided": (prompts[0], params)})
    busy = _run(
        make_engine(tiny_ckpt),
        {
            "guided": (prompts[0], params),
            "guided-2": (prompts[3], params),
            **{f"plain-{i}": (p, plain) for i, p in enumerate(prompts)},
        },
    )
    for text, _, reason in (alone["guided"], busy["guided"], busy["guided-2"]):
        assert reason == "stop", text  # the grammar ended the answer, before max_tokens
        jsonschema.validate(json.loads(text), SCHEMA)
    if seed is not None or temperature == 0.0:  # batch-independent: the same answer in company
        assert busy["guided"][:2] == alone["guided"][:2]
    unguided = _run(make_engine(tiny_ckpt), {f"plain-{i}": (p, plain) for i, p in enumerate(prompts)})
    assert {rid: busy[rid] for rid in unguided} == unguided  # no mask on the others' rows


STRUCTURAL_TAG = {
    "type": "structural_tag",
    "format": {
        "type": "sequence",
        "elements": [
            {"type": "const_string", "value": "Answer: "},
            {
                "type": "tag",
                "begin": "<json>",
                "content": {"type": "json_schema", "json_schema": {
                    "type": "object", "properties": {"x": {"type": "integer", "maximum": 9}},
                    "required": ["x"], "additionalProperties": False,
                }},
                "end": "</json>",
            },
        ],
    },
}  # fmt: skip


def test_regex_ebnf_structural_tag_and_any_json(tiny_ckpt, prompts):
    got = _run(
        make_engine(tiny_ckpt),
        {
            "tag": (prompts[3], _guided("structural_tag", json.dumps(STRUCTURAL_TAG), temperature=0.0)),
            "regex": (prompts[1], _guided("regex", REGEX, temperature=1.0, seed=3)),
            "ebnf": (prompts[2], _guided("ebnf_grammar", EBNF, temperature=0.0, max_tokens=48)),
            "json": (prompts[0], _guided("json", temperature=0.0)),
        },
    )
    assert re.fullmatch(REGEX, got["regex"][0]) and got["regex"][2] == "stop"
    tagged = re.fullmatch(r"Answer: <json>(.*)</json>", got["tag"][0], re.S)
    assert tagged and got["tag"][2] == "stop" and set(json.loads(tagged[1])) == {"x"}
    assert re.fullmatch(EBNF_AS_REGEX, got["ebnf"][0]) and got["ebnf"][2] == "stop"
    json.loads(got["json"][0])


@pytest.mark.parametrize(
    "kind, guide, message",
    [
        ("json_schema", "{not json", "not valid JSON"),
        (
            "json_schema",
            json.dumps({"type": "object", "properties": {"a": {"type": "nonsense"}}}),
            "json_schema",
        ),
        ("regex", "(unclosed", "not a valid regex"),
        ("ebnf_grammar", "root ::= ", "not a valid ebnf_grammar"),
    ],
)
def test_a_guide_that_does_not_compile_is_the_requests_error(tiny_ckpt, prompts, kind, guide, message):
    engine = make_engine(tiny_ckpt)
    with pytest.raises(RequestError, match=re.escape(message)) as err:
        engine.add_request("bad", prompts[0], _guided(kind, guide))
    assert "/project/" not in str(err.value) and "guided_decoding_guide" in str(err.value)
    assert not engine.has_unfinished()


def test_guide_types_and_texts_are_checked():
    with pytest.raises(ValueError, match="guide type"):
        SamplingParams(guided_decoding=("xml", "<a/>"))
    with pytest.raises(ValueError, match="needs its text"):
        SamplingParams(guided_decoding=("regex", ""))
    assert SamplingParams(guided_decoding=["json", ""]).guided_decoding == ("json", "")


def test_json_strings_admit_no_control_characters(tiny_ckpt):
    """Unescaped control characters are not JSON; xgrammar 0.2.9 lets them into length-bounded
    strings, which the engine's grammar closes (engine/guided.py)."""
    engine = make_engine(tiny_ckpt)
    schema = json.dumps(
        {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}, "required": ["a"]}
    )
    for kind, guide in (("json_schema", schema), ("json", "")):
        matcher = engine.grammars.matcher(engine.grammars.compile(kind, guide), [])
        assert matcher.accept_string('{"a": "x' if guide else '["x')
        assert not matcher.accept_string("\x14") and matcher.accept_string('y"')


def test_min_tokens_is_refused_with_a_guide():
    """The grammar may end before min_tokens, when only the (then masked) end tokens are left."""
    with pytest.raises(ValueError, match="min_tokens must be 0 with guided decoding"):
        SamplingParams(min_tokens=3, guided_decoding=("regex", "yes"))


def test_trtllm_structural_tag_format(tiny_ckpt, prompts):
    """TensorRT-LLM's structural tags: {"structures": [{begin, schema, end}], "triggers": [...]}."""
    tag = {
        "structures": [{"begin": "<f>", "schema": {"type": "object", "properties": {"a": {"enum": [1, 2]}},
                                                   "required": ["a"]}, "end": "</f>"}],
        "triggers": ["<f>"],
    }  # fmt: skip
    engine = make_engine(tiny_ckpt)
    matcher = engine.grammars.matcher(engine.grammars.compile("structural_tag", json.dumps(tag)), [])
    assert matcher.accept_string('free text <f>{"a": 2}</f> more')
    assert not matcher.accept_string('<f>{"a": 3}')


def test_forced_tool_call_grammar_admits_only_calls_the_parser_reads(tiny_ckpt):
    """openai_api/guides.py's grammar for a forced tool_choice: Python keywords (`from`) and
    repeated keywords are not admitted (Python would refuse them), nor bad escapes or numbers that
    overflow; what it admits, the tool-call parser reads as calls."""
    from openai_api import tool_calls
    from openai_api.guides import forced_tool_calls

    send = {"type": "function", "function": {"name": "send", "parameters": {
        "type": "object", "properties": {"to": {}, "from": {}, "body": {}, "ﬁle": {}}}}}  # fmt: skip
    now = {"type": "function", "function": {"name": "now"}}
    engine = make_engine(tiny_ckpt)
    grammar = engine.grammars.compile("ebnf_grammar", forced_tool_calls([send, now], "required", True))
    admitted = ['[send(to="a", body=1)]', "[send()]", '[now(), send(body=[1, {"k": None}])]',
                '[send(to="\\u00e9\\n")]', "[send(to='x\\'y')]"]  # fmt: skip
    refused = ['[send(to="a", to="b")]', "[send(from=1)]", '[send(to="\\u")]', "[send(body=1e999)]",
               '[send(body=1, to="a")]', "[send(ﬁle=1)]", '[send(to="\x01")]']  # fmt: skip
    for text in admitted + refused:
        matcher = engine.grammars.matcher(grammar, [])
        ok = matcher.accept_string(text) and matcher.is_completed()
        assert ok == (text in admitted), text
        if ok:
            assert tool_calls.parse(text, True).tool_calls, text
