"""The decode runner's bookkeeping, exactly and without a GPU: batch-size buckets, padding into the
static buffers, and which steps the model runner sends down the fixed-shape path (pure decodes
that fit the largest bucket) or the reference path (prefill, mixed, too many sequences)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maverick.engine.api import EngineConfig, Prompt, SamplingParams
from maverick.engine.cuda_graph import CudaGraphRunner, DecodeBatch, batch_buckets, bucket_for, kernels_run_on
from maverick.engine.execution import resolve_modes
from maverick.engine.llm_engine import LLMEngine
from maverick.engine.model_runner import ModelRunner
from maverick.layers.attention import DecodeMetadata


def test_batch_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(10) == [1, 2, 4, 8, 10]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_bucket_for():
    buckets = batch_buckets(20)
    got = {n: bucket_for(buckets, n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 20, 21)}
    assert got == {1: 1, 2: 2, 3: 4, 5: 8, 8: 8, 9: 16, 16: 16, 17: 20, 20: 20, 21: None}


def _batch(n: int, width: int = 3, base: int = 0) -> DecodeBatch:
    """n rows whose values name the row: token 100 + base + i at position 10 + base + i, ..."""
    i = np.arange(n) + base
    return DecodeBatch(
        input_ids=100 + i,
        positions=10 + i,
        slot_mapping=1000 + i,
        block_tables=(np.arange(n * width, dtype=np.int32).reshape(n, width) + 1 + base),
        seq_lens=(11 + i).astype(np.int32),
    )


def test_padded_batch_exact():
    got = _batch(3, width=2).padded(5, scratch_slot=77)
    assert got.input_ids.tolist() == [100, 101, 102, 0, 0]
    assert got.positions.tolist() == [10, 11, 12, 0, 0]
    assert got.slot_mapping.tolist() == [1000, 1001, 1002, 77, 77]
    assert got.seq_lens.tolist() == [11, 12, 13, 0, 0]
    assert got.block_tables.tolist() == [[1, 2], [3, 4], [5, 6], [0, 0], [0, 0]]
    assert got.seq_lens.dtype == got.block_tables.dtype == np.int32
    with pytest.raises(ValueError):
        _batch(3).padded(2, scratch_slot=77)


class RecordingModel:
    """Stands in for Llama4Model: records each forward's inputs; the 'logits' of a row are its
    (token, position, slot, seq_len), so the rows that come back can be checked."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.num_kv_heads = 2  # on this rank
        self.calls: list[dict] = []

    def __call__(self, input_ids, positions, meta, kv_caches):
        assert isinstance(meta, DecodeMetadata)
        call = dict(ids=input_ids.tolist(), positions=positions.tolist(), slots=meta.slot_mapping.tolist())
        call.update(seq_lens=meta.seq_lens.tolist(), tables=meta.block_tables.tolist())
        self.calls.append(call)
        return torch.stack([input_ids, positions, meta.slot_mapping, meta.seq_lens.long()], dim=1).float()

    def compute_logits(self, hidden):
        return hidden


def test_runner_pads_each_batch_to_its_bucket():
    model = RecordingModel()
    runner = CudaGraphRunner(
        model, [], max_batch_size=10, max_blocks_per_seq=4, scratch_slot=99, use_graphs=False
    )
    assert runner.buckets == [1, 2, 4, 8, 10] and not runner.uses_graphs
    out = runner.run(_batch(7, width=4))  # bucket 8
    assert out.tolist() == [[100 + i, 10 + i, 1000 + i, 11 + i] for i in range(7)]
    call = model.calls[-1]
    assert call["ids"] == [*range(100, 107), 0] and call["positions"] == [*range(10, 17), 0]
    assert call["slots"] == [*range(1000, 1007), 99] and call["seq_lens"] == [*range(11, 18), 0]
    # a smaller batch afterwards: bucket 4, row 3 padding again (not the last batch's row 3)
    out = runner.run(_batch(3, width=2, base=50))
    assert out.tolist() == [[150 + i, 60 + i, 1050 + i, 61 + i] for i in range(3)]
    call = model.calls[-1]
    assert call["ids"] == [150, 151, 152, 0] and call["slots"] == [1050, 1051, 1052, 99]
    assert call["seq_lens"] == [61, 62, 63, 0] and call["positions"] == [60, 61, 62, 0]
    assert [row[:2] for row in call["tables"]] == [[51, 52], [53, 54], [55, 56], [0, 0]]
    runner.run(_batch(1, base=70))  # bucket 1
    assert model.calls[-1]["ids"] == [170] and model.calls[-1]["seq_lens"] == [81]
    out = runner.run(_batch(10))  # the largest bucket, no padding
    assert len(model.calls[-1]["ids"]) == 10 and out.shape == (10, 4)
    with pytest.raises(ValueError, match="1 to 10"):
        runner.run(_batch(11))
    with pytest.raises(ValueError, match="buffers hold 4"):
        runner.run(_batch(2, width=5))


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphRunner(
            RecordingModel(), [], max_batch_size=2, max_blocks_per_seq=4, scratch_slot=0, use_graphs=True
        )


