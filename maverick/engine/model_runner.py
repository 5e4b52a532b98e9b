"""Turns one scheduled step into tensors, runs the model, and returns the logits to sample from.

The only engine code that touches the device. For each scheduled sequence it takes the next `n`
tokens (a prefill chunk or one decode token), their positions and cache slots, the sequence's
block table, and the image-embedding rows of any `<|patch|>` tokens among them (an image is
encoded once, when its first patch enters a chunk, and dropped when its last one has).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from maverick.engine.scheduler import SchedulerOutput
from maverick.engine.sequence import Sequence
from maverick.layers.attention import AttentionMetadata
from maverick.models.llama4 import Llama4Model


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    image_embeds: torch.Tensor | None  # [P, hidden] for the prompt <|patch|> tokens of input_ids, in order
    image_mask: torch.Tensor | None  # [T] bool: where those P rows go
    sample_indices: torch.Tensor  # [N]: rows of the flat batch whose logits are sampled
    sample_seqs: list[Sequence]  # the N sequences that reach their last token this step


class ModelRunner:
    def __init__(
        self, model: Llama4Model, num_blocks: int, block_size: int, kv_dtype: torch.dtype | None = None
    ):
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_caches = model.allocate_kv_caches(num_blocks, block_size, kv_dtype)

    @staticmethod
    def kv_bytes_per_block(model: Llama4Model, block_size: int, kv_dtype: torch.dtype | None = None) -> int:
        cfg = model.config.text
        itemsize = (kv_dtype or model.dtype).itemsize
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        image_rows: list[torch.Tensor] = []
        image_mask: list[np.ndarray] = []
        seq_lens: list[int] = []
        self._encode_images(sched)
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids += seq.token_slice(start, end)
            pos = np.arange(start, end)
            table = np.asarray(seq.block_table, dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            seq_lens.append(end)
            a, b = seq.image_rows(start, end)
            image_mask.append(seq.image_mask(start, end))
            if b > a:
                image_rows.append(self._rows(seq, a, b))
            if end == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        width = max(len(s.block_table) for s in sched.seqs)
        tables = np.zeros((len(sched.seqs), width), dtype=np.int32)
        for i, seq in enumerate(sched.seqs):
            tables[i, : len(seq.block_table)] = seq.block_table
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            block_tables=torch.from_numpy(tables).to(dev),
            query_lens=list(sched.num_new_tokens),
            seq_lens=seq_lens,
            block_size=bs,
        )
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.from_numpy(np.concatenate(positions)).to(dev),
            meta=meta,
            image_embeds=torch.cat(image_rows) if image_rows else None,
            image_mask=torch.from_numpy(np.concatenate(image_mask)).to(dev) if image_rows else None,
            sample_indices=torch.tensor(sample_rows, dtype=torch.long, device=dev),
            sample_seqs=sample_seqs,
        )

    def execute(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step. Returns fp32 logits [N, vocab] for the sequences that sample, and those sequences."""
        inputs = self.prepare(sched)
        hidden = self.model(
            inputs.input_ids,
            inputs.positions,
            inputs.meta,
            self.kv_caches,
            inputs.image_embeds,
            inputs.image_mask,
        )
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        self._drop_finished_images(sched)
        return logits, inputs.sample_seqs

    # -- images ----------------------------------------------------------------------------------
    def _encode_images(self, sched: SchedulerOutput) -> None:
        """Encode, in one vision pass, every image whose patches this step needs and that is not encoded."""
        todo: list[tuple[Sequence, int]] = []
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            a, b = seq.image_rows(seq.num_computed_tokens, seq.num_computed_tokens + n)
            todo += [(seq, k) for k in seq.images_in_rows(a, b) if k not in seq.image_embeds]
        if not todo:
            return
        pixels = torch.cat([seq.images[k].pixel_values for seq, k in todo]).to(self.device)
        embeds = self.model.encode_images(pixels)  # [sum(tiles) * tokens_per_tile, hidden]
        sizes = [seq.image_row_start[k + 1] - seq.image_row_start[k] for seq, k in todo]
        for (seq, k), e in zip(todo, embeds.split(sizes), strict=True):
            seq.image_embeds[k] = e

    @staticmethod
    def _rows(seq: Sequence, a: int, b: int) -> torch.Tensor:
        """Embedding rows [a, b) of seq's patch tokens, gathered from the images they belong to."""
        parts = []
        for k in seq.images_in_rows(a, b):
            lo = seq.image_row_start[k]
            parts.append(seq.image_embeds[k][max(a, lo) - lo : min(b, seq.image_row_start[k + 1]) - lo])
        return torch.cat(parts)

    @staticmethod
    def _drop_finished_images(sched: SchedulerOutput) -> None:
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            _, b = seq.image_rows(seq.num_computed_tokens, seq.num_computed_tokens + n)
            for k in list(seq.image_embeds):
                if seq.image_row_start[k + 1] <= b:
                    del seq.image_embeds[k]
