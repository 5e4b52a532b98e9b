"""openai_api/ through the real OpenAI SDK, against the real stack (tritonserver on the tiny
checkpoint): its answers equal the ensemble's own, its stream is shaped as OpenAI's, its errors
are OpenAI's, and a client that leaves mid-stream frees the engine."""

from __future__ import annotations

import base64
import io
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from conftest import free_ports, scrape_metrics
from openai_server import MODEL
from openai_server import serve as _serve

from client.llm import GrpcClient
from maverick.tokenizer import Tokenizer

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def api(triton, tiny_ckpt, tmp_path_factory):
    """The OpenAI server as its own process, pointed at the session's Triton (with its checkpoint's
    tokenizer, for logprobs): its base URL."""
    log = tmp_path_factory.mktemp("openai_api") / "server.log"
    with _serve(triton.grpc_url, log, args=("--tokenizer", str(tiny_ckpt))) as url:
        yield url


@pytest.fixture(scope="module")
def oai(api):
    return openai.OpenAI(base_url=f"{api}/v1", api_key="none", max_retries=0, timeout=60)


def _png_data_url() -> tuple[str, bytes]:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), buf.getvalue()


def _direct(triton, **kwargs):
    with GrpcClient(triton.grpc_url) as c:
        return c.generate(return_num_output_tokens=True, **kwargs)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about cats."}]


def test_models_and_health(api, oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    with urllib.request.urlopen(f"{api}/health") as r:
        assert r.status == 200


def test_chat_equals_the_ensemble(triton, oai):
    want = _direct(triton, messages=CHAT, max_tokens=12, temperature=0.0)
    got = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert got.object == "chat.completion" and got.model == MODEL and len(got.choices) == 1
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert got.usage.completion_tokens == want.num_output_tokens
    assert got.usage.prompt_tokens == want.num_input_tokens > 0
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_stream_equals_the_whole_answer(oai):
    kw = dict(
        model=MODEL, messages=CHAT, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    whole = oai.chat.completions.create(**kw)
    assert whole.choices[0].finish_reason == "length"
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first, *deltas, last, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].finish_reason is None for c in [first, *deltas])
    assert last.choices[0].finish_reason == "length" and not last.choices[0].delta.content
    assert "".join(c.choices[0].delta.content for c in deltas) == whole.choices[0].message.content
    assert usage.choices == [] and usage.usage.completion_tokens == 10
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_the_overhead_benchmarks_minimal_client_reads_the_sdks_chunks(api, oai):
    """loadtest/openai_overhead.py's own HTTP client parses the same stream as the SDK does."""
    import asyncio

    from loadtest.openai_overhead import RawHTTP

    body = dict(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, ignore_eos=True, stream=True)

    async def raw_events():
        raw = RawHTTP(api)
        try:
            # twice on one kept-alive connection: the first answer was read to its end
            first = [e async for e in raw.events("/v1/chat/completions", body)]
            return first, [e async for e in raw.events("/v1/chat/completions", body)]
        finally:
            await raw.close()

    first, again = asyncio.run(raw_events())
    sdk_body = {k: v for k, v in body.items() if k != "ignore_eos"}
    stream = oai.chat.completions.create(**sdk_body, extra_body={"ignore_eos": True})
    sdk = [c.model_dump(exclude_unset=True) for c in stream]

    def answer(events):  # how many responses carry the text depends on timing (flow control)
        choices = [e["choices"][0] for e in events]
        text = "".join(c["delta"].get("content") or "" for c in choices)
        return choices[0]["delta"], text, choices[-1]["finish_reason"], {e["id"] for e in events}

    (role, text, finish, ids), (_, again_text, _, _) = answer(first), answer(again)
    _, sdk_text, _, sdk_ids = answer(sdk)
    assert role == {"role": "assistant", "content": ""} and finish == "length"
    assert text == again_text == sdk_text and len(ids) == len(sdk_ids) == 1


