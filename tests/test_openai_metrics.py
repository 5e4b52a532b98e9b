"""openai_api/'s own `GET /metrics`, scraped after known requests to a fresh server in front of the
session's tritonserver: requests by endpoint and status, latency and time-to-first-token histograms,
and the in-flight gauge during a stream."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from conftest import scrape_metrics
from openai_server import MODEL, serve

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "Tell me about cats."}]
EP_CHAT, EP_COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def api(triton, tmp_path_factory):
    with serve(triton.grpc_url, tmp_path_factory.mktemp("openai_metrics") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def oai(api):
    return openai.OpenAI(base_url=f"{api}/v1", api_key="none", max_retries=0, timeout=60)


def _samples(api: str) -> dict[tuple[str, tuple], float]:
    port = int(api.rsplit(":", 1)[1])
    return {(n, tuple(sorted(labels.items()))): v for n, labels, v in scrape_metrics(port)}


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _histogram(samples, name: str, endpoint: str) -> tuple[list[float], float, float]:
    """(cumulative bucket counts in `le` order, sum, count)."""
    buckets = sorted(
        ((float(dict(lab)["le"]), v) for (n, lab), v in samples.items()
         if n == f"{name}_bucket" and dict(lab)["endpoint"] == endpoint),
    )  # fmt: skip
    return (
        [v for _, v in buckets],
        _value(samples, f"{name}_sum", endpoint=endpoint),
        _value(samples, f"{name}_count", endpoint=endpoint),
    )


def test_requests_latency_and_first_token_are_counted(api, oai):
    oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
    streamed = oai.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed)
    kw = dict(model=MODEL, prompt="Once upon a time,", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in oai.completions.create(**kw))  # text: a first token
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="other", messages=CHAT, max_tokens=4)
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.request.Request(f"{api}{EP_COMPLETIONS}", data=b"{", method="POST"))
    oai.models.list()

    with urllib.request.urlopen(f"{api}/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    s = _samples(api)
    total = "openai_api_requests_total"
    assert _value(s, total, endpoint=EP_CHAT, status="200") == 2
    assert _value(s, total, endpoint=EP_CHAT, status="404") == 1
    assert _value(s, total, endpoint=EP_COMPLETIONS, status="200") == 1
    assert _value(s, total, endpoint=EP_COMPLETIONS, status="400") == 1
    assert _value(s, total, endpoint="/v1/models", status="200") == 1
    assert _value(s, total, endpoint="/metrics", status="200") == 1  # the header check's scrape

    buckets, total_s, count = _histogram(s, "openai_api_request_duration_seconds", EP_CHAT)
    assert count == 3 and buckets[-1] == 3 and buckets == sorted(buckets) and total_s > 0
    # only streamed requests have a first-token time, and it comes before the end
    ttft_buckets, ttft_s, ttft_n = _histogram(s, "openai_api_time_to_first_token_seconds", EP_CHAT)
    assert ttft_n == 1 and ttft_buckets[-1] == 1 and 0 < ttft_s < total_s
    assert _histogram(s, "openai_api_time_to_first_token_seconds", EP_COMPLETIONS)[2] == 1
    assert _value(s, "openai_api_requests_in_flight", endpoint=EP_CHAT) == 0
    assert _value(s, "openai_api_requests_in_flight", endpoint="/metrics") == 1  # this scrape


def test_in_flight_counts_a_running_stream(api, oai):
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert _value(_samples(api), "openai_api_requests_in_flight", endpoint=EP_CHAT) == 1
    # read to the end rather than cancel: a cancelled stream can leave Triton 2.51's ensemble
    # unable to stop cleanly (docs/failure-modes.md), which the session's server checks
    assert list(chunks)[-1].choices[0].finish_reason == "length"
    assert _value(_samples(api), "openai_api_requests_in_flight", endpoint=EP_CHAT) == 0
