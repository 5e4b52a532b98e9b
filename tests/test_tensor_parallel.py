"""Tensor parallel 2 (gloo, two processes) against one rank, on the tiny checkpoint in fp32.

The oracle is the same model on one rank, itself checked against transformers (test_model.py).
Three things are compared: the logits of a paged forward (three sequences side by side, prompts
prefilled in chunks while another decodes, one of them an image chat); the engine's greedy
tokens on the mixed workload of test_engine.py (16 text and 3 image requests arriving over time,
chunked prefill); and what a dead rank does to the engine process and its requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import tp_forward
from test_engine import make_engine, picture, run, workload

from maverick.checkpoint import load_model
from maverick.engine.api import EngineConfig, Prompt, SamplingParams
from maverick.engine.engine_client import EngineClient
from maverick.engine.errors import EngineDeadError
from maverick.engine.llm_engine import LLMEngine
from maverick.layers.parallel import Shard, TensorParallel
from maverick.plan import MAVERICK_FP8
from maverick.prompt import build_chat_prompt
from maverick.tokenizer import Tokenizer

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def forward_inputs(tiny_ckpt, tmp_path_factory) -> Path:
    """The prompts of the paged forward, and the image chat's patch rows from the TP 1 tower."""
    tok = Tokenizer.from_dir(tiny_ckpt)
    rng = random.Random(0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    chat = build_chat_prompt(tok, messages, [picture(500, 300, seed=1)])  # 2x1 tiles + thumbnail
    model = load_model(tiny_ckpt, dtype=torch.float32, experts="dequant")
    rows = model.encode_images(torch.cat([im.pixel_values for im in chat.images]))
    prompts = {
        "a": [tok.bos_id] + [rng.randrange(2000) for _ in range(70)],
        "img": chat.token_ids,
        "c": [tok.bos_id] + [rng.randrange(2000) for _ in range(9)],
    }
    path = tmp_path_factory.mktemp("tp") / "inputs.pt"
    torch.save({"prompts": prompts, "image_rows": rows, "decode": 6}, path)
    return path


def logits_tp2(ckpt, experts: str, inputs: Path, tmp: Path) -> list[torch.Tensor]:
    out = tmp / f"tp2-{experts}.pt"
    args = [str(ckpt), "{rank}", "2", str(tmp / f"store-{experts}"), experts, str(inputs), str(out)]
    procs = [
        subprocess.Popen([sys.executable, str(TESTS / "tp_forward.py"), *[a.format(rank=r) for a in args]])
        for r in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    return torch.load(out)


def logits_tp1(ckpt, experts: str, inputs: Path, tmp: Path) -> list[torch.Tensor]:
    out = tmp / f"tp1-{experts}.pt"
    tp_forward.main(str(ckpt), 0, 1, "", experts, str(inputs), str(out))
    return torch.load(out)


def test_tp2_logits_equal_tp1_to_rounding(tiny_ckpt, forward_inputs, tmp_path):
    """Dequantized experts: every step's logits within 1e-4 (fp32 summation order across the
    all-reduces; measured 2e-5 on logits of magnitude ~22) and the same argmax everywhere."""
    one = logits_tp1(tiny_ckpt, "dequant", forward_inputs, tmp_path)
    two = logits_tp2(tiny_ckpt, "dequant", forward_inputs, tmp_path)
    assert len(one) == len(two) > 20 and sum(x.shape[0] for x in one) > 500
    for x, y in zip(one, two, strict=True):
        assert x.shape == y.shape
        assert (x - y).abs().max().item() < 1e-4
        assert torch.equal(x.argmax(-1), y.argmax(-1))


def test_tp2_fp8_experts_equal_tp1_to_rounding(tiny_ckpt, forward_inputs, tmp_path):
    """FP8 experts (`_scaled_mm`): each rank's partial sum stays fp32 until the all-reduce and the
    down projection's per-token activation scale is the whole row's on every rank, so the logits
    agree to fp32 summation order as above, except where that order moves an activation across an
    e4m3 rounding boundary in a later layer (3 mantissa bits: one such element shifts a row's
    logits by a few hundredths; measured 2 rows of 592, 0.07 and 0.04). The argmax is the same
    everywhere."""
    one = logits_tp1(tiny_ckpt, "fp8", forward_inputs, tmp_path)
    two = logits_tp2(tiny_ckpt, "fp8", forward_inputs, tmp_path)
    assert len(one) == len(two) > 20
    rows = torch.cat([(x - y).abs().amax(-1) for x, y in zip(one, two, strict=True)])  # [rows]
    beyond = int((rows >= 1e-4).sum())
    print(f"fp8 TP 2 vs 1: {beyond} of {rows.numel()} rows beyond 1e-4, max {rows.max():.3f}")
    assert (rows >= 1e-4).float().mean().item() <= 0.01 and rows.max().item() < 0.5
    assert all(torch.equal(x.argmax(-1), y.argmax(-1)) for x, y in zip(one, two, strict=True))


@pytest.mark.parametrize("experts", ["dequant", "fp8"])
def test_tp2_engine_greedy_tokens(tiny_ckpt, experts):
    """The mixed workload with chunked prefill (64-token steps), through two ranks: every token
    equal to one rank's, with dequantized and with FP8 experts."""
    reqs = workload(Tokenizer.from_dir(tiny_ckpt))
    tokens = {}
    for tp in (1, 2):
        engine = make_engine(
            tiny_ckpt, experts=experts, tensor_parallel_size=tp, max_num_batched_tokens=64, cpu_threads=1
        )
        try:
            tokens[tp] = run(engine, reqs)
        finally:
            engine.close()
    assert tokens[2] == tokens[1]


def test_a_dimension_that_does_not_divide_is_named(tiny_ckpt):
    with pytest.raises(ValueError, match=r"^vocab_size \(4048\) does not divide by tensor_parallel_size 3$"):
        load_model(tiny_ckpt, dtype=torch.float32, tp=TensorParallel(0, 3, None))
    with pytest.raises(
        ValueError, match=r"^num_attention_heads \(4\) does not divide by tensor_parallel_size 8$"
    ):
        load_model(tiny_ckpt, dtype=torch.float32, tp=TensorParallel(0, 8, None))
    # 2 KV heads over 4 ranks: one KV head per rank, each shared by the two ranks of its query heads
    assert TensorParallel(3, 4, None).kv_heads(2, 4) == (1, Shard(0, 1, 2))


def _ranks(engine_pid: int) -> list[int]:
    """The engine process's rank processes (multiprocessing also starts a resource tracker)."""
    path = Path(f"/proc/{engine_pid}/task/{engine_pid}/children")
    children = [int(c) for c in path.read_text().split()] if path.exists() else []
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    return state != "Z"


def test_a_dead_rank_fails_the_engine_at_once_and_nothing_is_left(tiny_ckpt):
    """Kill rank 1 while a request streams: that request and every later one end with
    EngineDeadError within seconds (the engine process exits rather than wait on a collective),
    and no process of the engine is left."""
    config = EngineConfig(
        model_dir=str(tiny_ckpt), dtype="float32", experts="dequant", tensor_parallel_size=2, cpu_threads=1
    )
    client = EngineClient(config)
    engine_pid = client.pid
    [rank1] = _ranks(engine_pid)
    params = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)

    async def stream_until_killed():
        got = 0
        with pytest.raises(EngineDeadError):
            async for out in client.generate("long", Prompt([1, 2, 3, 4]), params):
                got += len(out.token_ids)
                if got == 5:
                    os.kill(rank1, signal.SIGKILL)
                    killed_at = time.monotonic()
        return time.monotonic() - killed_at

    async def later():
        async for _ in client.generate("later", Prompt([5, 6]), params):
            pass

    try:
        assert asyncio.run(stream_until_killed()) < 10.0
        with pytest.raises(EngineDeadError):
            asyncio.run(later())
        assert not client.healthy()
    finally:
        client.shutdown()
    deadline = time.monotonic() + 10
    while (_alive(engine_pid) or _alive(rank1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(engine_pid) and not _alive(rank1)


def test_stopping_a_tp_engine_leaves_no_rank_behind(tiny_ckpt):
    config = EngineConfig(
        model_dir=str(tiny_ckpt), dtype="float32", experts="dequant", tensor_parallel_size=2, cpu_threads=1
    )
    client = EngineClient(config)
    engine_pid = client.pid
    ranks = _ranks(engine_pid)
    assert len(ranks) == 1

    async def one():
        return [
            o.token_ids async for o in client.generate("r", Prompt([1, 2, 3]), SamplingParams(max_tokens=4))
        ]

    assert sum(len(t) for t in asyncio.run(one())) == 4
    client.shutdown()
    assert not _alive(engine_pid) and not any(_alive(p) for p in ranks)


def test_an_engine_that_cannot_hold_the_checkpoint_fails_before_loading(tmp_path, monkeypatch):
    """Maverick FP8 asked of one 80 GiB GPU: the planner's arithmetic refuses at start, naming the
    tensor-parallel size that fits (the GPUs are faked: nothing here touches CUDA)."""
    (tmp_path / "config.json").write_text(json.dumps(MAVERICK_FP8))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    props = SimpleNamespace(total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    with pytest.raises(ValueError, match="use tensor_parallel_size 8"):
        LLMEngine(EngineConfig(model_dir=str(tmp_path), device="cuda:0", tensor_parallel_size=1))
    with pytest.raises(ValueError, match="needs 1 × 8 = 8 GPUs .* 4 are visible"):
        LLMEngine(EngineConfig(model_dir=str(tmp_path), device="cuda:4", tensor_parallel_size=8))
