"""openai_api/ through the real OpenAI SDK, against the real stack (tritonserver on the tiny
checkpoint): its answers equal the ensemble's own, its stream is shaped as OpenAI's, its errors
are OpenAI's, and a client that leaves mid-stream frees the engine."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports, scrape_metrics, wait_ok

from client.llm import GrpcClient

openai = pytest.importorskip("openai")

MODEL = "maverick-tiny"


@contextlib.contextmanager
def _serve(triton_url: str, log: Path, ready: str = "/health"):
    """python -m openai_api on a free port (its base URL), up once `ready` answers 200."""
    (port,) = free_ports(1)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "openai_api", "--triton-url", triton_url, "--port", str(port),
             "--host", "127.0.0.1", "--served-model-name", MODEL, "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        assert wait_ok(f"http://127.0.0.1:{port}{ready}", 30, proc), log.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def api(triton, tmp_path_factory):
    """The OpenAI server as its own process, pointed at the session's Triton: its base URL."""
    with _serve(triton.grpc_url, tmp_path_factory.mktemp("openai_api") / "server.log") as url:
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
    for extra in ({"n": 2}, {"logprobs": True}, {"logit_bias": {"1": 5}}):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, **extra)
        assert "unsupported yet" in e.value.body["message"] and e.value.body["param"] == next(iter(extra))
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
