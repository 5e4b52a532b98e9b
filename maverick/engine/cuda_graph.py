"""Pure-decode steps in fixed shapes, replayed from CUDA graphs captured per batch-size bucket.

A decode step of n sequences (one new token each) runs as a batch of B rows, B the smallest bucket
>= n (1, 2, 4, 8, 16, 24, ... up to the largest batch the scheduler makes). Its inputs are copied
into static buffers sized for the largest bucket; rows n..B-1 are padding: token 0 at position 0,
seq_len 0 (attention reads nothing, the MoE skips the row) and a cache slot in a scratch KV block
that no sequence owns (the runner allocates one block past the block manager's), so their K/V
writes touch nobody's cache. The model runs on `DecodeMetadata` (Triton kernels, no host sync), so
the forward of each bucket, logits included, is captured once at start-up and replayed for every
step that fits it; the logits of the B rows are copied out and the n real ones returned.

With `use_graphs=False` the same buffers, buckets and padding run eagerly: the fixed-shape path
without graphs, which is what runs on the CPU (tests, under TRITON_INTERPRET=1) and what a graph
replay is compared with (scripts/gpu_check.py). With `compiled` (the CPU's decode path) the kernels
are kernels/torch_decode.py's and the step is compiled by torch.compile at start instead of
captured, each step reading only its batch's block-table columns. Prefill and mixed steps, and
batches over the largest bucket, never come here: the model runner sends them down the reference
path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from maverick.kernels import moe as moe_kernel
from maverick.kernels import paged_attention as attention_kernel
from maverick.layers.attention import DecodeMetadata
from maverick.models.llama4 import KVCache, Llama4Model

log = logging.getLogger(__name__)

MAX_DECODE_SPLITS = 8  # flash-decoding splits per sequence and KV head, at most


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, then multiples of 8 below max_batch_size, then max_batch_size itself: a batch is
    padded by at most 7 rows past 8, and the largest batch the scheduler makes has its own graph."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    small = [1, 2, 4, *range(8, max_batch_size, 8)]
    return [b for b in small if b < max_batch_size] + [max_batch_size]


def bucket_for(buckets: list[int], n: int) -> int | None:
    """The smallest bucket that holds n rows; None if n is over the largest (eager fallback)."""
    return next((b for b in buckets if b >= n), None)


def decode_splits(batch_size: int, num_kv_heads: int, device: torch.device) -> int:
    """Flash-decoding splits for a bucket: enough programs to fill the GPU's SMs when
    batch * num_kv_heads is small (splits with no keys exit at once). 1 off CUDA."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_DECODE_SPLITS, sms // (batch_size * num_kv_heads)))


def kernels_run_on(device: torch.device) -> bool:
    """The fixed-shape path's Triton kernels run on CUDA, and on the CPU only when TRITON_INTERPRET=1
    was set before they were imported (they are then interpreted functions: tests)."""
    if not (attention_kernel.HAS_TRITON and moe_kernel.HAS_TRITON):
        return False
    if device.type == "cuda":
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return device.type == "cpu" and isinstance(attention_kernel._paged_decode_kernel, InterpretedFunction)


@dataclass
class DecodeBatch:
    """The host-side inputs of a decode step, one row per sequence."""

    input_ids: np.ndarray  # [n] int64: each sequence's new token
    positions: np.ndarray  # [n] int64: its position (= tokens already in the cache)
    slot_mapping: np.ndarray  # [n] int64: the cache slot it is written to
    block_tables: np.ndarray  # [n, width] int32
    seq_lens: np.ndarray  # [n] int32: positions + 1

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def padded(self, num_rows: int, scratch_slot: int) -> DecodeBatch:
        """The batch with rows appended up to num_rows: token 0 at position 0, written to
        scratch_slot, seq_len 0, an all-zero block table row (never read)."""
        extra = num_rows - self.num_rows
        if extra < 0:
            raise ValueError(f"{self.num_rows} rows do not fit in {num_rows}")
        tables = np.zeros((num_rows, self.block_tables.shape[1]), dtype=np.int32)
        tables[: self.num_rows] = self.block_tables
        return DecodeBatch(
            input_ids=np.concatenate([self.input_ids, np.zeros(extra, np.int64)]),
            positions=np.concatenate([self.positions, np.zeros(extra, np.int64)]),
            slot_mapping=np.concatenate([self.slot_mapping, np.full(extra, scratch_slot, np.int64)]),
            block_tables=tables,
            seq_lens=np.concatenate([self.seq_lens, np.zeros(extra, np.int32)]),
        )


