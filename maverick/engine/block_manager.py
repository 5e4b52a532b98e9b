"""Paged KV blocks with reference counts and a prefix cache of hash-chained full blocks.

Block `b` holds the K/V of `block_size` consecutive positions of one or more sequences (shared
when their prefixes are equal). A full block's hash chains its parent's hash, its token ids and
the content hashes of the images whose `<|patch|>` tokens it holds, so equal text with a different
picture never shares a block past the image.

Blocks with no reference are *free* but keep their content and hash until they are handed out
again, least recently freed first (a sequence's tail blocks go before its head blocks), so a
later request with the same prefix can revive them.

Chunked-local layers never read more than one attention chunk back; a later version may release
those layers' older blocks per layer. The block table stays per sequence for that reason: a
per-layer table can be derived from it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from maverick.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block holding that content
        self.free: OrderedDict[int, None] = OrderedDict(
            (b, None) for b in range(num_blocks)
        )  # front = evict first
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which served from the cache

    # -- accounting ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- hashing -------------------------------------------------------------------------------
    def block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """Hashes of seq's first `num_full_blocks` blocks (memoised on the sequence)."""
        bs = self.block_size
        while len(seq.block_hashes) < num_full_blocks:
            i = len(seq.block_hashes)
            h = hashlib.blake2b(digest_size=16)
            h.update(seq.block_hashes[-1] if i else b"root")
            h.update(np.asarray(seq.token_slice(i * bs, (i + 1) * bs), dtype=np.int64).tobytes())
            for key in seq.block_extra_keys(i * bs, (i + 1) * bs):
                h.update(key)
            seq.block_hashes.append(h.digest())
        return seq.block_hashes[:num_full_blocks]

    # -- allocation ----------------------------------------------------------------------------
    def computed_blocks(self, seq: Sequence) -> list[int]:
        """The longest run of cached blocks matching seq's leading tokens. At least one token is
        always left to compute (the model must produce logits), so a full hit drops its last block."""
        if not self.enable_prefix_caching or seq.params.return_context_logits:
            return []  # the prompt's logits are asked for: every position is computed
        hits = []
        for h in self.block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            b = self.cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed: list[int] | None = None) -> bool:
        """Make seq's block table cover its computed tokens, `computed` prefix-hit blocks (a new
        sequence only) and `num_new_tokens` more. False, changing nothing, if blocks run out."""
        computed = computed or []
        have = len(seq.block_table) + len(computed)
        total = seq.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        new = max(0, self.blocks_needed(total) - have)
        revived = sum(1 for b in computed if self.ref_counts[b] == 0)
        if new + revived > len(self.free):
            return False
        for b in computed:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        seq.num_new_blocks += new
        seq.num_reused_blocks += len(computed)
        if computed:
            seq.block_table.extend(computed)
            seq.num_computed_tokens += len(computed) * self.block_size
        for _ in range(new):
            b, _ = self.free.popitem(last=False)
            if (h := self.block_hash[b]) is not None:  # evict its old content from the cache
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            seq.block_table.append(b)
        return True

    def record_prefix_lookup(self, seq: Sequence, num_hit_blocks: int) -> None:
        self.prefix_queries += seq.num_prompt_tokens
        self.prefix_hits += num_hit_blocks * self.block_size
        seq.num_cached_tokens = num_hit_blocks * self.block_size

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full with computed tokens, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_registered_blocks:  # most steps: no block became full
            return
        hashes = self.block_hashes(seq, full)
        for i in range(seq.num_registered_blocks, full):
            b = seq.block_table[i]
            if self.block_hash[b] is None:
                self.block_hash[b] = hashes[i]
                self.cached.setdefault(hashes[i], b)
        seq.num_registered_blocks = full

    def free_seq(self, seq: Sequence) -> None:
        """Drop seq's references; its blocks stay cached until reused, tail blocks evicted first."""
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
                if self.block_hash[b] is None:
                    self.free.move_to_end(b, last=False)  # no reusable content: hand out first
        seq.block_table = []

    # -- checks ----------------------------------------------------------------------------------
    def check_invariants(self, live: list[Sequence]) -> None:
        """Reference counts equal the uses in live block tables; free blocks are exactly those unused."""
        uses = [0] * self.num_blocks
        for seq in live:
            for b in seq.block_table:
                uses[b] += 1
        assert uses == self.ref_counts, "block reference counts disagree with the block tables"
        assert set(self.free) == {b for b in range(self.num_blocks) if uses[b] == 0}, "free list is wrong"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, "prefix cache points at a block with other content"
