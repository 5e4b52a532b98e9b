"""Block manager and scheduler invariants on tiny, exact examples (4-token blocks)."""

from __future__ import annotations

import torch

from maverick.engine.api import ImageInput, SamplingParams
from maverick.engine.block_manager import BlockManager
from maverick.engine.scheduler import Scheduler, SchedulerConfig
from maverick.engine.sequence import FinishReason, Sequence, SequenceStatus

PATCH = 99
TILE = 2  # tokens per tile in these examples


def seq(rid: str, tokens: list[int], images: tuple[ImageInput, ...] = (), max_tokens: int = 8) -> Sequence:
    return Sequence(rid, tokens, images, SamplingParams(max_tokens=max_tokens), None, PATCH, TILE)  # type: ignore[arg-type]


def image(value: float) -> ImageInput:
    return ImageInput.from_pixels(torch.full((1, 3, 2, 2), value))


def admit(bm: BlockManager, s: Sequence, n: int | None = None) -> list[int]:
    hits = bm.computed_blocks(s)
    assert bm.allocate_slots(s, (n or s.num_tokens) - len(hits) * bm.block_size, hits)
    return hits


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    s.num_computed_tokens += n
    bm.cache_full_blocks(s)


def test_allocate_and_free_restore_the_pool():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", list(range(10)))
    admit(bm, a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    bm.check_invariants([a])
    bm.free_seq(a)
    assert bm.num_free_blocks == 8 and a.block_table == []
    bm.check_invariants([])


def test_allocation_fails_without_side_effects():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = seq("a", list(range(12)))
    assert not bm.allocate_slots(a, 12)
    assert a.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_full_blocks_and_leaves_one_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", list(range(10)))
    admit(bm, a)
    compute(bm, a, 10)  # blocks 0 and 1 full and cached, block 2 partial
    b = seq("b", list(range(10)) + [50, 51])
    hits = admit(bm, b)
    assert hits == a.block_table[:2] and b.num_computed_tokens == 8
    assert [bm.ref_counts[x] for x in hits] == [2, 2]
    c = seq("c", list(range(8)))  # a full hit: its last block is recomputed, never shared
    assert bm.computed_blocks(c) == a.block_table[:1]
    bm.check_invariants([a, b])


def test_freed_blocks_stay_cached_until_reused_tail_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq("a", list(range(12)))
    admit(bm, a)
    compute(bm, a, 12)
    head, mid, tail = a.block_table
    (never_used,) = set(range(4)) - {head, mid, tail}
    bm.free_seq(a)
    x, y = seq("x", [500]), seq("y", [501])
    admit(bm, x)
    admit(bm, y)
    assert x.block_table == [never_used] and y.block_table == [tail]  # tail evicted before head
    bm.free_seq(x)
    b = seq("b", list(range(8)) + [7])
    assert admit(bm, b) == [head, mid]  # still cached, revived from the free pool
    assert b.block_table == [head, mid, never_used]
    bm.check_invariants([y, b])


def test_image_content_is_part_of_the_key():
    bm = BlockManager(num_blocks=16, block_size=4)
    toks = [1, 2, 3, 4, PATCH, PATCH, 5, 6, 7, 8, 9, 10, 11]
    a = seq("a", toks, (image(0.0),))
    admit(bm, a)
    compute(bm, a, len(toks))
    same = seq("same", toks, (image(0.0),))
    other = seq("other", toks, (image(1.0),))
    assert len(bm.computed_blocks(same)) == 3
    assert bm.computed_blocks(other) == a.block_table[:1]  # only the block before the image


def test_patch_count_must_match_images():
    try:
        seq("x", [PATCH, PATCH, PATCH], (image(0.0),))
    except ValueError as e:
        assert "3 <|patch|> tokens" in str(e)
    else:
        raise AssertionError("mismatch accepted")


def _scheduler(num_blocks: int, budget: int, max_seqs: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget), BlockManager(num_blocks, 4))


def _run_step(sched: Scheduler):
    out = sched.schedule()
    for s, n in zip(out.seqs, out.num_new_tokens, strict=True):
        s.num_computed_tokens += n
        sched.block_manager.cache_full_blocks(s)
        if s.num_computed_tokens == s.num_tokens:
            s.output_token_ids.append(7)  # "sample"
    return out


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    sched = _scheduler(num_blocks=32, budget=8)
    a = seq("a", list(range(3)))
    sched.add(a)
    _run_step(sched)  # a prefilled, now decoding
    b = seq("b", list(range(20)))
    sched.add(b)
    out = _run_step(sched)
    assert out.seqs == [a, b] and out.num_new_tokens == [1, 7]
    out = _run_step(sched)
    assert out.num_new_tokens == [1, 7] and out.num_batched_tokens <= 8


def test_fcfs_head_is_not_overtaken():
    sched = _scheduler(num_blocks=4, budget=64)
    big = seq("big", list(range(14)))  # 4 blocks
    sched.add(big)
    _run_step(sched)
    waiting_big = seq("w", list(range(100, 112)))  # 3 blocks: must wait
    small = seq("s", [1])  # would fit, but arrived later
    sched.add(waiting_big)
    sched.add(small)
    out = _run_step(sched)
    assert out.seqs == [big] and list(sched.waiting) == [waiting_big, small]


def test_preemption_recomputes_newest_and_never_deadlocks():
    sched = _scheduler(num_blocks=6, budget=64)
    a, b = seq("a", list(range(8)), max_tokens=20), seq("b", list(range(50, 58)), max_tokens=20)
    sched.add(a)
    sched.add(b)
    _run_step(sched)  # both prefilled: 2 + 2 blocks, and a 5th/6th needed as they grow
    preempted = []
    for _ in range(30):
        out = _run_step(sched)
        preempted += out.preempted
        sched.block_manager.check_invariants(sched.running)
        for s in list(sched.running):
            if s.num_output_tokens >= 12:
                sched.finish(s, FinishReason.LENGTH)
        if not sched.num_unfinished:
            break
    assert preempted and preempted[0] is b  # the newest goes first
    assert a.num_output_tokens >= 12 and b.num_output_tokens >= 12
    assert sched.block_manager.num_free_blocks == 6


def test_sequence_too_big_for_the_whole_cache_finishes_with_length():
    sched = _scheduler(num_blocks=2, budget=64)
    a = seq("a", list(range(7)), max_tokens=50)
    sched.add(a)
    for _ in range(5):
        _run_step(sched)
    assert a.status is SequenceStatus.FINISHED and a.finish_reason is FinishReason.LENGTH
    assert sched.block_manager.num_free_blocks == 2
