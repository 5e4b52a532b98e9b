"""A minimal driver of the model's paged forward for tests: sequences own blocks from a free list
(in a shuffled order, so block tables are not contiguous), and each step feeds any mix of prefill
chunks and decode tokens from several sequences as one flat batch. The engine's block manager
and scheduler do this for real; this is only enough to exercise the model."""

from __future__ import annotations

import random

import torch

from maverick.layers.attention import AttentionMetadata
from maverick.models.llama4 import Llama4Model


class PagedDriver:
    def __init__(self, model: Llama4Model, num_blocks: int = 256, block_size: int = 16, seed: int = 0):
        self.model, self.block_size = model, block_size
        self.device = model.device
        self.kv_caches = model.allocate_kv_caches(num_blocks, block_size)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.blocks: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def step(self, items: list[tuple[str, list[int], torch.Tensor | None]]) -> list[torch.Tensor]:
        """items: (seq id, new token ids, image embedding rows for their <|patch|> tokens or None).
        Returns, per item, the fp32 logits [len(new ids), vocab] of its new tokens."""
        ids, positions, slots, tables, qlens, slens, images, mask = [], [], [], [], [], [], [], []
        for sid, new, img in items:
            start = self.lens.get(sid, 0)
            blocks = self.blocks.setdefault(sid, [])
            while len(blocks) * self.block_size < start + len(new):
                blocks.append(self.free.pop())
            for pos in range(start, start + len(new)):
                slots.append(blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            ids += new
            positions += range(start, start + len(new))
            self.lens[sid] = start + len(new)
            tables.append(blocks)
            qlens.append(len(new))
            slens.append(self.lens[sid])
            # Only the prompt's patches are image positions: items that carry image rows.
            mask += [img is not None and t == self.model.config.image_token_id for t in new]
            if img is not None:
                images.append(img)
        width = max(len(t) for t in tables)
        block_tables = torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=self.device
        )
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device),
            block_tables=block_tables,
            query_lens=qlens,
            seq_lens=slens,
            block_size=self.block_size,
        )
        hidden = self.model(
            torch.tensor(ids, device=self.device),
            torch.tensor(positions, device=self.device),
            meta,
            self.kv_caches,
            torch.cat(images) if images else None,
            torch.tensor(mask, device=self.device) if images else None,
        )
        logits = self.model.compute_logits(hidden)
        return list(logits.split(qlens))

    def greedy(
        self,
        sid: str,
        prompt: list[int],
        n: int,
        image_embeds: torch.Tensor | None = None,
        prefill_chunk: int | None = None,
    ) -> list[int]:
        """Prefill `prompt` (in chunks of `prefill_chunk` tokens if set), then decode n tokens one by one."""
        chunk = prefill_chunk or len(prompt)
        patch_id = self.model.config.image_token_id
        used = 0
        for i in range(0, len(prompt), chunk):
            piece = prompt[i : i + chunk]
            k = sum(t == patch_id for t in piece)
            img = image_embeds[used : used + k] if k else None
            used += k
            logits = self.step([(sid, piece, img)])[0]
        out = [int(logits[-1].argmax())]
        while len(out) < n:
            out.append(int(self.step([(sid, [out[-1]], None)])[0][-1].argmax()))
        return out
