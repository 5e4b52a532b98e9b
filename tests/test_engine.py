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


def run_choices(
    engine: LLMEngine, reqs, finish_reason: str | None = None
) -> dict[tuple[str, int], list[int]]:
    """(request id, prompt, params, arrival step) run to the end, each added at its step: tokens by
    (request id, choice). `finish_reason`: what every choice must end with (None: any)."""
    pending = sorted(reqs, key=lambda r: r[3])
    tokens: dict[tuple[str, int], list[int]] = {}
    finished: set[tuple[str, int]] = set()
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][3] <= step:
            rid, prompt, params, _ = pending.pop(0)
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            key = (out.request_id, out.index)
            assert key not in finished, out  # nothing after a choice's finished update
            tokens.setdefault(key, []).extend(out.token_ids)
            if out.finished:
                assert finish_reason in (None, out.finish_reason), out
                finished.add(key)
        step += 1
        assert step < 10_000
    assert finished == set(tokens) == {(rid, i) for rid, _, p, _ in reqs for i in range(p.n)}
    return tokens


def run(engine: LLMEngine, reqs) -> dict[str, list[int]]:
    """Requests of one choice each, run to their length: tokens by request id."""
    tokens = run_choices(engine, reqs, finish_reason="length")
    return {rid: tokens[(rid, 0)] for rid, *_ in reqs}


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


@pytest.mark.parametrize("decode_path", ["auto", "compiled"])
def test_mixed_workload_equals_alone_and_transformers(tiny_ckpt, reqs, alone, reference, decode_path):
    engine = make_engine(
        tiny_ckpt, num_kv_blocks=40, max_num_batched_tokens=48, max_num_seqs=8, decode_path=decode_path
    )
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # compiled: all at start
    got = run(engine, reqs)
    if decode_path == "compiled":
        assert engine.runner.num_fixed_shape_steps > 0 and engine.runner.num_split_steps > 0
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "compiled while serving"
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
    seq = engine.requests["b"][0]
    while engine.has_unfinished():
        engine.step()
    first_patch = a.token_ids.index(tok.patch_id)
    cached = seq.num_cached_tokens
    assert cached <= first_patch, (cached, first_patch)
    engine.add_request("a2", a, params)
    seq = engine.requests["a2"][0]
    engine.step()
    assert seq.num_cached_tokens > first_patch  # the same picture does hit past it


def test_abort_frees_blocks_at_once(tiny_ckpt, reqs):
    engine = make_engine(tiny_ckpt)
    rid, prompt, _, _ = reqs[4]
    engine.add_request(rid, prompt, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.add_request("other", reqs[6][1], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    (out,) = engine.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    engine.block_manager.check_invariants([s for seqs in engine.requests.values() for s in seqs])
    assert engine.abort(rid) == []
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


def _stream(engine: LLMEngine, rid: str, prompt: Prompt, params: SamplingParams) -> list:
    """Every output of one request run alone to its end."""
    engine.add_request(rid, prompt, params)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def test_logprobs_top_logprobs_and_cumulative_are_the_models_raw_distribution(tiny_ckpt, reqs, reference):
    """Sampled with penalties: the log-probs are still those of the unmodified distribution, which
    transformers' logits give independently (fp32: within 1e-4)."""
    prompt = reqs[3][1]
    params = SamplingParams(
        max_tokens=6,
        temperature=0.8,
        seed=3,
        presence_penalty=1.5,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=4,
    )
    outs = _stream(make_engine(tiny_ckpt), "lp", prompt, params)
    ids = [t for o in outs for t in o.token_ids]
    lps = [lp for o in outs for lp in o.logprobs]
    top_ids = [row for o in outs for row in o.top_token_ids]
    top_lps = [row for o in outs for row in o.top_logprobs]
    assert len(ids) == len(lps) == len(top_ids) == len(top_lps) == 6
    n = len(prompt.token_ids)
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([prompt.token_ids + ids])).logits[0, n - 1 : -1]  # [6, V]
    oracle = torch.log_softmax(logits.float(), dim=-1)
    values, indices = oracle.topk(4)
    assert top_ids == indices.tolist()
    torch.testing.assert_close(torch.tensor(top_lps), values, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        torch.tensor(lps), oracle[torch.arange(6), torch.tensor(ids)], atol=1e-4, rtol=0
    )
    running = 0.0
    for o in outs:  # each update carries the sum so far
        running += sum(o.logprobs)
        assert o.cumulative_logprob == pytest.approx(running, abs=1e-9)
    assert outs[-1].cumulative_logprob == pytest.approx(
        oracle[torch.arange(6), torch.tensor(ids)].sum().item(), abs=1e-3
    )
    plain = _stream(
        make_engine(tiny_ckpt), "plain", prompt, dataclasses.replace(params, logprobs=False, top_logprobs=0)
    )
    assert [t for o in plain for t in o.token_ids] == ids  # asking for log-probs changes no choice
    assert all(o.logprobs is None and o.cumulative_logprob is None and o.top_logprobs is None for o in plain)


def test_logit_bias_forces_or_bans_a_token_under_greedy(tiny_ckpt, reqs):
    """+100 makes a token the argmax at every step, -100 keeps the likeliest one out; the returned
    log-probs stay those of the unbiased distribution."""
    prompt = reqs[2][1]
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=20)
    engine = make_engine(tiny_ckpt)
    free = _stream(engine, "free", prompt, greedy)
    ids = [t for o in free for t in o.token_ids]
    forced_id = free[0].top_token_ids[0][5]  # the 6th likeliest first token
    forced = _stream(engine, "forced", prompt, dataclasses.replace(greedy, logit_bias={forced_id: 100.0}))
    assert [t for o in forced for t in o.token_ids] == [forced_id] * 5
    # raw: the bias is not in them (approx: this prompt's blocks now come from the prefix cache)
    assert forced[0].logprobs == pytest.approx([free[0].top_logprobs[0][5]], abs=1e-5)
    assert forced[0].top_token_ids == free[0].top_token_ids
    banned = _stream(engine, "banned", prompt, dataclasses.replace(greedy, logit_bias={ids[0]: -100.0}))
    got = [t for o in banned for t in o.token_ids]
    assert ids[0] not in got and got[0] == free[0].top_token_ids[0][1]  # the runner-up instead
    with pytest.raises(RequestError, match=r"logit_bias token ids must be in \[0, "):
        engine.add_request("x", prompt, SamplingParams(logit_bias={engine.vocab_size: 1.0}))


