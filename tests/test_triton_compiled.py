"""The compiled decode path (decode_path=compiled: torch.compile inside the engine process that the
`maverick` stub starts) behind a real tritonserver: its greedy answers, several requests at once,
streamed and not, equal the session server's on the reference path, and it stops cleanly."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import assert_stopped_cleanly, start_triton

from client.llm import GrpcClient

CHATS = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(6)]


@pytest.fixture(scope="module")
def compiled(tiny_ckpt, tmp_path_factory):
    build = tmp_path_factory.mktemp("triton-compiled")
    server = start_triton(tiny_ckpt, build, {"decode_path": "compiled"})
    assert "compiled the decode step" in (build / "server.log").read_text()  # before it was ready
    yield server
    assert_stopped_cleanly(server, build / "server.log")


def _answers(server, stream: bool) -> list[str]:
    def one(i: int) -> str:
        with GrpcClient(server.grpc_url) as c:
            kw = dict(messages=CHATS[i], max_tokens=24 + 4 * i, temperature=0.0, ignore_eos=True)
            return "".join(ch.text for ch in c.stream(**kw)) if stream else c.generate(**kw).text

    with ThreadPoolExecutor(len(CHATS)) as pool:  # at once: decode batches of several rows
        return list(pool.map(one, range(len(CHATS))))


@pytest.mark.parametrize("stream", [False, True])
def test_compiled_answers_equal_the_reference_paths(triton, compiled, stream):
    assert _answers(compiled, stream) == _answers(triton, stream)
