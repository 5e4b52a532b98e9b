"""The engine in its own process (EngineClient + engine_core): same tokens as in-process, errors per
request, aborts free blocks, a dead child fails every stream, and the child never outlives us."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from conftest import collect

from maverick.engine.api import EngineConfig, Prompt, SamplingParams
from maverick.engine.engine_client import EngineClient
from maverick.engine.errors import EngineDeadError, EngineOverloadedError, RequestError
from maverick.engine.llm_engine import LLMEngine
from maverick.serving.engine_args import EngineArgsError, engine_config
from maverick.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _config(tiny_ckpt, **kwargs) -> EngineConfig:
    settings = {"dtype": "float32", "experts": "dequant", "num_kv_blocks": 128, "cpu_threads": 1}
    return EngineConfig(model_dir=str(tiny_ckpt), **{**settings, **kwargs})


@pytest.fixture(scope="module")
def client(tiny_ckpt):
    engine = EngineClient(_config(tiny_ckpt))
    yield engine
    engine.shutdown()
    assert not engine.healthy()


def _prompts(tiny_ckpt, n: int) -> list[Prompt]:
    tok = Tokenizer.from_dir(tiny_ckpt)
    return [Prompt(tok.encode(f"Prompt {i}: say something about {i * 13}.", add_bos=True)) for i in range(n)]


def _wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_concurrent_streams_equal_the_engine_in_process(client, tiny_ckpt):
    prompts = _prompts(tiny_ckpt, 5)
    local = LLMEngine(_config(tiny_ckpt, cpu_threads=None))
    expected = {f"r{i}": ([], "") for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        local.add_request(f"r{i}", p, GREEDY)
    while local.has_unfinished():
        for out in local.step():
            ids, text = expected[out.request_id]
            expected[out.request_id] = (ids + out.token_ids, text + out.text)

    async def main():
        return await asyncio.gather(*(collect(client, f"r{i}", p, GREEDY) for i, p in enumerate(prompts)))

    for i, (ids, text, last) in enumerate(asyncio.run(main())):
        assert (ids, text) == expected[f"r{i}"]
        assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 10
        assert last.num_prompt_tokens == len(prompts[i].token_ids)
        assert last.arrival_time <= last.first_token_time <= last.token_times[-1] <= time.monotonic()
    assert client.healthy()


def test_a_refused_request_fails_alone_with_the_engines_message(client, tiny_ckpt):
    (prompt,) = _prompts(tiny_ckpt, 1)

    async def main():
        with pytest.raises(RequestError, match="the prompt is empty"):
            await collect(client, "empty", Prompt([]), GREEDY)
        with pytest.raises(RequestError, match="exceed the model's context"):
            await collect(client, "long", prompt, SamplingParams(max_tokens=client.max_model_len))
        with pytest.raises(RequestError, match="already in use"):
            await asyncio.gather(
                collect(client, "same", prompt, GREEDY), collect(client, "same", prompt, GREEDY)
            )
        return await collect(client, "fine", prompt, GREEDY)

    ids, _, last = asyncio.run(main())
    assert len(ids) == 10 and last.finish_reason == "length"


def test_closing_a_stream_early_frees_its_blocks(client, tiny_ckpt):
    (prompt,) = _prompts(tiny_ckpt, 1)

    async def main():
        stream = client.generate("early", prompt, SamplingParams(max_tokens=500, ignore_eos=True))
        async with contextlib.aclosing(stream):
            async for out in stream:
                if out.num_output_tokens >= 2:
                    break

    asyncio.run(main())
    assert _wait_for(lambda: client.stats()["num_running"] == 0 and client.stats()["kv_blocks_used"] == 0)


def test_requests_beyond_the_waiting_limit_are_refused_and_the_rest_served(tiny_ckpt):
    # One runs at a time and one may wait: of three long requests at once, the first always runs
    # and at least one is refused, whatever the order the child reads them in.
    engine = EngineClient(_config(tiny_ckpt, max_num_seqs=1, max_num_waiting=1))
    prompts = _prompts(tiny_ckpt, 3)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    try:

        async def main():
            first = asyncio.ensure_future(collect(engine, "a", prompts[0], params))
            await asyncio.sleep(0)
            rest = [collect(engine, rid, p, params) for rid, p in (("b", prompts[1]), ("c", prompts[2]))]
            return [await first, *await asyncio.gather(*rest, return_exceptions=True)]

        results = asyncio.run(main())
        assert len(results[0][0]) == 40
        refused = [r for r in results[1:] if isinstance(r, EngineOverloadedError)]
        assert refused and all("overloaded" in str(r) for r in refused)
        assert all(isinstance(r, EngineOverloadedError) or len(r[0]) == 40 for r in results[1:])
        assert len(asyncio.run(collect(engine, "after", prompts[0], params))[0]) == 40
    finally:
        engine.shutdown()


def test_a_dead_engine_process_fails_open_and_later_requests(tiny_ckpt):
    engine = EngineClient(_config(tiny_ckpt))
    (prompt,) = _prompts(tiny_ckpt, 1)

    async def main():
        seen = 0
        with pytest.raises(EngineDeadError, match="status -9"):
            async for _ in engine.generate("doomed", prompt, SamplingParams(max_tokens=500, ignore_eos=True)):
                seen += 1
                if seen == 1:
                    os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            await collect(engine, "later", prompt, GREEDY)

    try:
        asyncio.run(main())
        assert not engine.healthy()
    finally:
        engine.shutdown()


def test_the_engine_process_exits_when_its_parent_dies(tiny_ckpt):
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import time
                from maverick.engine.engine_client import EngineClient
                from maverick.engine.api import EngineConfig
                config = EngineConfig(model_dir={str(tiny_ckpt)!r}, dtype="float32", cpu_threads=1)
                engine = EngineClient(config)
                print(engine.pid, flush=True)
                time.sleep(600)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    finally:
        parent.kill()
        parent.wait()

    def gone() -> bool:
        try:
            return child.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    assert _wait_for(gone), "the engine process outlived its parent"


def test_a_failed_start_is_a_clear_error(tmp_path):
    with pytest.raises(
        RuntimeError, match="the engine process did not start: ConfigError: .*missing: not a directory"
    ):
        EngineClient(EngineConfig(model_dir=str(tmp_path / "missing"), dtype="float32"))


def test_cpu_threads_auto_is_half_the_cores_on_the_cpu(tiny_ckpt, tmp_path):
    base = {"model_dir": str(tiny_ckpt), "device": "cpu"}
    assert engine_config({**base, "cpu_threads": "auto"}, tmp_path).cpu_threads == max(1, os.cpu_count() // 2)
    assert engine_config({**base, "cpu_threads": "3"}, tmp_path).cpu_threads == 3
    assert engine_config({**base, "cpu_threads": "none"}, tmp_path).cpu_threads is None
    with pytest.raises(EngineArgsError, match="cpu_threads must be at least 1"):
        engine_config({**base, "cpu_threads": "0"}, tmp_path)


def test_the_engine_process_honours_stream_interval(client, tiny_ckpt):
    (prompt,) = _prompts(tiny_ckpt, 1)
    grouped = EngineClient(_config(tiny_ckpt, stream_interval=3))
    try:

        async def main():
            expected = await collect(client, "every", prompt, GREEDY)
            updates = [out async for out in grouped.generate("grouped", prompt, GREEDY)]
            return expected, updates

        (ids, text, _), updates = asyncio.run(main())
    finally:
        grouped.shutdown()
    counts = [len(u.token_ids) for u in updates]
    assert counts[0] == 1 and all(n >= 3 for n in counts[1:-1]) and sum(counts) == 10, counts
    assert [t for u in updates for t in u.token_ids] == ids and "".join(u.text for u in updates) == text


def test_stats_follow_the_engine_and_the_rate_drops_to_zero_when_idle(client, tiny_ckpt, monkeypatch):
    import maverick.engine.llm_engine as llm_engine

    (prompt,) = _prompts(tiny_ckpt, 1)
    before = client.stats()["generated_tokens_total"]
    asyncio.run(collect(client, "counted", prompt, GREEDY))
    stats = client.stats()
    assert stats["generated_tokens_total"] == before + 10 and stats["generation_tokens_per_s"] > 0
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0
    monkeypatch.setattr(llm_engine, "RATE_WINDOW_S", 0.05)  # no step for a whole window since
    time.sleep(0.1)
    assert client.stats()["generation_tokens_per_s"] == 0.0


def test_guided_requests_compile_off_the_loop_and_join_the_batch(client, tiny_ckpt):
    """Guided requests are compiled on the core's worker and then run beside a plain one, which
    keeps its tokens; a guide that does not compile is the request's error; aborting one while it
    compiles leaves nothing behind."""
    import re

    prompts = _prompts(tiny_ckpt, 3)
    regex = SamplingParams(max_tokens=64, temperature=0.0, guided_decoding=("regex", r"(yes|no)[0-9]{2}!"))

    async def main():
        plain, guided = await asyncio.gather(
            collect(client, "plain", prompts[0], GREEDY), collect(client, "guided", prompts[1], regex)
        )
        with pytest.raises(RequestError, match="not a valid regex"):
            await collect(client, "bad", prompts[2], SamplingParams(guided_decoding=("regex", "(")))
        stream = client.generate("gone", prompts[2], regex)  # aborted before it yields anything
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await task
        await stream.aclose()
        return plain, guided

    plain, guided = asyncio.run(main())
    alone = asyncio.run(collect(client, "alone", prompts[0], GREEDY))
    assert plain[0] == alone[0]
    assert re.fullmatch(r"(yes|no)[0-9]{2}!", guided[1]) and guided[2].finish_reason == "stop"
    assert _wait_for(lambda: client.stats()["num_running"] == 0 and client.stats()["kv_blocks_used"] == 0)
