"""One OpenAI request as one gRPC `ModelStreamInfer` stream to the Triton `ensemble`.

Triton's empty final response is enabled, so the answer ends on `triton_final_response`.
Cancelling the gRPC call (a client that leaves) cancels the request in Triton, which frees its KV
cache.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from client.llm import OUTPUTS, Chunk, chunk_from, grpc_inputs
from openai_api.errors import rpc_error, triton_error

ENSEMBLE = "ensemble"


async def triton_stream(client, fields: dict[str, Any], stream: bool) -> AsyncIterator[Chunk]:
    """One request on its own gRPC stream; yields a Chunk per response. Leaving the iterator before
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
                yield chunk_from({n: result.as_numpy(n) for n in OUTPUTS}, time.monotonic())
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
