"""The legacy completions API (`POST /v1/completions`) of openai_api/, through the real OpenAI SDK
against the session's tritonserver: a completion is the ensemble's answer to the same raw
`text_input`, whole or streamed; OpenAI's defaults, shapes and refusals."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from openai_server import MODEL, serve

from client.llm import GrpcClient
from maverick.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

PROMPT = "Once upon a time, in a land far away,"


@pytest.fixture(scope="module")
def api(triton, tiny_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("openai_completions") / "server.log"
    with serve(triton.grpc_url, log, args=("--tokenizer", str(tiny_ckpt))) as url:
        yield url


@pytest.fixture(scope="module")
def oai(api):
    return openai.OpenAI(base_url=f"{api}/v1", api_key="none", max_retries=0, timeout=60)


def _direct(triton, **kwargs):
    with GrpcClient(triton.grpc_url) as c:
        return c.generate(return_num_output_tokens=True, **kwargs)


def test_a_completion_equals_the_ensemble(triton, oai):
    want = _direct(triton, text=PROMPT, max_tokens=12, temperature=0.0)
    got = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.object == "text_completion" and got.id.startswith("cmpl-") and got.model == MODEL
    [choice] = got.choices
    assert choice.index == 0 and choice.text == want.text and choice.logprobs is None
    assert choice.finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == want.num_input_tokens > 0
    assert got.usage.completion_tokens == want.num_output_tokens
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    # a list of one prompt is the same prompt
    listed = oai.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=12, temperature=0)
    assert listed.choices[0].text == want.text


def test_max_tokens_defaults_to_16(oai):
    got = oai.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == 16 and got.choices[0].finish_reason == "length"


def test_the_stream_equals_the_whole_completion(triton, oai):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = oai.completions.create(**kw)
    assert whole.choices[0].finish_reason == "length"
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    *deltas, last, usage = chunks
    assert all(c.choices[0].finish_reason is None and c.choices[0].text for c in deltas)
    assert last.choices[0].finish_reason == "length" and last.choices[0].text == ""
    assert "".join(c.choices[0].text for c in deltas) == whole.choices[0].text
    assert usage.choices == [] and usage.usage.completion_tokens == 10
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    streamed = "".join(c.text for c in _direct_stream(triton, text=PROMPT, max_tokens=10, temperature=0.0,
                                                      ignore_eos=True))  # fmt: skip
    assert streamed == whole.choices[0].text


def _direct_stream(triton, **kwargs):
    with GrpcClient(triton.grpc_url) as c:
        return list(c.stream(**kwargs))


def test_echo_stop_and_seed(oai):
    base = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    text = base.choices[0].text
    echoed = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + text
    assert echoed.usage.completion_tokens == base.usage.completion_tokens
    streamed = oai.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + text
    assert len(text) > 4  # stop on a piece of the greedy answer: it ends just before it
    cut = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=[text[2:4]])
    assert text.startswith(cut.choices[0].text) and cut.choices[0].finish_reason == "stop"
    assert len(cut.choices[0].text) < len(text)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, top_p=0.9, seed=11)
    kw.update(presence_penalty=0.5, frequency_penalty=0.5)
    a, b = (oai.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b  # seeded


def test_n_choices_with_a_seed_are_the_seeds_one_by_one(oai):
    """n=3 with seed s: choice i is the one-choice answer with seed s + i, whole and streamed."""
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
    alone = [oai.completions.create(seed=40 + i, **kw).choices[0].text for i in range(3)]
    assert len(set(alone)) == 3
    whole = oai.completions.create(n=3, best_of=3, seed=40, **kw)
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == alone
    assert whole.usage.completion_tokens == 18
    streamed = ["", "", ""]
    for chunk in oai.completions.create(n=3, seed=40, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == alone


def test_logprobs_are_the_ensembles_in_the_completions_shape(triton, tiny_ckpt, oai):
    """logprobs=2: per token its string, log-prob, its top 2 and itself in top_logprobs, and its
    text offset; the same log-probs as the ensemble's for the same text_input, streamed too."""
    want = _direct_stream(triton, text=PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True,
                          return_log_probs=True, top_log_probs=2)  # fmt: skip
    want_lps = [lp for c in want for lp in c.log_probs]
    want_tops = [row for c in want for row in c.top_log_probs]
    kw = dict(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    got = oai.completions.create(**kw).choices[0]
    lp = got.logprobs
    assert lp.token_logprobs == pytest.approx(want_lps, abs=1e-4) and len(lp.tokens) == 6
    for token, chosen, top, row in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, want_tops, strict=True):
        assert top[token] == chosen  # greedy: the chosen token is also the likeliest of the two
        assert sorted(top.values(), reverse=True) == pytest.approx(row, abs=1e-4) and len(top) == 2
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    # the text is the tokens but the special ones (their names in `tokens`; the answer skips them)
    special = [Tokenizer.from_dir(tiny_ckpt).is_special(t) for c in want for t in c.token_ids]
    assert "".join(t for t, s in zip(lp.tokens, special, strict=True) if not s) == got.text
    streamed = [
        c.choices[0].logprobs for c in oai.completions.create(stream=True, **kw) if c.choices[0].logprobs
    ]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    assert oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].logprobs is None


@pytest.mark.parametrize(
    "extra,param,words",
    [
        ({"prompt": [1, 2, 3]}, "prompt", "token ids"),
        ({"prompt": [[1, 2]]}, "prompt", "token ids"),
        ({"prompt": ["a", "b"]}, "prompt", "several prompts"),
        ({"prompt": 7}, "prompt", "must be a string"),
        ({"suffix": "the end"}, "suffix", "unsupported yet"),
        ({"n": 17}, "n", "from 1 to 16"),
        ({"best_of": 3}, "best_of", "unsupported yet"),
        ({"n": 2, "best_of": 3}, "best_of", "unsupported yet"),
        ({"logprobs": 6}, "logprobs", "from 0 to 5"),
        ({"logprobs": 2, "echo": True}, "logprobs", "unsupported"),
        ({"max_tokens": 0}, "max_tokens", "positive integer"),
        ({"echo": "yes"}, "echo", "boolean"),
        ({"temperature": "hot"}, "temperature", "must be a float"),
    ],
)
def test_bad_input_is_a_400(oai, extra, param, words):
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(**kw)
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
    assert e.value.body["type"] == "invalid_request_error"


def test_the_ensembles_refusals_are_passed_on(api, oai):
    with pytest.raises(openai.BadRequestError) as e:  # INVALID_ARG from the ensemble
        oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, top_p=1.5)
    assert "top_p" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # the same, streamed: before the 200
        list(oai.completions.create(model=MODEL, prompt="  ", max_tokens=4, stream=True))
    assert "text_input is empty" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT, max_tokens=4)
    request = urllib.request.Request(f"{api}/v1/completions", data=b"[", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 400 and set(json.loads(err.value.read())["error"]) == {
        "message", "type", "param", "code",
    }  # fmt: skip
