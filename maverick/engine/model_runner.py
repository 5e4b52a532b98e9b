"""Turns one scheduled step into tensors, runs the model, and returns the logits to sample from.

The only engine code that touches the device. For each scheduled sequence it takes the next `n`
tokens (a prefill chunk or one decode token), their positions and cache slots, the sequence's
block table, and the image-embedding rows of any `<|patch|>` tokens among them (an image is
encoded once, when its first patch enters a chunk, and dropped when its last one has).

Pure-decode steps (one text token per sequence, at most `max_num_seqs` of them) run in fixed
shapes through `CudaGraphRunner` when `modes.fixed_shape_decode` (eagerly, or replayed from CUDA
graphs with `modes.cuda_graphs`, compiled with `modes.compiled`); when compiled, a
mixed step's decodes go that way too and its other rows take the reference forward (host-planned
attention, grouped MoE), as every other step does, its routed experts through the fused kernel
with `modes.moe_kernel`.
The engine decides the modes once at start (execution.py).
The cache has one block more than the block manager hands out: the scratch block where the padding
rows of a fixed-shape batch write their K/V.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from maverick.engine.cuda_graph import CudaGraphRunner, DecodeBatch
from maverick.engine.execution import REFERENCE, ExecutionModes
from maverick.engine.scheduler import SchedulerOutput
from maverick.engine.sequence import Sequence
from maverick.layers.attention import AttentionMetadata
from maverick.models.llama4 import Llama4Model
from maverick.plan import kv_bytes_per_token


@dataclass
class ForwardStep:
    """One reference-path step as the host planned it: what every tensor-parallel rank runs (rank 0
    sends it to the others), with no sequence state."""

    input_ids: torch.Tensor  # [T] int64, host
    positions: torch.Tensor  # [T] int64, host
    slot_mapping: torch.Tensor  # [T] int64, host: cache slot for each new token
    block_tables: np.ndarray  # [S, max_blocks] int32
    query_lens: list[int]
    seq_lens: list[int]
    block_size: int
    image_embeds: (
        torch.Tensor | None
    )  # [P, hidden] for the prompt <|patch|> tokens, in order (rank 0's device)
    image_mask: np.ndarray | None  # [T] bool: where those P rows go
    sample_indices: torch.Tensor  # [N] int64, host: rows of the flat batch whose logits are sampled
    # [C] int64, host: rows whose logits a request asked for (return_context_logits), after those
    context_indices: torch.Tensor | None = None

    def for_peers(self) -> ForwardStep:
        """The same step with its image rows on the host, to pickle for the other ranks."""
        if self.image_embeds is None or self.image_embeds.device.type == "cpu":
            return self
        return dataclasses.replace(self, image_embeds=self.image_embeds.cpu())

    def run(self, model: Llama4Model, kv_caches: list) -> torch.Tensor:
        """The forward on this rank's shard; fp32 logits [N + C, vocab] of the sampled rows, then of
        the context-logit rows."""
        dev = model.device
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping.to(dev),
            block_tables=torch.from_numpy(self.block_tables).to(dev),
            query_lens=self.query_lens,
            seq_lens=self.seq_lens,
            block_size=self.block_size,
            host_block_tables=self.block_tables,
        )
        hidden = model(
            self.input_ids.to(dev),
            self.positions.to(dev),
            meta,
            kv_caches,
            None if self.image_embeds is None else self.image_embeds.to(dev),
            None if self.image_mask is None else torch.from_numpy(self.image_mask).to(dev),
        )
        rows = self.sample_indices
        if self.context_indices is not None:
            rows = torch.cat([rows, self.context_indices])
        return model.compute_logits(hidden[rows.to(dev)])


class Peers(Protocol):
    """The other tensor-parallel ranks of this engine, as rank 0 drives them (engine/parallel.py)."""

    def send(self, message: tuple) -> None: ...


class ModelRunner:
    def __init__(
        self,
        model: Llama4Model,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype | None = None,
        *,
        modes: ExecutionModes = REFERENCE,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        peers: Peers | None = None,
    ):
        self.model = model
        self.peers = peers  # rank 0 of a tensor-parallel engine: each step goes to them first
        self.device = model.device
        self.block_size = block_size
        self.num_blocks = num_blocks  # the block manager's; block `num_blocks` is the scratch block
        self.kv_caches = model.allocate_kv_caches(num_blocks + 1, block_size, kv_dtype)
        self.scratch_slot = num_blocks * block_size
        self.modes = modes
        model.use_moe_kernel(modes.moe_kernel)
        max_len = max_model_len or model.config.text.max_position_embeddings
        self.decode_runner = (
            CudaGraphRunner(
                model,
                self.kv_caches,
                max_batch_size=max_num_seqs,
                max_blocks_per_seq=min(-(-max_len // block_size), num_blocks),
                scratch_slot=self.scratch_slot,
                use_graphs=modes.cuda_graphs,
                compiled=modes.compiled,
            )
            if modes.fixed_shape_decode
            else None
        )
        self.num_reference_steps = 0
        self.num_fixed_shape_steps = 0
        self.num_split_steps = 0  # mixed steps run as a fixed-shape and a reference forward

    @staticmethod
    def kv_bytes_per_block(model: Llama4Model, block_size: int, kv_dtype: torch.dtype | None = None) -> int:
        itemsize = (kv_dtype or model.dtype).itemsize  # the planner's arithmetic, on this rank
        return block_size * kv_bytes_per_token(model.config.text, model.tp.size, itemsize)

    def prepare(
        self, sched: SchedulerOutput
    ) -> tuple[ForwardStep, list[Sequence], list[tuple[Sequence, int]]]:
        """The step's host-side inputs, the sequences that sample (reach their last token), and the
        sequences given context-logit rows with how many (in the step's order)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        image_rows: list[torch.Tensor] = []
        patch_spans: list[tuple[int, np.ndarray]] = []  # (first row, which rows are patches)
        seq_lens: list[int] = []
        context_rows: list[int] = []
        context_seqs: list[tuple[Sequence, int]] = []
        self._encode_images(sched)
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            if n == 1:  # a decode: plain ints are cheaper than arrays of one
                ids.append(seq.token_id(start))
                positions.append(start)
                slots.append(seq.block_table[start // bs] * bs + start % bs)
            else:
                ids += seq.token_slice(start, end)
                pos = np.arange(start, end)
                positions += pos.tolist()
                slots += (np.asarray(seq.block_table, dtype=np.int64)[pos // bs] * bs + pos % bs).tolist()
            seq_lens.append(end)
            if seq.params.return_context_logits and seq.num_context_logits < min(end, seq.num_prompt_tokens):
                a, b = max(start, seq.num_context_logits), min(end, seq.num_prompt_tokens)
                first = len(ids) - n  # this chunk's first row
                context_rows += range(first + a - start, first + b - start)
                context_seqs.append((seq, b - a))
            if seq.images:
                a, b = seq.image_rows(start, end)
                if b > a:
                    image_rows.append(self._rows(seq, a, b))
                    patch_spans.append((len(ids) - n, seq.image_mask(start, end)))
            if end == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        image_mask = None
        if image_rows:
            image_mask = np.zeros(len(ids), dtype=bool)
            for first, mask in patch_spans:
                image_mask[first : first + len(mask)] = mask
        step = ForwardStep(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            block_tables=_block_tables(sched.seqs),
            query_lens=list(sched.num_new_tokens),
            seq_lens=seq_lens,
            block_size=bs,
            image_embeds=torch.cat(image_rows) if image_rows else None,
            image_mask=image_mask,
            sample_indices=torch.tensor(sample_rows, dtype=torch.long),
            context_indices=torch.tensor(context_rows, dtype=torch.long) if context_rows else None,
        )
        return step, sample_seqs, context_seqs

    def execute(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step. Returns fp32 logits [N, vocab] for the sequences that sample, and those sequences."""
        if self.decode_runner is not None and self.is_fixed_shape_decode(sched):
            return self._execute_decode(sched)
        if self.decode_runner is not None and self.modes.compiled:  # measured on the CPU only
            decodes, others = self._split(sched)
            if decodes.seqs and others.seqs:
                self.num_split_steps += 1
                # a mixed step as two forwards: its decodes in fixed shapes, the rest on the reference
                # path (the sequences share nothing: each reads and writes its own cache blocks)
                decode_logits, decode_seqs = self._execute_decode(decodes)
                logits, seqs = self._execute_reference(others)
                return torch.cat([decode_logits, logits]), decode_seqs + seqs
        return self._execute_reference(sched)

    def _split(self, sched: SchedulerOutput) -> tuple[SchedulerOutput, SchedulerOutput]:
        """The step's one-token text rows (what the decode runner takes, up to its largest bucket)
        and the rest."""
        decodes, others = SchedulerOutput(), SchedulerOutput()
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            fits = _fixed_shape_row(seq, n) and len(decodes.seqs) < self.decode_runner.max_batch_size
            part = decodes if fits else others
            part.seqs.append(seq)
            part.num_new_tokens.append(n)
        return decodes, others

    def _execute_reference(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[Sequence]]:
        self.num_reference_steps += 1
        step, sample_seqs, context_seqs = self.prepare(sched)
        if self.peers is not None:
            self.peers.send(("forward", step.for_peers()))
        logits = step.run(self.model, self.kv_caches)
        self._drop_finished_images(sched)
        if context_seqs:  # rows after the sampled ones, in the step's order
            pieces = logits[len(sample_seqs) :].cpu().split([n for _, n in context_seqs])
            for (seq, n), piece in zip(context_seqs, pieces, strict=True):
                seq.context_logits.append(piece)
                seq.num_context_logits += n
            logits = logits[: len(sample_seqs)]
        return logits, sample_seqs

    # -- fixed-shape decode --------------------------------------------------------------------------
    def is_fixed_shape_decode(self, sched: SchedulerOutput) -> bool:
        """A step the decode runner takes: one new token per sequence, none of them an image
        position, and no more sequences than its largest bucket."""
        if self.decode_runner is None or len(sched.seqs) > self.decode_runner.max_batch_size:
            return False
        return all(_fixed_shape_row(seq, n) for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True))

    def prepare_decode(self, sched: SchedulerOutput) -> DecodeBatch:
        """The host-side inputs of a fixed-shape decode step, one row per sequence."""
        bs = self.block_size
        positions = np.array([seq.num_computed_tokens for seq in sched.seqs], dtype=np.int64)
        tables = _block_tables(sched.seqs)
        blocks = tables[np.arange(len(sched.seqs)), positions // bs].astype(np.int64)
        return DecodeBatch(
            input_ids=np.array([seq.token_id(int(p)) for seq, p in zip(sched.seqs, positions, strict=True)]),
            positions=positions,
            slot_mapping=blocks * bs + positions % bs,
            block_tables=tables,
            seq_lens=(positions + 1).astype(np.int32),
        )

    def _execute_decode(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[Sequence]]:
        self.num_fixed_shape_steps += 1
        batch = self.prepare_decode(sched)
        if self.peers is not None:
            self.peers.send(("decode", batch))
        logits = self.decode_runner.run(batch)  # [n, vocab]
        # A one-token prefill chunk that is not the prompt's last token does not sample.
        rows = [i for i, seq in enumerate(sched.seqs) if seq.num_computed_tokens + 1 == seq.num_tokens]
        self._drop_finished_images(sched)
        if len(rows) == len(sched.seqs):
            return logits, list(sched.seqs)
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        return logits[index], [sched.seqs[i] for i in rows]

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


def _fixed_shape_row(seq: Sequence, n: int) -> bool:
    """Whether a sequence's n new tokens are one token that is not an image position, nor a prompt
    position whose logits were asked for (the fixed-shape paths compute the sampled rows' only)."""
    a, b = seq.image_rows(seq.num_computed_tokens, seq.num_computed_tokens + n)
    if seq.params.return_context_logits and seq.num_computed_tokens < seq.num_prompt_tokens:
        return False
    return n == 1 and b <= a


def _block_tables(seqs: list[Sequence]) -> np.ndarray:
    """[S, longest block table] int32, each sequence's table zero-padded on the right."""
    tables = np.zeros((len(seqs), max(len(seq.block_table) for seq in seqs)), dtype=np.int32)
    for i, seq in enumerate(seqs):
        tables[i, : len(seq.block_table)] = seq.block_table
    return tables