def test_stop_and_sampling_parameters(oai):
    base = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    text = base.choices[0].message.content
    if len(text) > 4:  # stop on a piece of the greedy answer: it ends just before it
        cut = oai.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stop=text[2:4]
        )
        assert text.startswith(cut.choices[0].message.content) and cut.choices[0].finish_reason == "stop"
    kw = dict(model=MODEL, messages=CHAT, max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    kw.update(presence_penalty=0.5, frequency_penalty=0.5)
    a, b = (oai.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b  # seeded


def test_image_chat_equals_the_ensemble(triton, oai):
    url, _ = _png_data_url()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    want = _direct(triton, messages=messages, max_tokens=8, temperature=0.0)
    got = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == want.num_input_tokens > 20  # the image's tokens are in the prompt


def test_refusals_are_openai_errors(api, oai):
    remote = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
        }
    ]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=remote, max_tokens=4)
    assert e.value.status_code == 400 and "remote image URLs" in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == "messages"

    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    refused = [
        ({"n": 17}, "'n' must be an integer from 1 to 16, got 17"),
        ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
        ({"logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be an integer from 0 to 20, got 21"),
        ({"logit_bias": [1, 5]}, "'logit_bias' must be an object mapping token ids to biases"),
    ]
    for extra, message in refused:
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, **extra)
        assert e.value.body["message"] == message and e.value.body["param"] == list(extra)[-1]
    for bias, message in (({"1": 500}, "logit_bias[1] must be a number in [-100, 100], got 500"),
                          ({"x": 1}, "logit_bias keys must be token ids")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:  # the ensemble's
            oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, logit_bias=bias)
        assert message in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # the ensemble's INVALID_ARG, passed on
        oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, top_p=1.5)
    assert "top_p" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):  # the same, streamed: before the 200
        list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, top_p=1.5, stream=True))
    try:  # the raw shape
        urllib.request.urlopen(urllib.request.Request(f"{api}/v1/chat/completions", data=b"{", method="POST"))
        raise AssertionError("accepted bad JSON")
    except urllib.error.HTTPError as err:
        assert err.code == 400
        assert set(json.loads(err.read())["error"]) == {"message", "type", "param", "code"}


def _metric(triton, name: str) -> float:
    """Summed over its labels (each model instance publishes its own series)."""
    return sum(v for n, _, v in scrape_metrics(triton.cfg.metrics_port) if n == name)


def _running(triton) -> float:
    return _metric(triton, "maverick_num_requests_running")


def test_a_client_that_leaves_mid_stream_frees_the_engine(triton, oai):
    deadline = time.monotonic() + 5
    while _running(triton) and time.monotonic() < deadline:
        time.sleep(0.1)
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=3000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    deadline = time.monotonic() + 3
    while (busy := _running(triton)) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert busy == 1
    generated = _metric(triton, "maverick_generation_tokens_total")
    stream.close()  # closes the HTTP connection
    deadline = time.monotonic() + 5
    while (n := _running(triton)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert n == 0
    assert _metric(triton, "maverick_kv_cache_blocks_used") == 0
    assert _metric(triton, "maverick_generation_tokens_total") < generated + 600  # stopped, not finished


def test_triton_down_is_503(tmp_path):
    (dead,) = free_ports(1)
    with _serve(f"127.0.0.1:{dead}", tmp_path / "server.log", ready="/v1/models") as url:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/health")
        assert e.value.code == 503
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
        assert e.value.status_code == 503 and e.value.body["type"] == "service_unavailable"
        with pytest.raises(openai.BadRequestError) as e:  # started without --tokenizer: refused first
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, logprobs=True)
        assert "--tokenizer" in e.value.body["message"] and e.value.body["param"] == "logprobs"


