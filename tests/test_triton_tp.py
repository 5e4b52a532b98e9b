"""The cpu-tp2 profile through a real tritonserver: the `maverick` engine split over two ranks
(gloo), answering byte for byte as the one-rank default (`cpu-tiny`, the `triton` fixture) does,
over gRPC streaming and HTTP; and a rank killed mid-stream."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import assert_stopped_cleanly, scrape_metrics, start_triton
from test_triton import IMAGE_CHAT, TEXT_CHAT

from client.llm import GrpcClient, HttpClient


@pytest.fixture(scope="module")
def tp2(tiny_ckpt, tmp_path_factory):
    build = tmp_path_factory.mktemp("tp2")
    server = start_triton(tiny_ckpt, build, profile="cpu-tp2")
    yield server
    assert server.stop() == 0, f"tritonserver did not exit cleanly; see {build / 'server.log'}"


def _answers(server, request: dict) -> dict[str, tuple]:
    """The same request over each path: (text, token ids) of each."""
    out = {}
    with GrpcClient(server.grpc_url) as grpc:
        chunks = list(grpc.stream(**request))
        out["grpc stream"] = ("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids])
        unary = grpc.generate(stream=False, **request)
        out["grpc"] = (unary.text, unary.token_ids)
    http = HttpClient(server.http_url)
    whole = http.generate(**request)
    out["http"] = (whole.text, whole.token_ids)
    streamed = list(http.stream(**request))
    out["http stream"] = ("".join(c.text for c in streamed), [t for c in streamed for t in c.token_ids])
    return out


@pytest.mark.parametrize("request_kwargs", [TEXT_CHAT, IMAGE_CHAT], ids=["text", "text+image"])
def test_tp2_answers_byte_for_byte_as_one_rank(tp2, triton, request_kwargs):
    one = _answers(triton, request_kwargs)
    two = _answers(tp2, request_kwargs)
    text, ids = one["grpc stream"]
    assert len(ids) == request_kwargs["max_tokens"] and text
    assert two == one
    assert all(v == (text, ids) for v in one.values())


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        # every thread's children: the engine restarted by the stub is a child of its supervisor thread
        kids = [int(c) for t in Path(f"/proc/{p}/task").glob("*") for c in _read(t / "children").split()]
        out += kids
        todo += kids
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _ranks(server) -> list[int]:
    """The tensor-parallel rank processes under this server (spawned by its engine process)."""
    return [p for p in _descendants(server.proc.pid) if b"spawn_main" in _cmdline(p)]


def _engine_metrics(server) -> dict[str, float]:
    return {name: v for name, _, v in scrape_metrics(server.cfg.metrics_port) if name.startswith("maverick_")}


def test_a_killed_rank_fails_its_requests_then_the_engine_serves_again(tiny_ckpt, tmp_path):
    """Its own server (the module's is left intact): rank 1 killed while a stream runs; the stream
    and the next request end with the engine's UNAVAILABLE error within seconds, the server keeps
    answering health checks, the engine (both ranks) is started again and answers as before, and
    a stop leaves no process behind."""
    server = start_triton(tiny_ckpt, tmp_path, profile="cpu-tp2")
    short = dict(text="And now?", max_tokens=4, temperature=0.0)
    try:
        with GrpcClient(server.grpc_url) as grpc:
            before = grpc.generate(**short)
        [rank1] = _ranks(server)
        long = dict(text="Tell me everything.", max_tokens=2000, ignore_eos=True, temperature=0.0)
        with GrpcClient(server.grpc_url) as grpc:
            got, killed_at = 0, None
            with pytest.raises(Exception, match="the engine stopped") as failure:
                for chunk in grpc.stream(**long):
                    got += len(chunk.token_ids)
                    if killed_at is None and got >= 5:
                        os.kill(rank1, signal.SIGKILL)
                        killed_at = time.monotonic()
            assert killed_at is not None and time.monotonic() - killed_at < 10.0, failure.value
            assert "tensor-parallel rank 1" in str(failure.value)
            with pytest.raises(Exception, match="the engine stopped"):
                grpc.generate(**short)
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/live") as r:
            assert r.status == 200  # the server stays up
        time.sleep(0.7)  # the metrics say the engine is down (sampled every 0.5 s; a restart takes seconds)
        down = _engine_metrics(server)
        assert down["maverick_engine_up"] == 0 and down["maverick_num_requests_running"] == 0, down
        # the stub logs when the new engine serves; requests before that get UNAVAILABLE
        log, deadline = server.cfg.build_dir / "server.log", time.monotonic() + 120
        while "the engine serves again" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        with GrpcClient(server.grpc_url) as grpc:
            after = grpc.generate(**short)
        assert after is not None and (after.text, after.token_ids) == (before.text, before.token_ids)
        time.sleep(1.2)
        up = _engine_metrics(server)
        assert up["maverick_engine_up"] == 1 and up["maverick_engine_restarts_total"] == 1, up
        # the new engine's tokens add to the series
        assert up["maverick_generation_tokens_total"] >= down["maverick_generation_tokens_total"] + 4
        assert len(_ranks(server)) == 1 and rank1 not in _ranks(server)
    finally:
        pids = _descendants(server.proc.pid)
        # the failed stream is cancelled as its ensemble request ends: Triton 2.51 may then keep
        # the ensemble registered (docs/failure-modes.md), the one exit it may take besides 0
        assert_stopped_cleanly(server, server.cfg.build_dir / "server.log")
    deadline = time.monotonic() + 15
    while any(_cmdline(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _cmdline(p)]
