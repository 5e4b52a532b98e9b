"""Requests that Triton itself refuses (wrong dtype or shape) on a gRPC stream, on a server of
their own: in Triton 2.51 such a refusal leaves the ensemble unable to unload at shutdown (the
server then exits after its exit timeout), which would hide real leaks from the shared server's
clean-exit check in test_triton.py. The server keeps serving, which is what is checked here."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import start_triton

from client.llm import GrpcClient, HttpClient, ServerError


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    s = start_triton(tiny_ckpt, tmp_path_factory.mktemp("triton-rejections"))
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
