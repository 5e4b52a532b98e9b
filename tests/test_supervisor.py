"""The `maverick` model's engine comes back after its process dies (maverick/serving/supervisor.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from maverick.engine.api import EngineConfig, Prompt, SamplingParams
from maverick.engine.engine_client import EngineClient
from maverick.engine.errors import EngineDeadError
from maverick.serving.supervisor import SupervisedEngine

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


async def _tokens(engine, request_id: str) -> list[int]:
    return [
        t async for out in engine.generate(request_id, Prompt([1, 2, 3, 4]), GREEDY) for t in out.token_ids
    ]


def test_a_killed_engine_fails_its_requests_then_serves_again(tiny_ckpt):
    config = EngineConfig(model_dir=str(tiny_ckpt), dtype="float32", experts="dequant", cpu_threads=1)
    engine = SupervisedEngine(lambda: EngineClient(config))
    try:
        before = asyncio.run(_tokens(engine, "before"))
        first_pid = engine._engine.pid
        os.kill(first_pid, signal.SIGKILL)
        engine._engine.wait_stopped(10)
        with pytest.raises(EngineDeadError):  # while the new engine loads: UNAVAILABLE, at once
            asyncio.run(_tokens(engine, "during"))
        deadline = time.monotonic() + 60
        while engine.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert engine.restarts == 1 and engine._engine.pid != first_pid and engine.healthy()
        assert asyncio.run(_tokens(engine, "after")) == before
    finally:
        engine.shutdown()
    assert not engine.healthy()
