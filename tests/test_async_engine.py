"""The engine thread and its asyncio API: concurrent streams, early exit aborts, clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time

import pytest
from conftest import collect

from maverick.engine.api import EngineConfig, Prompt, SamplingParams
from maverick.engine.async_engine import AsyncEngine
from maverick.engine.errors import RequestError
from maverick.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    eng = AsyncEngine(
        EngineConfig(model_dir=str(tiny_ckpt), dtype="float32", experts="dequant", num_kv_blocks=128)
    )
    yield eng
    eng.shutdown()
    assert not eng.healthy()


def _prompt(tok: Tokenizer, i: int) -> Prompt:
    return Prompt(
        tok.encode(f"Request number {i}: tell me something about the number {i * 7}.", add_bos=True)
    )


def test_concurrent_streams_equal_sequential(engine, tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def main():
        sequential = [await collect(engine, f"s{i}", _prompt(tok, i), params) for i in range(6)]
        together = await asyncio.gather(
            *(collect(engine, f"c{i}", _prompt(tok, i), params) for i in range(6))
        )
        return sequential, together

    sequential, together = asyncio.run(main())
    for (ids_a, text_a, _), (ids_b, text_b, last_b) in zip(sequential, together, strict=True):
        assert ids_a == ids_b and text_a == text_b
        assert last_b.finished and last_b.finish_reason == "length" and last_b.num_output_tokens == 12
        assert text_b == tok.decode(ids_b, skip_special_tokens=True)
        assert last_b.first_token_time is not None and last_b.first_token_time >= last_b.arrival_time


def test_a_slow_consumer_gets_the_queued_updates_merged(engine, tiny_ckpt):
    """A caller that blocks its loop while the engine steps on receives fewer updates, each with
    every token, text piece, log-prob and time that queued meanwhile, in order."""
    tok = Tokenizer.from_dir(tiny_ckpt)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True)

    async def main():
        fast = await collect(engine, "fast", _prompt(tok, 3), params)
        updates = []
        async for out in engine.generate("slow", _prompt(tok, 3), params):
            updates.append(out)
            time.sleep(0.05)  # blocks the event loop: the engine thread keeps stepping
        return fast, updates

    (ids, text, _), updates = asyncio.run(main())
    assert [t for u in updates for t in u.token_ids] == ids
    assert "".join(u.text for u in updates) == text
    assert len(updates) < len(ids) and max(len(u.token_ids) for u in updates) > 1
    for u in updates:
        assert len(u.logprobs) == len(u.token_ids) == len(u.token_times)
    assert [u.num_output_tokens for u in updates] == list(
        itertools.accumulate(len(u.token_ids) for u in updates)
    )
    assert updates[-1].finished and not any(u.finished for u in updates[:-1])
    assert updates[-1].first_token_time == updates[0].token_times[0]


def test_leaving_the_stream_aborts_and_frees_blocks(engine, tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)

    async def main():
        n = 0
        stream = engine.generate("leaver", _prompt(tok, 1), SamplingParams(max_tokens=500, ignore_eos=True))
        async with contextlib.aclosing(stream):
            async for _ in stream:
                n += 1
                if n == 3:
                    break
        for _ in range(200):  # the event loop is still running: the abort must free blocks by itself
            s = engine.stats()
            if s["num_running"] == 0 and s["kv_blocks_used"] == 0:
                return n, s
            await asyncio.sleep(0.01)
        return n, engine.stats()

    n, stats = asyncio.run(main())
    assert n == 3 and stats["num_running"] == 0 and stats["kv_blocks_used"] == 0


def test_a_closed_caller_loop_does_not_kill_the_engine(engine, tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)

    async def main():
        async for _ in engine.generate(
            "orphan", _prompt(tok, 4), SamplingParams(max_tokens=300, ignore_eos=True)
        ):
            return  # no aclose: the generator is finalised only when the loop shuts down

    asyncio.run(main())
    time.sleep(0.3)
    assert engine.healthy()
    deadline = time.monotonic() + 2.0
    while engine.stats()["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["kv_blocks_used"] == 0


def test_cancelled_task_aborts(engine, tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)

    async def main():
        task = asyncio.create_task(
            collect(engine, "cancel-me", _prompt(tok, 2), SamplingParams(max_tokens=800))
        )
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    deadline = time.monotonic() + 2.0
    while engine.stats()["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["kv_blocks_used"] == 0


def test_bad_request_raises_at_once_and_engine_keeps_serving(engine, tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)

    async def main():
        with pytest.raises(RequestError, match="empty"):
            await collect(engine, "bad", Prompt([]), SamplingParams())
        return await collect(engine, "good", _prompt(tok, 3), SamplingParams(max_tokens=3, ignore_eos=True))

    ids, _, last = asyncio.run(main())
    assert len(ids) == 3 and last.finished
    assert engine.healthy()
    stats = engine.stats()
    assert stats["generated_tokens_total"] > 0 and "generation_tokens_per_s" in stats


def test_overload_is_refused_fast(tiny_ckpt):
    """Past max_num_waiting queued requests a new one is refused at once (UNAVAILABLE upstream)."""
    from maverick.engine.errors import EngineOverloadedError

    eng = AsyncEngine(
        EngineConfig(
            model_dir=str(tiny_ckpt),
            dtype="float32",
            experts="dequant",
            num_kv_blocks=64,
            max_num_seqs=1,
            max_num_batched_tokens=16,
            max_num_waiting=1,
        )
    )
    tok = Tokenizer.from_dir(tiny_ckpt)
    params = SamplingParams(max_tokens=300, ignore_eos=True)

    async def main():
        running = eng.generate("running", _prompt(tok, 0), params)
        await running.__anext__()  # admitted and generating: the only running slot
        waiting = eng.generate("waiting", _prompt(tok, 1), params)
        first = asyncio.ensure_future(waiting.__anext__())
        for _ in range(200):
            if eng.stats()["num_waiting"] == 1:
                break
            await asyncio.sleep(0.01)
        assert eng.stats()["num_waiting"] == 1
        with pytest.raises(EngineOverloadedError, match="overloaded"):
            await eng.generate("refused", _prompt(tok, 2), params).__anext__()
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await running.aclose()
        await waiting.aclose()

    try:
        asyncio.run(main())
        assert eng.healthy()
    finally:
        eng.shutdown()


def test_stream_interval_sends_the_first_token_alone_then_groups_of_n(engine, tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)
    grouped = AsyncEngine(
        EngineConfig(
            model_dir=str(tiny_ckpt), dtype="float32", experts="dequant", num_kv_blocks=64, stream_interval=4
        )
    )

    async def main():
        one_by_one = await collect(engine, "every", _prompt(tok, 5), params)
        updates = [out async for out in grouped.generate("grouped", _prompt(tok, 5), params)]
        return one_by_one, updates

    try:
        (ids, text, _), updates = asyncio.run(main())
    finally:
        grouped.shutdown()
    counts = [len(u.token_ids) for u in updates]
    assert counts[0] == 1 and all(n >= 4 for n in counts[1:-1]) and sum(counts) == 10, counts
    assert len(updates) <= 4  # 1, 4, 4, 1 (fewer if the caller fell behind and they merged)
    assert [t for u in updates for t in u.token_ids] == ids and "".join(u.text for u in updates) == text
    assert all(len(u.logprobs) == len(u.token_ids) == len(u.token_times) for u in updates)
    assert updates[-1].finished and updates[-1].finish_reason == "length"


def test_an_abort_releases_the_tokens_a_stream_interval_held(tiny_ckpt):
    from maverick.engine.api import RequestOutput
    from maverick.engine.stream_policy import Coalescer

    c = Coalescer(3)

    def out(rid, ids, total, finished=False):
        return RequestOutput(rid, ids, "".join(f"<{i}>" for i in ids), finished, num_output_tokens=total)

    assert [o.token_ids for o in c.push([out("a", [1], 1), out("b", [7], 1)])] == [[1], [7]]
    assert c.push([out("a", [2], 2), out("b", [8], 2)]) == []
    assert [(o.request_id, o.token_ids) for o in c.push([out("a", [3], 3), out("b", [9], 3)])] == []
    assert [(o.request_id, o.token_ids, o.text) for o in c.push([out("a", [4], 4)])] == [
        ("a", [2, 3, 4], "<2><3><4>")
    ]
    [aborted] = c.push([out("b", [], 3, finished=True)])  # the abort's final update carries the held ones
    assert aborted.token_ids == [8, 9] and aborted.finished and aborted.num_output_tokens == 3
    assert c._held == {}


def test_a_request_with_three_choices_streams_each_and_ends_after_the_last(engine, tiny_ckpt):
    """Choice i is the n = 1 request with seed + i; a slow consumer gets each choice's queued
    updates merged (never two choices in one update); the stream ends with the last choice."""
    tok = Tokenizer.from_dir(tiny_ckpt)
    params = SamplingParams(n=3, seed=9, max_tokens=16, temperature=1.0, ignore_eos=True, logprobs=True)

    async def main():
        alone = [
            await collect(engine, f"one{i}", _prompt(tok, 5), dataclasses.replace(params, n=1, seed=9 + i))
            for i in range(3)
        ]
        updates = []
        async for out in engine.generate("three", _prompt(tok, 5), params):
            updates.append(out)
            time.sleep(0.05)  # blocks the event loop: updates queue, and leave merged per choice
        return alone, updates

    alone, updates = asyncio.run(main())
    assert {u.index for u in updates} == {0, 1, 2}
    for i, (ids, text, last) in enumerate(alone):
        mine = [u for u in updates if u.index == i]
        assert [t for u in mine for t in u.token_ids] == ids and "".join(u.text for u in mine) == text
        assert all(len(u.logprobs) == len(u.token_ids) for u in mine)
        assert mine[-1].finished and not any(u.finished for u in mine[:-1])
        assert mine[-1].cumulative_logprob == pytest.approx(last.cumulative_logprob, abs=1e-4)
    assert updates[-1].finished and len(updates) < 48  # some merged


def test_leaving_a_stream_of_several_choices_aborts_them_all(engine, tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)
    params = SamplingParams(n=4, max_tokens=500, ignore_eos=True)

    async def main():
        seen = set()
        stream = engine.generate("leaver-n", _prompt(tok, 2), params)
        async with contextlib.aclosing(stream):
            async for out in stream:
                seen.add(out.index)
                if len(seen) == 4:
                    break
        for _ in range(200):
            s = engine.stats()
            if s["num_running"] == 0 and s["kv_blocks_used"] == 0:
                return seen, s
            await asyncio.sleep(0.01)
        return seen, engine.stats()

    seen, stats = asyncio.run(main())
    assert seen == {0, 1, 2, 3} and stats["num_running"] == 0 and stats["kv_blocks_used"] == 0