# -- n > 1: several choices of one prompt ---------------------------------------------------------------
CHOICES = SamplingParams(n=3, seed=2024, max_tokens=10, temperature=0.9, top_p=0.95, ignore_eos=True)


def test_each_choice_equals_the_request_with_seed_plus_i_alone_or_in_a_busy_batch(tiny_ckpt, reqs):
    rid, prompt = reqs[0][0], reqs[0][1]
    assert len(prompt.token_ids) > 32  # full blocks to share, and a partial one to compute
    # the oracle: three separate n = 1 requests, each in an engine of its own, seeds s, s + 1, s + 2
    separate = [dataclasses.replace(CHOICES, n=1, seed=2024 + i) for i in range(3)]
    alone = [run(make_engine(tiny_ckpt), [("one", prompt, p, 0)])["one"] for p in separate]
    assert len({tuple(a) for a in alone}) == 3  # really three different answers
    together = run_choices(make_engine(tiny_ckpt), [(rid, prompt, CHOICES, 0)])
    assert [together[rid, i] for i in range(3)] == alone
    uncached = run_choices(make_engine(tiny_ckpt, enable_prefix_caching=False), [(rid, prompt, CHOICES, 0)])
    assert [uncached[rid, i] for i in range(3)] == alone  # each choice computes the whole prompt
    noise = [
        (r[0], r[1], SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True, n=1 + i % 2), r[3])
        for i, r in enumerate(reqs[:10])
        if r[0] != rid
    ]
    engine = make_engine(tiny_ckpt, num_kv_blocks=60, max_num_batched_tokens=64, max_num_seqs=6)
    busy = run_choices(engine, [*noise, (rid, prompt, CHOICES, 2)])
    assert [busy[rid, i] for i in range(3)] == alone
    assert engine.block_manager.num_free_blocks == 60
    engine.block_manager.check_invariants([])


def test_choices_share_the_prompts_full_blocks(tiny_ckpt, reqs):
    engine = make_engine(tiny_ckpt)
    prompt = reqs[0][1]
    bs, full = 16, (len(prompt.token_ids) - 1) // 16
    engine.add_request("n3", prompt, CHOICES)
    seqs = engine.requests["n3"]
    engine.step()  # choice 0's prefill (one chunk); the others wait for its blocks
    assert [s.status.value for s in seqs] == ["running", "waiting", "waiting"]
    assert not engine.scheduler.waiting  # held back, not queued
    hits = engine.block_manager.prefix_hits
    engine.step()
    assert all(s.status.value == "running" for s in seqs)
    tables = [s.block_table[:full] for s in seqs]
    assert tables[0] == tables[1] == tables[2] and len(tables[0]) == full
    assert all(engine.block_manager.ref_counts[b] == 3 for b in tables[0])
    assert len({s.block_table[full] for s in seqs}) == 3  # each computes its own last block
    assert [s.num_cached_tokens for s in seqs] == [0, full * bs, full * bs]
    assert engine.block_manager.prefix_hits - hits == 2 * full * bs
    engine.block_manager.check_invariants(seqs)
    outs = engine.abort("n3")
    assert sorted(o.index for o in outs) == [0, 1, 2]
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    assert not engine.has_unfinished() and engine.abort("n3") == []
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.block_manager.check_invariants([])


