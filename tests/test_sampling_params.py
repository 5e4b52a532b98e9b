"""SamplingParams: defaults, normalisation, and one clear error per invalid value (never a clamp)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from maverick.engine.api import DEFAULT_MAX_TOKENS, SamplingParams
from maverick.engine.errors import SamplingParamsError


def test_defaults():
    p = SamplingParams()
    assert p.max_tokens == DEFAULT_MAX_TOKENS == 1024
    assert (p.min_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0, 1.0, 1.0, 0, 0.0, None)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.stop, p.stop_token_ids) == ((), ())
    assert (p.ignore_eos, p.include_stop_str_in_output, p.logprobs) == (False, False, False)
    assert not p.is_greedy


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.0


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.0, seed=3).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy


def test_normalisation():
    p = SamplingParams(
        stop=["a", "bc"],
        stop_token_ids=[5, np.int64(7)],
        top_k=-1,
        temperature=1,
        max_tokens=np.int32(5),
        top_p=np.float32(0.5),
    )
    assert p.stop == ("a", "bc") and p.stop_token_ids == (5, 7) and p.top_k == 0
    assert type(p.temperature) is float and p.temperature == 1.0
    assert type(p.max_tokens) is int and p.max_tokens == 5
    assert type(p.top_p) is float and p.top_p == 0.5
    assert all(type(t) is int for t in p.stop_token_ids)
    assert SamplingParams(stop="END").stop == ("END",)  # one string, as the OpenAI API allows


def test_boundaries_accepted():
    SamplingParams(max_tokens=1, min_tokens=1)
    SamplingParams(temperature=0.0, top_p=1.0, min_p=0.0, top_k=0)
    SamplingParams(top_p=1e-9, min_p=1.0, top_k=1)
    SamplingParams(seed=0)
    SamplingParams(seed=2**64 - 1)
    SamplingParams(repetition_penalty=1e-6, presence_penalty=-2, frequency_penalty=2)
    SamplingParams(presence_penalty=2.0, frequency_penalty=-2.0)
    SamplingParams(stop=[str(i) for i in range(16)], stop_token_ids=[0])


# (kwargs, the range text the message must contain)
INVALID = [
    ({"max_tokens": 0}, ">= 1"),
    ({"max_tokens": -5}, ">= 1"),
    ({"max_tokens": True}, ">= 1"),
    ({"max_tokens": 1.0}, ">= 1"),
    ({"max_tokens": "16"}, ">= 1"),
    ({"max_tokens": None}, ">= 1"),
    ({"min_tokens": -1}, "[0, 1024]"),
    ({"min_tokens": 5, "max_tokens": 4}, "[0, 4]"),
    ({"min_tokens": 2.0}, "[0, 1024]"),
    ({"temperature": -0.1}, ">= 0"),
    ({"temperature": math.nan}, ">= 0"),
    ({"temperature": math.inf}, ">= 0"),
    ({"temperature": "0.7"}, ">= 0"),
    ({"temperature": False}, ">= 0"),
    ({"temperature": 10**400}, ">= 0"),
    ({"top_p": 0.0}, "(0, 1]"),
    ({"top_p": 1.5}, "(0, 1]"),
    ({"top_p": -0.5}, "(0, 1]"),
    ({"top_p": math.nan}, "(0, 1]"),
    ({"top_k": -2}, ">= -1"),
    ({"top_k": 2.5}, ">= -1"),
    ({"top_k": True}, ">= -1"),
    ({"min_p": -0.1}, "[0, 1]"),
    ({"min_p": 1.01}, "[0, 1]"),
    ({"min_p": math.nan}, "[0, 1]"),
    ({"seed": -1}, f"[0, {2**64 - 1}]"),
    ({"seed": 2**64}, f"[0, {2**64 - 1}]"),
    ({"seed": 1.0}, f"[0, {2**64 - 1}]"),
    ({"seed": "42"}, f"[0, {2**64 - 1}]"),
    ({"seed": True}, f"[0, {2**64 - 1}]"),
    ({"repetition_penalty": 0.0}, "> 0"),
    ({"repetition_penalty": -1.0}, "> 0"),
    ({"repetition_penalty": math.inf}, "> 0"),
    ({"presence_penalty": 2.01}, "[-2, 2]"),
    ({"presence_penalty": -2.5}, "[-2, 2]"),
    ({"presence_penalty": math.nan}, "[-2, 2]"),
    ({"frequency_penalty": 3}, "[-2, 2]"),
    ({"frequency_penalty": -2.0001}, "[-2, 2]"),
    ({"stop": [""]}, "non-empty strings"),
    ({"stop": ["a", 3]}, "non-empty strings"),
    ({"stop": [str(i) for i in range(17)]}, "at most 16"),
    ({"stop": 5}, "a list of strings"),
    ({"stop": None}, "a list of strings"),
    ({"stop": {"a"}}, "a list of strings"),
    ({"stop_token_ids": [-1]}, "integers >= 0"),
    ({"stop_token_ids": [1, True]}, "integers >= 0"),
    ({"stop_token_ids": [1.0]}, "integers >= 0"),
    ({"stop_token_ids": 7}, "integers >= 0"),
    ({"ignore_eos": 1}, "true or false"),
    ({"ignore_eos": "yes"}, "true or false"),
    ({"include_stop_str_in_output": None}, "true or false"),
    ({"logprobs": 1}, "true or false"),
    ({"logprobs": True, "top_logprobs": 21}, "[0, 20]"),
    ({"logprobs": True, "top_logprobs": -1}, "[0, 20]"),
    ({"logprobs": True, "top_logprobs": 2.0}, "[0, 20]"),
    ({"logprobs": True, "top_logprobs": True}, "[0, 20]"),
    ({"top_logprobs": 3}, "0 unless logprobs is true"),
    ({"n": 0}, "[1, 16]"),
    ({"n": 17}, "[1, 16]"),
    ({"n": 2.0}, "[1, 16]"),
    ({"n": None}, "[1, 16]"),
    ({"n": 3, "seed": 2**64 - 2}, f"[0, {2**64 - 3}] or null (choice i of n=3 draws from seed + i)"),
    ({"logit_bias": 5}, "a map of token ids to biases, or (token id, bias) pairs"),
    ({"logit_bias": [(1, 2, 3)]}, "a map of token ids to biases, or (token id, bias) pairs"),
]


@pytest.mark.parametrize(("kwargs", "allowed"), INVALID, ids=[repr(k)[:60] for k, _ in INVALID])
def test_invalid(kwargs, allowed):
    name = [k for k in kwargs if k != "max_tokens"][-1] if len(kwargs) > 1 else next(iter(kwargs))
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert message.startswith(f"{name} must be "), message
    assert allowed in message, message
    assert repr(kwargs[name]) in message, message


def test_check_vocab():
    SamplingParams(stop_token_ids=[0, 99]).check_vocab(100)
    with pytest.raises(SamplingParamsError, match=r"stop_token_ids must be in \[0, 100\).*\[100\]"):
        SamplingParams(stop_token_ids=[5, 100]).check_vocab(100)


def test_word_bytes_are_bounded():
    SamplingParams(stop=["é" * 128], bad_words=["x" * 256])  # 256 bytes each: the limit
    with pytest.raises(SamplingParamsError, match=r"stop\[1\] is 258 bytes; at most 256"):
        SamplingParams(stop=["a", "é" * 129])
    with pytest.raises(SamplingParamsError, match=r"bad_words\[0\] is 257 bytes; at most 256"):
        SamplingParams(bad_words=["x" * 257])


def test_bad_words_ids():
    p = SamplingParams(bad_words_ids=[[5], [np.int64(4), 6]])
    assert p.bad_words_ids == ((5,), (4, 6))
    assert SamplingParams(**dataclasses.asdict(p)) == p  # as the request JSON carries it
    bad = ([[]], [[-1]], [[1.0]], [[True]], [5], [[1] * 258], [[1]] * 129, "ab")
    for ids in bad:
        with pytest.raises(SamplingParamsError, match="bad_words_ids must be at most 128 non-empty lists"):
            SamplingParams(bad_words_ids=ids)
    p.check_vocab(7)
    with pytest.raises(SamplingParamsError, match=r"bad_words_ids must be in \[0, 6\)"):
        p.check_vocab(6)


def test_top_logprobs_and_n():
    assert (SamplingParams().top_logprobs, SamplingParams().n) == (0, 1)
    assert SamplingParams(logprobs=True, top_logprobs=20).top_logprobs == 20
    p = SamplingParams(n=np.int32(16), seed=2**64 - 16)
    assert type(p.n) is int and p.n == 16
    assert SamplingParams(**dataclasses.asdict(p)) == p


def test_for_choice_is_one_sequence_drawing_from_seed_plus_i():
    p = SamplingParams(n=3, seed=10, temperature=0.5, logprobs=True)
    assert [p.for_choice(i) for i in range(3)] == [
        SamplingParams(seed=10 + i, temperature=0.5, logprobs=True) for i in range(3)
    ]
    assert SamplingParams(n=2).for_choice(1) == SamplingParams()


def test_logit_bias():
    p = SamplingParams(logit_bias={7: 1, 2: -100.0, np.int64(5): np.float32(0.5)})
    assert p.logit_bias == ((2, -100.0), (5, 0.5), (7, 1.0))  # sorted pairs: one value per content
    assert all(type(t) is int and type(b) is float for t, b in p.logit_bias)
    assert SamplingParams(logit_bias=[[7, 1], [2, -100], [5, 0.5]]) == p
    assert SamplingParams(**json.loads(json.dumps(dataclasses.asdict(p)))) == p  # as the request JSON
    SamplingParams(logit_bias={i: 100 for i in range(300)})
    errors = [
        ({i: 1 for i in range(301)}, "logit_bias has 301 entries; at most 300"),
        ({-1: 1}, "logit_bias token ids must be integers >= 0, got -1"),
        ({True: 1}, "logit_bias token ids must be integers >= 0, got True"),
        ({"5": 1}, "logit_bias token ids must be integers >= 0, got '5'"),
        ([(3, 1), (3, 2)], "logit_bias gives token 3 twice"),
        ({3: 100.5}, "logit_bias[3] must be a number in [-100, 100], got 100.5"),
        ({3: math.nan}, "logit_bias[3] must be a number in [-100, 100], got nan"),
        ({3: "1"}, "logit_bias[3] must be a number in [-100, 100], got '1'"),
    ]
    for bias, message in errors:
        with pytest.raises(SamplingParamsError) as err:
            SamplingParams(logit_bias=bias)
        assert str(err.value) == message
    p.check_vocab(8)
    with pytest.raises(SamplingParamsError, match=r"logit_bias token ids must be in \[0, 7\) .*got \[7\]"):
        p.check_vocab(7)
