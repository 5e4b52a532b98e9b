"""One OpenAI request as one gRPC `ModelStreamInfer` stream to the Triton `ensemble`.

Triton's empty final response is enabled, so the answer ends on `triton_final_response`.
Cancelling the gRPC call (a client that leaves) cancels the request in Triton, which frees its KV
cache.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from client.llm import grpc_inputs
from openai_api.errors import rpc_error, triton_error

ENSEMBLE = "ensemble"


@dataclass
class Delta:
    text: str
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0  # of num_input_tokens, from the prefix cache
    index: int = 0  # the choice (sequence_index), with n > 1
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] | None = None  # with return_log_probs: one per token
    top_log_prob_ids: list[list[int]] | None = None  # with top_log_probs = K: [tokens][K]
    top_log_probs: list[list[float]] | None = None


def _first(result, name: str, default):
    arr = result.as_numpy(name)
    if arr is None:
        return default
    flat = np.asarray(arr, dtype=object).reshape(-1)
    return flat[0] if flat.size else default


async def triton_stream(client, fields: dict[str, Any], stream: bool) -> AsyncIterator[Delta]:
    """One request on its own gRPC stream; yields a Delta per response. Leaving the iterator before
    the final response (a disconnect, cancellation) cancels the call, and so the Triton request."""
    from tritonclient.grpc._utils import _get_inference_request
    from tritonclient.grpc.aio import InferResult

    request = _get_inference_request(
        model_name=ENSEMBLE, inputs=grpc_inputs({**fields, "stream": stream}), model_version="",
        request_id=uuid.uuid4().hex, outputs=None, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, parameters=None,
    )  # fmt: skip
    # tritonclient's aio stream_infer cannot ask for the empty final response: build the request here
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    done = asyncio.Event()

    async def requests():
        yield request
        await done.wait()  # keep the stream open until the final response

    # the shared aio client's stub (tritonclient.grpc.aio has no public way to set the flag above)
    call = client._client_stub.ModelStreamInfer(requests(), metadata=client._get_metadata(None))
    try:
        async for response in call:
            if response.error_message:
                raise triton_error(response.error_message)
            params = response.infer_response.parameters
            final = "triton_final_response" in params and params["triton_final_response"].bool_param
            if response.infer_response.outputs:
                result = InferResult(response.infer_response)
                text = _first(result, "text_output", b"")
                finish = _first(result, "finish_reason", b"")
                ids = result.as_numpy("output_token_ids")
                lps, top = result.as_numpy("output_log_probs"), result.as_numpy("output_top_log_probs")
                top_ids = result.as_numpy("output_top_log_prob_ids")
                yield Delta(
                    text=text.decode() if isinstance(text, bytes) else str(text),
                    finish_reason=(finish.decode() if isinstance(finish, bytes) else str(finish)) or None,
                    num_input_tokens=int(_first(result, "num_input_tokens", 0)),
                    num_output_tokens=int(_first(result, "num_output_tokens", 0)),
                    num_cached_tokens=int(_first(result, "num_cached_tokens", 0)),
                    index=int(_first(result, "sequence_index", 0)),
                    token_ids=[] if ids is None else ids.reshape(-1).tolist(),
                    log_probs=None if lps is None else lps.reshape(-1).tolist(),
                    # [1, tokens, K] -> a row per token
                    top_log_probs=None if top is None else top[0].tolist(),
                    top_log_prob_ids=None if top_ids is None else top_ids[0].tolist(),
                )
            if final:
                # our side closes the stream; the loop ends once Triton closes its own. Cancelling
                # the call here instead raced Triton's teardown of the ensemble request and now and
                # then left the ensemble unable to unload (the server then misses its exit timeout)
                done.set()
    except grpc.aio.AioRpcError as e:
        raise rpc_error(e) from None
    finally:
        done.set()
        if not call.done():
            call.cancel()