def test_aborting_a_request_whose_choices_wait_frees_everything(tiny_ckpt, reqs):
    engine = make_engine(tiny_ckpt, max_num_batched_tokens=16, max_num_seqs=8)  # chunked: choices wait
    engine.add_request("n3", reqs[0][1], CHOICES)
    engine.add_request("other", reqs[6][1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.step()
    assert "n3" in engine.held_choices and engine.block_manager.num_used_blocks > 0
    outs = engine.abort("n3")
    assert sorted(o.index for o in outs) == [0, 1, 2] and all(o.finish_reason == "abort" for o in outs)
    assert not engine.held_choices
    while engine.has_unfinished():
        assert all(o.request_id == "other" for o in engine.step())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.block_manager.check_invariants([])


def test_context_and_generation_logits_are_transformers_raw_logits(tiny_ckpt, reqs, reference):
    """The prompt's logits (its prefill split into 3 chunks, the prompt already in the prefix cache)
    and each sampled step's logits, under penalties and a bias that change the choice but not the
    logits returned: transformers' fp32 logits, independently."""
    prompt = reqs[5][1]  # 101 tokens
    n = len(prompt.token_ids)
    engine = make_engine(tiny_ckpt, max_num_batched_tokens=48, max_num_seqs=8)
    _stream(engine, "warm", prompt, SamplingParams(max_tokens=1))  # its full blocks now cached
    params = SamplingParams(
        max_tokens=5,
        temperature=0.7,
        seed=1,
        presence_penalty=1.0,
        logit_bias={7: 5.0},
        ignore_eos=True,
        return_context_logits=True,
        return_generation_logits=True,
    )
    outs = _stream(engine, "logits", prompt, params)
    ids = [t for o in outs for t in o.token_ids]
    assert [o.context_logits is not None for o in outs] == [True] + [False] * 4
    assert outs[0].num_reused_blocks == 0 and outs[0].num_cached_tokens == 0  # computed whole
    with torch.no_grad():
        oracle = reference(input_ids=torch.tensor([prompt.token_ids + ids])).logits[0].float()  # [n + 5, V]
    torch.testing.assert_close(torch.from_numpy(outs[0].context_logits), oracle[:n], atol=1e-4, rtol=0)
    generation = np.concatenate([o.generation_logits for o in outs])  # [5, V]
    torch.testing.assert_close(torch.from_numpy(generation), oracle[n - 1 : -1], atol=1e-4, rtol=0)
    plain = _stream(
        engine,
        "plain",
        prompt,
        dataclasses.replace(params, return_context_logits=False, return_generation_logits=False),
    )
    assert [t for o in plain for t in o.token_ids] == ids  # asking for logits changes no choice
    assert all(o.generation_logits is None and o.context_logits is None for o in plain)
    assert plain[0].num_reused_blocks == (n - 1) // 16  # without context logits: from the cache


def test_perf_metrics_count_blocks_and_time_each_phase(tiny_ckpt, reqs):
    prompt = reqs[5][1]  # 101 tokens: 7 blocks of 16
    engine = make_engine(tiny_ckpt)
    first = _stream(engine, "first", prompt, SamplingParams(max_tokens=12, ignore_eos=True, temperature=0))
    again = _stream(engine, "again", prompt, SamplingParams(max_tokens=12, ignore_eos=True, temperature=0))
    # 112 tokens have K/V (the last one sampled never enters the cache): 7 blocks of 16
    assert (first[-1].num_new_blocks, first[-1].num_reused_blocks) == (7, 0)
    assert (again[-1].num_new_blocks, again[-1].num_reused_blocks) == (1, 6)  # 6 full prompt blocks reused
    for outs in (first, again):
        last = outs[-1]
        assert last.arrival_time <= last.first_scheduled_time <= last.first_token_time <= last.token_times[-1]


def test_logits_larger_than_the_limit_are_refused(tiny_ckpt, reqs, monkeypatch):
    import maverick.engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "MAX_LOGITS_BYTES", 100 * 4048 * 4)
    engine = make_engine(tiny_ckpt)
    prompt = reqs[5][1]  # 101 tokens
    with pytest.raises(RequestError, match="return_context_logits / return_generation_logits"):
        engine.add_request("big", prompt, SamplingParams(return_context_logits=True))
    engine.add_request("fits", prompt, SamplingParams(max_tokens=99, return_generation_logits=True))
