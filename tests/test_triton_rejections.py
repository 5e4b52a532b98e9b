"""Refusals on a server of its own, with a tiny engine (one running sequence, one waiting):
overload, and requests that Triton itself refuses (wrong dtype or shape) on a gRPC stream. In
Triton 2.51 the latter leave the ensemble unable to unload at shutdown (the server then exits
after its exit timeout), which would hide real leaks from the shared server's clean-exit check in
test_triton.py. The server keeps serving, which is what is checked here."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import start_triton

from client.llm import GrpcClient, HttpClient, ServerError


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    engine = {"max_num_seqs": "1", "max_num_batched_tokens": "64", "max_num_waiting": "1"}
    s = start_triton(tiny_ckpt, tmp_path_factory.mktemp("triton-rejections"), engine)
    yield s
    s.stop(timeout=20)


def _input(name: str, arr: np.ndarray, dtype: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(arr.shape), dtype)
    inp.set_data_from_numpy(arr)
    return inp


@pytest.mark.parametrize(
    "inputs,pattern",
    [
        (
            [("text_input", [[b"hi"]], "BYTES"), ("max_tokens", np.array([[4.0]], np.float32), "FP32")],
            "data-type",
        ),
        ([("text_input", [[b"a", b"b"]], "BYTES")], "unexpected shape"),
    ],
    ids=["wrong dtype", "wrong shape"],
)
def test_refused_by_triton_and_still_serving(server, inputs, pattern):
    tensors = [
        _input(n, a if isinstance(a, np.ndarray) else np.array(a, dtype=object), d) for n, a, d in inputs
    ]
    with GrpcClient(server.grpc_url) as c, pytest.raises(ServerError, match=pattern):
        list(c.stream_inputs(tensors))
    assert HttpClient(server.http_url).generate(text="still serving?", max_tokens=2).num_output_tokens == 2


def test_overload_is_refused_fast(server):
    running = GrpcClient(server.grpc_url).stream(text="a long one", max_tokens=2000, ignore_eos=True)
    next(running)  # the one running sequence
    queued = threading.Thread(
        target=lambda: HttpClient(server.http_url).generate(text="queued", max_tokens=2), daemon=True
    )
    queued.start()  # waits behind it: the one waiting slot
    time.sleep(1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(ServerError) as info:
            HttpClient(server.http_url).generate(text="one more", max_tokens=2)
        # the engine answers UNAVAILABLE; Triton 2.51's ensemble passes the message on as a 400
        assert info.value.status in (400, 503) and "overloaded" in info.value.message
        assert time.monotonic() - t0 < 2.0
    finally:
        running.close()  # cancel: the queued request runs, then the server is idle again
    queued.join(timeout=20)
    assert not queued.is_alive()
    assert HttpClient(server.http_url).generate(text="served", max_tokens=2).num_output_tokens == 2
