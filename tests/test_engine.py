"""The engine, fp32 on the CPU: a mixed workload under a small KV cache (preemption) and a small
token budget (chunked prefill) gives every request exactly the tokens it gets alone and the
tokens transformers' greedy generation gives; seeded sampling is batch-independent; prefix-cache
hits change nothing; every block comes back after completion, abort and failure."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from maverick.engine.api import EngineConfig, Prompt, SamplingParams
from maverick.engine.errors import RequestError
from maverick.engine.llm_engine import LLMEngine
from maverick.prompt import build_chat_prompt
from maverick.tokenizer import Tokenizer

BASE_VOCAB = 2000


def make_engine(ckpt, **kw) -> LLMEngine:
    cfg = dict(
        dtype="float32", experts="dequant", block_size=16, num_kv_blocks=256, max_num_batched_tokens=512
    )
    cfg.update(kw)
    return LLMEngine(EngineConfig(model_dir=str(ckpt), **cfg))


def picture(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def workload(tok: Tokenizer) -> list[tuple[str, Prompt, SamplingParams, int]]:
    """(request id, prompt, params, arrival step): 16 text prompts and 3 with images."""
    rng = random.Random(0)
    reqs = []
    for i in range(16):
        n = rng.choice([3, 17, 40, 70, 100, 140])
        ids = [tok.bos_id] + [rng.randrange(BASE_VOCAB) for _ in range(n)]
        params = SamplingParams(max_tokens=rng.choice([1, 5, 12, 20]), temperature=0.0, ignore_eos=True)
        reqs.append((f"text-{i}", Prompt(ids), params, rng.choice([0, 0, 1, 2, 4, 7])))
    for i, size in enumerate([(90, 120), (500, 300), (200, 210)]):  # 1 tile, 2x1 + thumbnail, 1 tile
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Describe {i}."}]}
        ]
        prompt = build_chat_prompt(tok, messages, [picture(*size, seed=i)])
        params = SamplingParams(max_tokens=10 + i, temperature=0.0, ignore_eos=True)
        reqs.append((f"image-{i}", prompt, params, i * 3))
    return reqs


def run(engine: LLMEngine, reqs) -> dict[str, list[int]]:
    pending = sorted(reqs, key=lambda r: r[3])
    tokens: dict[str, list[int]] = {rid: [] for rid, *_ in reqs}
    finished = set()
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][3] <= step:
            rid, prompt, params, _ = pending.pop(0)
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                assert out.finish_reason == "length", out
                finished.add(out.request_id)
        step += 1
        assert step < 10_000
    assert finished == set(tokens)
    return tokens


@pytest.fixture(scope="module")
def tok(tiny_ckpt) -> Tokenizer:
    return Tokenizer.from_dir(tiny_ckpt)


@pytest.fixture(scope="module")
def reqs(tok):
    return workload(tok)


@pytest.fixture(scope="module")
def alone(tiny_ckpt, reqs) -> dict[str, list[int]]:
    """Each request by itself, in an engine with room to spare."""
    out = {}
    for r in reqs:
        out.update(run(make_engine(tiny_ckpt, enable_prefix_caching=False), [(*r[:3], 0)]))
    return out


def test_mixed_workload_equals_alone_and_transformers(tiny_ckpt, reqs, alone, reference):
    engine = make_engine(tiny_ckpt, num_kv_blocks=40, max_num_batched_tokens=48, max_num_seqs=8)
    got = run(engine, reqs)
    stats = engine.stats()
    assert stats["num_preemptions"] > 0, "the workload was meant to force preemption"
    assert stats["kv_blocks_free"] == 40 and stats["num_running"] == stats["num_waiting"] == 0
    engine.block_manager.check_invariants([])
    for rid, prompt, params, _ in reqs:
        assert got[rid] == alone[rid], rid
        assert len(got[rid]) == params.max_tokens
        ids = torch.tensor([prompt.token_ids])
        pixels = torch.cat([im.pixel_values for im in prompt.images]) if prompt.images else None
        with torch.no_grad():
            ref = reference.generate(
                input_ids=ids,
                pixel_values=pixels,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=params.max_tokens,
                min_new_tokens=params.max_tokens,
                pad_token_id=0,
            )
        assert got[rid] == ref[0, ids.shape[1] :].tolist(), rid


def test_seeded_sampling_is_batch_independent(tiny_ckpt, reqs):
    sampled = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    rid, prompt = reqs[5][0], reqs[5][1]
    solo = run(make_engine(tiny_ckpt), [(rid, prompt, sampled, 0)])[rid]
    noise = [
        (r[0], r[1], SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True), r[3]) for r in reqs[:10]
    ]
    noise = [r for r in noise if r[0] != rid]
    busy = run(make_engine(tiny_ckpt, max_num_batched_tokens=64), [*noise, (rid, prompt, sampled, 2)])[rid]
    assert solo == busy
    other_seed = SamplingParams(
        max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True
    )
    assert run(make_engine(tiny_ckpt), [(rid, prompt, other_seed, 0)])[rid] != solo


def test_prefix_cache_hits_give_the_same_tokens(tiny_ckpt, tok, alone, reqs):
    engine = make_engine(tiny_ckpt)
    rid, prompt, params, _ = next(r for r in reqs if len(r[1].token_ids) > 100)
    first = run(engine, [(rid, prompt, params, 0)])
    second = {}
    engine.add_request("again", prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            second.setdefault("cached", out.num_cached_tokens)
            second.setdefault("tokens", []).extend(out.token_ids)
    assert second["cached"] >= 16 * ((len(prompt.token_ids) - 1) // 16) - 16
    assert first[rid] == second["tokens"] == alone[rid]
    assert engine.stats()["prefix_cache_hit_rate"] > 0
    engine.block_manager.check_invariants([])


def test_different_image_same_text_does_not_share_past_the_image(tiny_ckpt, tok):
    engine = make_engine(tiny_ckpt)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]}]
    a = build_chat_prompt(tok, messages, [picture(100, 100, 1)])
    b = build_chat_prompt(tok, messages, [picture(100, 100, 2)])
    assert a.token_ids == b.token_ids
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    run(engine, [("a", a, params, 0)])
    engine.add_request("b", b, params)
    seq = engine.seqs["b"]
    while engine.has_unfinished():
        engine.step()
    first_patch = a.token_ids.index(tok.patch_id)
    cached = seq.num_cached_tokens
    assert cached <= first_patch, (cached, first_patch)
    engine.add_request("a2", a, params)
    seq = engine.seqs["a2"]
    engine.step()
    assert seq.num_cached_tokens > first_patch  # the same picture does hit past it


def test_abort_frees_blocks_at_once(tiny_ckpt, reqs):
    engine = make_engine(tiny_ckpt)
    rid, prompt, _, _ = reqs[4]
    engine.add_request(rid, prompt, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.add_request("other", reqs[6][1], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    out = engine.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    engine.block_manager.check_invariants(list(engine.seqs.values()))
    assert engine.abort(rid) is None
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny_ckpt, reqs, alone, monkeypatch):
    engine = make_engine(tiny_ckpt)
    for rid, prompt, params, _ in reqs[:3]:
        engine.add_request(rid, prompt, params)
    real = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda sched: (_ for _ in ()).throw(RuntimeError("boom")))
    outs = engine.step()
    assert {o.request_id for o in outs} == {r[0] for r in reqs[:3]}
    assert all(o.finished and o.finish_reason == "error" and "boom" in o.error for o in outs)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    monkeypatch.setattr(engine.runner, "execute", real)
    rid, prompt, params, _ = reqs[3]
    assert run(engine, [(rid, prompt, params, 0)])[rid] == alone[rid]


def test_stop_strings_cut_the_text_exactly(tiny_ckpt, tok, reqs):
    rid, prompt, _, _ = reqs[7]
    free = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine = make_engine(tiny_ckpt)
    engine.add_request("free", prompt, free)
    text = ""
    while engine.has_unfinished():
        text += "".join(o.text for o in engine.step())
    assert text == tok.decode(
        alone_ids := run(make_engine(tiny_ckpt), [("x", prompt, free, 0)])["x"], skip_special_tokens=True
    )
    assert alone_ids
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    engine.add_request(
        "stop", prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])
    )
    got, reason = "", None
    while engine.has_unfinished():
        for o in engine.step():
            got += o.text
            reason = o.finish_reason
    assert got == text[: text.index(stop)] and reason == "stop"


def test_bad_requests_are_refused_clearly(tiny_ckpt, tok):
    engine = make_engine(tiny_ckpt, num_kv_blocks=8)
    ok = SamplingParams(max_tokens=4)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("a", Prompt([]), ok)
    with pytest.raises(RequestError, match="vocabulary|token ids"):
        engine.add_request("b", Prompt([10**6]), ok)
    with pytest.raises(RequestError, match="KV cache holds 128"):
        engine.add_request("c", Prompt([1] * 200), ok)
    with pytest.raises(RequestError, match="stop"):
        engine.add_request("d", Prompt([1, 2]), SamplingParams(max_tokens=4, stop_token_ids=[10**6]))
    long_engine = make_engine(tiny_ckpt, max_model_len=64)
    with pytest.raises(RequestError, match="max_model_len 64"):
        long_engine.add_request("e", Prompt([1] * 64), ok)
    assert not engine.has_unfinished()


def test_bad_words_are_never_generated(tiny_ckpt, tok, reqs):
    rid, prompt, _, _ = reqs[7]
    free = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ids = run(make_engine(tiny_ckpt), [("x", prompt, free, 0)])["x"]
    # the first generated token that is a whole word by itself
    k = next(
        i for i, t in enumerate(ids) if (w := tok.decode([t])).strip().isalnum() and tok.encode(w) == [t]
    )
    banned = tok.decode([ids[k]])
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, bad_words=[banned])
    got = run(make_engine(tiny_ckpt), [("x", prompt, params, 0)])["x"]
    assert got[:k] == ids[:k] and got[k] != ids[k]
    engine = make_engine(tiny_ckpt)
    for word in engine._bad_words_ids((banned,)):
        assert all(tuple(got[i : i + len(word)]) != tuple(word) for i in range(len(got)))
    # tokenized beforehand, as the server's preprocessing sends them: the same answer
    ids = dataclasses.replace(free, bad_words_ids=tok.bad_words_ids([banned]))
    assert run(engine, [("y", prompt, ids, 0)])["y"] == got