def test_logprobs_are_the_ensembles(triton, tiny_ckpt, oai):
    """logprobs.content: one entry per token, its log-prob and top_logprobs the ensemble's own,
    its bytes the answer's bytes; streamed chunks carry the same entries in order."""
    want = _direct(
        triton, messages=CHAT, max_tokens=8, temperature=0.0, return_log_probs=True, top_log_probs=3
    )
    kw = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    got = oai.chat.completions.create(**kw)
    content = got.choices[0].logprobs.content
    # approx: a prompt computed once and then served from the prefix cache sums in another order
    assert [e.logprob for e in content] == pytest.approx(want.log_probs, abs=1e-4) and len(content) == 8
    tops = [t.logprob for e in content for t in e.top_logprobs]
    assert tops == pytest.approx([lp for row in want.top_log_probs for lp in row], abs=1e-4)
    assert [len(e.top_logprobs) for e in content] == [3] * 8
    # the answer's text is its tokens' bytes, decoded run by run between special tokens (whose
    # entries carry their names: the tiny model's gibberish has some), as the engine decodes
    tok = Tokenizer.from_dir(tiny_ckpt)
    specials = [tok.is_special(t) for t in want.token_ids]
    runs = itertools.groupby(zip(content, specials, strict=True), key=lambda pair: pair[1])
    text = "".join(
        b"".join(bytes(e.bytes) for e, _ in run).decode(errors="replace")
        for special, run in runs
        if not special
    )
    assert text == got.choices[0].message.content == want.text
    names = [tok.decode([t]) for t, special in zip(want.token_ids, specials, strict=True) if special]
    assert [e.token for e, special in zip(content, specials, strict=True) if special] == names
    for e in content:  # greedy: the chosen token is the likeliest
        assert (e.top_logprobs[0].token, e.top_logprobs[0].bytes, e.top_logprobs[0].logprob) == (
            e.token,
            e.bytes,
            e.logprob,
        )
        assert e.token == bytes(e.bytes).decode(errors="replace")
    chunks = list(oai.chat.completions.create(stream=True, **kw))
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in streamed] == [
        (e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in content
    ]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    plain = oai.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True
    )
    assert [e.top_logprobs for e in plain.choices[0].logprobs.content] == [[]] * 8
    assert oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices[0].logprobs is None


def test_logit_bias_reaches_the_engine(triton, oai):
    first = _direct(
        triton, messages=CHAT, max_tokens=1, temperature=0.0, return_log_probs=True, top_log_probs=5
    )
    forced = first.top_log_prob_ids[0][4]  # the 5th likeliest first token, made the argmax
    want = _direct(triton, messages=CHAT, max_tokens=4, temperature=0.0, logit_bias={forced: 100})
    assert want.token_ids == [forced] * 4
    got = oai.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logit_bias={str(forced): 100}
    )
    assert got.choices[0].message.content == want.text


N3 = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=5, extra_body={"ignore_eos": True})


def _busy(api: str, stop: threading.Event) -> threading.Thread:
    """Other requests, one after another, until `stop`."""

    def run():
        client = openai.OpenAI(base_url=f"{api}/v1", api_key="none", max_retries=0, timeout=60)
        while not stop.is_set():
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Go on."}], max_tokens=12, temperature=1.0
            )

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_n_choices_with_a_seed_are_reproducible_alone_or_while_others_run(api, oai):
    """Choice i of n=3 with seed s is the n=1 answer with seed s + i; usage counts the prompt once and
    every choice's tokens; streamed, each choice has its own chunks and finish_reason."""
    alone = [oai.chat.completions.create(**{**N3, "seed": 5 + i}) for i in range(3)]
    want = [a.choices[0].message.content for a in alone]
    assert len(set(want)) == 3
    got = oai.chat.completions.create(n=3, **N3)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.message.content for c in got.choices] == want
    assert all(c.finish_reason == "length" for c in got.choices)
    assert got.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert got.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone) == 24

    stop = threading.Event()
    others = [_busy(api, stop) for _ in range(3)]
    try:
        busy = oai.chat.completions.create(n=3, **N3)
        chunks = list(
            oai.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **N3)
        )
    finally:
        stop.set()
        for t in others:
            t.join()
    assert [c.message.content for c in busy.choices] == want
    *choice_chunks, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens == 24
    for i in range(3):
        mine = [c.choices[0] for c in choice_chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == want[i]
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + ["length"]


def test_usage_counts_the_prompt_tokens_served_from_the_prefix_cache(triton, oai):
    """The same chat twice: the first finds nothing cached (its first block is unique), the second
    every full block of its prompt but the last token's, which the engine's own counter confirms."""
    chat = [{"role": "user", "content": f"{uuid.uuid4().hex} " + "Tell me about cats and dogs. " * 8}]
    hits = "maverick_prefix_cache_hit_tokens_total"
    before = None
    while before != (now := _metric(triton, hits)):  # settled: the metrics are sampled every 0.5 s
        before = now
        time.sleep(0.6)
    first, again = (
        oai.chat.completions.create(model=MODEL, messages=chat, max_tokens=1, temperature=0) for _ in range(2)
    )
    prompt = again.usage.prompt_tokens
    assert first.usage.prompt_tokens == prompt > 32
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (prompt - 1) // 16 * 16  # block_size 16; at least one token is computed
    deadline = time.monotonic() + 3  # the metrics are sampled every 0.5 s
    while _metric(triton, hits) < before + cached and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(triton, hits) == before + cached
