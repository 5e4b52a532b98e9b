"""The engine streams of a batched request (TensorRT-LLM's: several prompts in one Triton request)
read as one: outputs as they come, a refused prompt named by its batch index, and closing the
merged stream closes (aborts) every engine request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from maverick.engine.api import RequestOutput
from maverick.engine.errors import RequestError


async def merge_streams(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[RequestOutput]:
    """The outputs of several engine streams (a batched request's) as they come; closing this closes
    (aborts) them all. One stream is passed through as it is."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):
            async for out in streams[0]:
                yield out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(b, stream):
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    queue.put_nowait((out, None))
            queue.put_nowait((None, None))
        except RequestError as e:  # this prompt is refused: so is the request, naming it
            queue.put_nowait((None, RequestError(f"batch index {b}: {e}")))
        except Exception as e:  # noqa: BLE001 - raised where the outputs are read
            queue.put_nowait((None, e))

    tasks = [asyncio.ensure_future(pump(b, stream)) for b, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            out, error = await queue.get()
            if error is not None:
                raise error
            if out is None:
                running -= 1
            else:
                yield out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