class CudaGraphRunner:
    """Runs pure-decode batches of up to `max_batch_size` rows in fixed shapes (see the module
    docstring): from CUDA graphs when `use_graphs`, compiled when `compiled`, else eagerly on the
    same static buffers."""

    def __init__(
        self,
        model: Llama4Model,
        kv_caches: list[KVCache],
        *,
        max_batch_size: int,
        max_blocks_per_seq: int,
        scratch_slot: int,
        use_graphs: bool,
        compiled: bool = False,
    ):
        self.model, self.kv_caches = model, kv_caches
        # compiled: plain-PyTorch kernels (kernels/torch_decode.py) through torch.compile, the CPU's
        # counterpart of graphs; each step then reads only its batch's block-table columns
        self.compiled = compiled
        self.width = max_blocks_per_seq  # block-table columns the next forward reads
        self.device = model.device
        self.buckets = batch_buckets(max_batch_size)
        self.scratch_slot = scratch_slot
        num_kv_heads = model.num_kv_heads  # this rank's
        self.num_splits = {b: decode_splits(b, num_kv_heads, self.device) for b in self.buckets}
        B, dev = self.buckets[-1], self.device
        # Static inputs for the largest bucket; a bucket of b rows reads their first b rows.
        self.input_ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((B,), scratch_slot, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(B, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(B, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_logits: dict[int, torch.Tensor] = {}  # [b, vocab] fp32: each graph's output
        if use_graphs and compiled:
            raise ValueError("a decode runner replays CUDA graphs or runs compiled, not both")
        if use_graphs:
            if dev.type != "cuda":
                raise ValueError(f"CUDA graphs need a CUDA device, not {dev}")
            self.capture()
        self._compiled_forward = _compile(self._forward_rows) if compiled else None
        if compiled:
            self.compile()

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    @property
    def uses_graphs(self) -> bool:
        return bool(self.graphs)

    def _forward(self, b: int) -> torch.Tensor:
        """The fixed-shape forward of the first b rows of the static inputs -> logits [b, vocab] fp32."""
        if self.compiled:
            rows = (self.input_ids[:b], self.positions[:b], self.slot_mapping[:b], self.seq_lens[:b])
            tables = self.block_tables[:b, : self.width]
            # symbolic: the rows (past one) and the table's width; static: the cache and the model
            for t in rows:
                torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(tables, 0)
            torch._dynamo.maybe_mark_dynamic(tables, 1)
            with torch.no_grad():
                return self._compiled_forward(*rows[:3], tables, rows[3])
        return self._forward_rows(
            self.input_ids[:b],
            self.positions[:b],
            self.slot_mapping[:b],
            self.block_tables[:b],
            self.seq_lens[:b],
        )

    def _forward_rows(self, input_ids, positions, slot_mapping, block_tables, seq_lens) -> torch.Tensor:
        """The forward of these rows -> logits [rows, vocab] fp32 (what torch.compile traces)."""
        meta = DecodeMetadata(
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            seq_lens=seq_lens,
            num_splits=1
            if self.compiled
            else self.num_splits[input_ids.shape[0]],  # compiled: no branch on b
            torch_kernels=self.compiled,
        )
        if self.compiled:  # traced without inference mode: inductor cannot mutate the cache inside it
            hidden = Llama4Model.forward.__wrapped__(self.model, input_ids, positions, meta, self.kv_caches)
            return Llama4Model.compute_logits.__wrapped__(self.model, hidden)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        return self.model.compute_logits(hidden)

    def compile(self) -> None:
        """Compile every graph a step can need before the first request: one row, and two rows or
        more (one graph: the rows are symbolic), each with a symbolic table width. Run on padding
        rows only, which write nothing but the scratch slot. A width is never 1 (`_load`), and
        differs from the rows here, so neither is specialised to 1 or to the other."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(self.scratch_slot)
        self.seq_lens.zero_()
        for b in self.buckets[:2]:
            self.width = min(b + 1, self.block_tables.shape[1])
            self._forward(b)
        log.info("compiled the decode step for batch sizes %s", self.buckets)

    def capture(self) -> None:
        """One graph per bucket, largest first, all in one memory pool (a smaller graph reuses the
        larger ones' memory: only one replays at a time and its logits are copied out at once).
        Each bucket is first run on a side stream (Triton compiles its kernels, allocators warm up);
        the static inputs hold padding rows only, so these runs write nothing but the scratch slot."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(self.scratch_slot)
        self.seq_lens.zero_()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(b)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.graph_logits[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def _load(self, batch: DecodeBatch) -> None:
        """Copy a (padded) batch into the first rows of the static inputs. Table entries past its
        width keep older values: the kernel never reads past a row's seq_len."""
        b, width = batch.num_rows, batch.block_tables.shape[1]
        if width > self.block_tables.shape[1]:
            raise ValueError(f"block tables of {width} blocks; the buffers hold {self.block_tables.shape[1]}")
        self.input_ids[:b].copy_(torch.from_numpy(batch.input_ids))
        self.positions[:b].copy_(torch.from_numpy(batch.positions))
        self.slot_mapping[:b].copy_(torch.from_numpy(batch.slot_mapping))
        self.block_tables[:b, :width].copy_(torch.from_numpy(batch.block_tables))
        self.seq_lens[:b].copy_(torch.from_numpy(batch.seq_lens))
        # compiled: at least 2 columns (a width of 1 would be a graph of its own); the extra column
        # holds an older entry, which the kernel masks
        self.width = max(width, min(2, self.block_tables.shape[1]))

    def run(self, batch: DecodeBatch) -> torch.Tensor:
        """Logits [n, vocab] fp32 of the batch's n rows (n <= max_batch_size)."""
        n = batch.num_rows
        b = bucket_for(self.buckets, n)
        if b is None or n == 0:
            raise ValueError(f"a decode batch of {n} rows; this runner takes 1 to {self.max_batch_size}")
        self._load(batch.padded(b, self.scratch_slot))
        if b in self.graphs:
            self.graphs[b].replay()
            logits = self.graph_logits[b]  # [b, vocab], overwritten by the next replay
        else:
            logits = self._forward(b)
        return logits[:n].clone()


ARGUMENTS = ("input_ids", "positions", "slot_mapping", "block_tables", "seq_lens")  # _forward_rows'


def _arguments_only(entries) -> list[bool]:
    """Guards to keep: those on the step's tensors (which graph fits their sizes) and on the
    relations between their symbolic sizes. Not those on the model, the cache and the runner,
    which never change while the engine serves: checking them cost more per step than the model's
    own kernels at one sequence."""
    return [e.guard_type == "SHAPE_ENV" or _root(e.name) in ARGUMENTS for e in entries]


def _root(name: str) -> str:
    """The local a guard's source starts from: "seq_lens", "L['seq_lens']" -> "seq_lens"."""
    name = name.removeprefix("L['").split("'")[0]
    return name.split(".")[0].split("[")[0]


def _compile(fn):
    """torch.compile for the decode step (the caller marks which sizes are symbolic: one graph for
    every bucket of two rows or more and every block-table width, one for a single row), guarded
    on its arguments only (`_arguments_only`; torch >= 2.8, else every guard stays)."""
    try:
        from torch._dynamo.types import GuardFilterEntry  # noqa: F401 - the filter's API exists
    except ImportError:
        return torch.compile(fn)
    return torch.compile(fn, options={"guard_filter_fn": _arguments_only})
