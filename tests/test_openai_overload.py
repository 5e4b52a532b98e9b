"""openai_api/ when the stack cannot serve: a tritonserver of its own with a tiny admission limit
(one running sequence, one waiting) is overloaded through the OpenAI server, which answers 503 in
OpenAI's shape with Retry-After while the admitted requests go on; then the same Triton is killed,
and a stream in flight ends with an error, /health answers 503, and new requests get 503 at once."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import scrape_metrics, start_triton
from openai_server import MODEL, serve

from server.processes import remove_stale_regions

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "Tell me about cats."}]


@pytest.fixture(scope="module")
def stack(tiny_ckpt, tmp_path_factory):
    """(Triton, the OpenAI server's base URL); the last test kills this Triton."""
    build = tmp_path_factory.mktemp("triton-overload")
    engine = {"max_num_seqs": "1", "max_num_batched_tokens": "64", "max_num_waiting": "1"}
    triton = start_triton(tiny_ckpt, build, engine)
    try:
        with serve(triton.grpc_url, build / "openai.log") as url:
            yield triton, url
    finally:
        triton.stop(timeout=20)
        remove_stale_regions(triton.cfg.http_port)  # a killed server leaves its shared memory


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)


def _waiting(triton) -> float:
    port = triton.cfg.metrics_port
    return sum(v for n, _, v in scrape_metrics(port) if n == "maverick_num_requests_waiting")


def _long_stream(client):
    """A streamed chat of 2000 tokens, its first two chunks read: (the stream, its chunk iterator)."""
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=2000, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = iter(stream)
    next(chunks), next(chunks)
    return stream, chunks


def test_overload_is_503_with_retry_after_and_the_admitted_requests_finish(stack):
    triton, url = stack
    client = _client(url)
    running, chunks = _long_stream(client)  # the one running sequence
    queued: list = []
    waiter = threading.Thread(
        target=lambda: queued.append(
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0)
        ),
        daemon=True,
    )
    waiter.start()  # behind it, in the one waiting slot
    deadline = time.monotonic() + 10
    while _waiting(triton) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _waiting(triton) == 1
    try:
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
        assert time.monotonic() - t0 < 2.0  # refused at once, not queued
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert e.value.body["type"] == "service_unavailable" and "overloaded" in e.value.body["message"]
        assert set(e.value.body) == {"message", "type", "param", "code"}
        with pytest.raises(openai.InternalServerError) as e:  # streamed: refused before the 200
            list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, stream=True))
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert next(chunks).choices[0].delta.content is not None  # the running stream goes on
    finally:
        running.close()  # cancel it: the queued request runs
    waiter.join(30)
    assert not waiter.is_alive() and queued[0].choices[0].finish_reason in ("stop", "length")
    served = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0)
    assert served.usage.completion_tokens >= 1


def test_triton_down_is_503_not_a_hang(stack):
    triton, url = stack
    client = _client(url)
    stream, chunks = _long_stream(client)
    triton.proc.kill()  # SIGKILL: no clean stop, connections just drop
    t0 = time.monotonic()
    with pytest.raises(openai.APIError, match="unavailable"):  # the error event after the 200
        for _ in chunks:
            pass
    assert time.monotonic() - t0 < 10
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{url}/health", timeout=10)
    assert e.value.code == 503
    for stream_flag in (False, True):
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, stream=stream_flag)
            list(r) if stream_flag else None
        assert time.monotonic() - t0 < 5
        assert e.value.status_code == 503 and e.value.body["type"] == "service_unavailable"
        assert e.value.response.headers["retry-after"] == "1"
