"""A batched request's engine streams read as one (maverick/serving/batch_streams.py): every output
arrives, a refused prompt is named by its batch index, and closing the merged stream closes every
engine stream (which is what aborts their engine requests)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from maverick.engine.api import RequestOutput
from maverick.engine.errors import RequestError
from maverick.serving.batch_streams import merge_streams


def _stream(rid: str, n: int, closed: list[str], fail: bool = False):
    async def gen():
        try:
            if fail:
                raise RequestError("the prompt is empty")
            for i in range(n):
                await asyncio.sleep(0)
                yield RequestOutput(rid, [i], str(i), finished=i == n - 1)
            await asyncio.sleep(3600)  # a stream that would go on
        finally:
            closed.append(rid)

    return gen()


def test_outputs_arrive_refusals_are_named_and_closing_closes_all():
    async def main():
        closed: list[str] = []
        got = []
        merged = merge_streams([_stream("a", 3, closed), _stream("b", 2, closed)])
        async with contextlib.aclosing(merged):
            async for out in merged:
                got.append((out.request_id, out.token_ids[0]))
                if len(got) == 5:
                    break
        assert sorted(got) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
        assert sorted(closed) == ["a", "b"]  # both still running when the caller left

        closed.clear()
        with pytest.raises(RequestError, match="batch index 1: the prompt is empty"):
            async for _ in merge_streams([_stream("a", 50, closed), _stream("b", 1, closed, fail=True)]):
                pass
        assert sorted(closed) == ["a", "b"]

    asyncio.run(main())