def test_decode_path_resolved_once_on_the_cpu(ours_fp32, caplog):
    cpu, head_dim = torch.device("cpu"), ours_fp32.config.text.head_dim
    modes = resolve_modes("cuda_graph", "reference", cpu, 16, head_dim)
    runner = ModelRunner(ours_fp32, num_blocks=8, block_size=16, modes=modes)
    assert runner.decode_runner is None and modes.decode == "reference"  # no CUDA
    assert "needs CUDA" in caplog.text
    caplog.clear()
    # the default: CUDA graphs on CUDA only, also where the interpreter could run the kernels; quietly
    modes = resolve_modes(EngineConfig(model_dir="unused").decode_path, "reference", cpu, 16, head_dim)
    runner = ModelRunner(ours_fp32, num_blocks=8, block_size=16, modes=modes)
    assert runner.decode_runner is None and modes.decode == "reference"
    assert EngineConfig(model_dir="unused").decode_path == "auto"
    assert caplog.text == ""
    assert runner.kv_caches[0][0].shape[0] == 9 and runner.scratch_slot == 8 * 16  # + the scratch block
    if not kernels_run_on(cpu):
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            resolve_modes("static", "reference", cpu, 16, head_dim)
        with pytest.raises(ValueError, match="moe_path 'kernel'.*TRITON_INTERPRET"):
            resolve_modes("auto", "kernel", cpu, 16, head_dim)


class StubDecodeRunner:
    """Takes the place of CudaGraphRunner: records each batch, returns zero logits (greedy: token 0)."""

    def __init__(self, max_batch_size: int, vocab_size: int):
        self.max_batch_size, self.vocab_size = max_batch_size, vocab_size
        self.batches: list[DecodeBatch] = []

    def run(self, batch: DecodeBatch) -> torch.Tensor:
        self.batches.append(batch)
        return torch.zeros(batch.num_rows, self.vocab_size)


def _engine_with_stub(ckpt, max_num_seqs: int, budget: int) -> tuple[LLMEngine, StubDecodeRunner]:
    cfg = EngineConfig(
        model_dir=str(ckpt),
        dtype="float32",
        experts="dequant",
        num_kv_blocks=16,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
    )
    engine = LLMEngine(cfg)
    engine.runner.decode_runner = StubDecodeRunner(max_batch_size=2, vocab_size=engine.vocab_size)
    return engine, engine.runner.decode_runner


def _step(engine: LLMEngine) -> str:
    """One engine step; which path the model runner took."""
    runner = engine.runner
    ref, fixed = runner.num_reference_steps, runner.num_fixed_shape_steps
    engine.step()
    assert runner.num_reference_steps + runner.num_fixed_shape_steps == ref + fixed + 1
    return "reference" if runner.num_reference_steps > ref else "fixed"


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_model_runner_routes_steps(tiny_ckpt):
    """Pure decodes of at most the largest bucket (here 2) go to the decode runner; prefill, mixed
    steps and 3 decodes take the reference path."""
    engine, stub = _engine_with_stub(tiny_ckpt, max_num_seqs=4, budget=64)
    engine.add_request("a", Prompt(list(range(1, 21))), _greedy(6))  # 20 prompt tokens
    assert _step(engine) == "reference"  # a's prefill
    a = engine.requests["a"][0]
    assert _step(engine) == "fixed"  # a's first decode, alone
    batch = stub.batches[-1]
    assert batch.input_ids.tolist() == [a.output_token_ids[0]] and batch.positions.tolist() == [20]
    assert batch.slot_mapping.tolist() == [a.block_table[1] * 16 + 4] and batch.seq_lens.tolist() == [21]
    assert batch.block_tables.tolist() == [a.block_table]
    assert a.output_token_ids[1] == 0  # sampled from the stub's zero logits
    engine.add_request("b", Prompt([5, 6, 7]), _greedy(3))
    engine.add_request("c", Prompt([8, 9]), _greedy(2))
    paths = [_step(engine) for _ in range(4)]
    # a decodes while b and c prefill (mixed); three decodes (over the bucket); c is done: a and b
    # decode; b is done: a alone
    assert paths == ["reference", "reference", "fixed", "fixed"]
    assert [b.num_rows for b in stub.batches] == [1, 2, 1]
    assert not engine.has_unfinished()


def test_one_token_prefill_chunks_run_fixed_shape_and_sample_only_at_the_end(tiny_ckpt):
    """With a budget of 2 tokens, prompts advance one token a step next to a decode: such a step
    is one token per sequence too, and only the sequences at their last token sample."""
    engine, stub = _engine_with_stub(tiny_ckpt, max_num_seqs=2, budget=2)
    engine.add_request("a", Prompt([1, 2, 3]), _greedy(2))
    assert _step(engine) == "reference"  # a's first 2 prompt tokens
    engine.add_request("b", Prompt([4, 5, 6]), _greedy(1))
    a, b = engine.requests["a"][0], engine.requests["b"][0]
    outputs = []
    while engine.has_unfinished():
        before = len(stub.batches)
        assert _step(engine) == "fixed"
        outputs.append((len(a.output_token_ids), len(b.output_token_ids)))
        assert len(stub.batches) == before + 1
    got = [(x.input_ids.tolist(), x.positions.tolist()) for x in stub.batches]
    # a's last prompt token (samples) with b's first; a's decode (samples) with b's second; b's last
    assert got == [([3, 4], [2, 0]), ([0, 5], [3, 1]), ([6], [2])]
    assert outputs == [(1, 0), (2, 0), (2, 1)]
