"""Continuous batching with chunked prefill, on the CPU side only (no tensors here).

Each step has a token budget (`max_num_batched_tokens`). Running sequences come first: those that
decode (one token each), then those still in prefill, which get chunks of what is left of the
budget, so a long prompt never stalls the decodes. Then waiting sequences are admitted in arrival
order (FCFS: the head of the queue is never overtaken, so nothing starves) while the budget, the
sequence limit and the KV blocks allow. A newly admitted sequence first takes what the prefix
cache already holds.

When KV blocks run out, the newest running sequence is preempted: its blocks are freed and it
goes back to the front of the queue to be recomputed later (its tokens so far kept). A sequence
that cannot grow even with the whole cache to itself is finished with reason "length".
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from maverick.engine.block_manager import BlockManager
from maverick.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs (one decode token each)")


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    out_of_memory: list[Sequence] = field(default_factory=list)  # finished: the cache cannot hold them

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_first(self, seqs: list[Sequence]) -> None:
        """Queue seqs, in order, ahead of every waiting one (the other choices of an admitted request)."""
        self.waiting.extendleft(reversed(seqs))

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take seq out of the queues, release its blocks, and mark it finished."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        seq.image_embeds.clear()

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # Decodes first, then prefill chunks; within each, admission order.
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._make_room(seq, n, out):
                out.seqs.append(seq)
                out.num_new_tokens.append(n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            computed = self.block_manager.computed_blocks(seq)
            n = min(seq.num_tokens - len(computed) * self.block_manager.block_size, budget)
            if not self.block_manager.allocate_slots(seq, n, computed):
                if not self.running and not out.seqs:  # alone and still too big: it never fits
                    self.finish(seq, FinishReason.LENGTH)
                    out.out_of_memory.append(seq)
                    continue
                break  # FCFS: wait for blocks to free up rather than let later requests overtake
            if seq.num_preemptions == 0:
                self.block_manager.record_prefix_lookup(seq, len(computed))
            self.waiting.popleft()
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
        return out

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Allocate n slots for a running seq, preempting the newest others as needed."""
        while not self.block_manager.allocate_slots(seq, n):
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                self.finish(seq, FinishReason.LENGTH)  # the whole cache is not enough for it
                out.out_of_memory.append(seq)
                return False
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        if seq in out.seqs:  # already given tokens this step: take them back
            i = out.seqs.index(seq)
            del out.seqs[i], out.num_new_tokens[i]
        self.running.remove(seq)
        self.block_manager.free_seq(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1
