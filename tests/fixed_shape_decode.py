"""End-to-end checks of the fixed-shape decode path on the tiny model, shared by
tests/test_static_decode.py (on the CPU, in a subprocess with TRITON_INTERPRET=1, so the Triton
kernels run in the interpreter; see tests/test_kernels.py for why a subprocess) and
scripts/gpu_check.py (on CUDA, with graphs):

    TRITON_INTERPRET=1 python tests/fixed_shape_decode.py CHECKPOINT OUT.pt

- `decode_forward`: one decode token for each of 6 sequences (contexts inside the first attention
  chunk, at a chunk's first position, past NoPE temperature tuning's floor_scale) through the
  reference forward and through the fixed-shape forward padded to a bucket of 8 by
  `CudaGraphRunner` (eagerly or from a CUDA graph), plus the same rows with 3 flash-decoding
  splits, and which cache slots each step wrote;
- `engine_tokens`: greedy tokens of a few requests through the engine on a given decode path, and
  how many steps took the reference and the fixed-shape path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paged import PagedDriver  # noqa: E402

from maverick.checkpoint import load_model  # noqa: E402
from maverick.engine.api import (
    EngineConfig,  # noqa: E402
    Prompt,  # noqa: E402
    SamplingParams,  # noqa: E402
)
from maverick.engine.cuda_graph import CudaGraphRunner, DecodeBatch  # noqa: E402
from maverick.engine.llm_engine import LLMEngine  # noqa: E402
from maverick.kernels import moe, paged_attention  # noqa: E402
from maverick.layers import moe as moe_layer  # noqa: E402
from maverick.layers.attention import DecodeMetadata  # noqa: E402

BLOCK_SIZE = 16
# The decode token's position (chunk 32, floor_scale 32): 3 in the first chunk; 31 the chunk's last
# position and the first temperature-tuned one (floor((31 + 1) / 32) = 1); 32 and 64 a chunk's first
# position (a window of one key); 45 and 100 mid-chunk, tuned.
PROMPT_LENS = [3, 31, 32, 45, 64, 100]
ENGINE_PROMPT_LENS = [5, 30, 47, 90]


def _snapshot(kv_caches) -> torch.Tensor:
    """All layers' K and V as one tensor [layers, 2, slots, ...]."""
    return torch.stack([torch.stack([k.flatten(0, 1), v.flatten(0, 1)]) for k, v in kv_caches]).clone()


def _restore(kv_caches, snapshot: torch.Tensor) -> None:
    for (k, v), s in zip(kv_caches, snapshot, strict=True):
        k.view_as(s[0]).copy_(s[0])
        v.view_as(s[1]).copy_(s[1])


def _written_slots(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return (before != after).flatten(3).any(-1).any(0).any(0).nonzero().flatten().tolist()


def decode_forward(model, use_graphs: bool = False) -> dict:
    """Prefill 6 sequences, then their next token through both paths from the same cache."""
    g = torch.Generator().manual_seed(0)
    driver = PagedDriver(model, num_blocks=64, block_size=BLOCK_SIZE)
    driver.free.remove(0)
    scratch_block = driver.free.pop(0)  # never handed out: the scratch block
    driver.free.append(0)  # block 0 is the first handed out, so a scratch slot of 0 would show
    prompts = {f"s{i}": torch.randint(0, 2000, (n,), generator=g).tolist() for i, n in enumerate(PROMPT_LENS)}
    driver.step([(sid, p, None) for sid, p in prompts.items()])  # prefill, reference path
    new_tokens = torch.randint(0, 2000, (len(prompts),), generator=g).tolist()
    before = _snapshot(driver.kv_caches)

    # The reference: PagedDriver's decode step (AttentionMetadata, SDPA, grouped MoE).
    ref = torch.cat(driver.step([(sid, [t], None) for sid, t in zip(prompts, new_tokens, strict=True)]))
    ref_written = _written_slots(before, _snapshot(driver.kv_caches))

    # The same step in fixed shapes: 6 rows padded to the bucket of 8.
    _restore(driver.kv_caches, before)
    bs = BLOCK_SIZE
    width = max(len(driver.blocks[sid]) for sid in prompts)
    tables = torch.zeros(len(prompts), width, dtype=torch.int32)
    for i, sid in enumerate(prompts):
        tables[i, : len(driver.blocks[sid])] = torch.tensor(driver.blocks[sid])
    pos = torch.tensor([driver.lens[sid] - 1 for sid in prompts])  # the step above counted the token
    batch = DecodeBatch(
        input_ids=torch.tensor(new_tokens).numpy(),
        positions=pos.numpy(),
        slot_mapping=(tables[torch.arange(len(prompts)), pos // bs].long() * bs + pos % bs).numpy(),
        block_tables=tables.numpy(),
        seq_lens=(pos + 1).int().numpy(),
    )
    runner = CudaGraphRunner(
        model,
        driver.kv_caches,
        max_batch_size=8,
        max_blocks_per_seq=16,
        scratch_slot=scratch_block * bs,
        use_graphs=use_graphs,
    )
    static = runner.run(batch)
    static_written = _written_slots(before, _snapshot(driver.kv_caches))

    # The same padded rows straight through the model, with 3 flash-decoding splits.
    _restore(driver.kv_caches, before)
    meta = DecodeMetadata(runner.slot_mapping, runner.block_tables, runner.seq_lens, num_splits=3)
    hidden = model(runner.input_ids, runner.positions, meta, driver.kv_caches)
    splits = model.compute_logits(hidden)[: len(prompts)]
    return dict(
        reference=ref.cpu(),
        static=static.cpu(),
        splits=splits.cpu(),
        reference_written=ref_written,
        static_written=static_written,
        new_token_slots=batch.slot_mapping.tolist(),
        scratch_slot=scratch_block * bs,
        block_size=bs,
        bucket=runner.buckets,
    )


def engine_tokens(
    ckpt: str,
    decode_path: str,
    device: str = "cpu",
    dtype: str = "float32",
    experts: str = "dequant",
    moe_path: str = "reference",
) -> tuple[dict[str, list[int]], dict[str, int]]:
    engine = LLMEngine(
        EngineConfig(
            model_dir=str(ckpt),
            device=device,
            dtype=dtype,
            experts=experts,
            block_size=BLOCK_SIZE,
            num_kv_blocks=48,
            max_num_seqs=8,
            decode_path=decode_path,
            moe_path=moe_path,
        )
    )
    g = torch.Generator().manual_seed(1)
    tokens: dict[str, list[int]] = {}
    for step in range(40):
        if step < len(ENGINE_PROMPT_LENS):  # one new request per step: mixed steps, then decodes
            rid = f"r{step}"
            ids = torch.randint(0, 2000, (ENGINE_PROMPT_LENS[step],), generator=g).tolist()
            engine.add_request(
                rid, Prompt(ids), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
            )
            tokens[rid] = []
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        if not engine.has_unfinished():
            break
    runner = engine.runner
    steps = {"reference": runner.num_reference_steps, "fixed_shape": runner.num_fixed_shape_steps}
    return tokens, steps


def main() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    ckpt, out = sys.argv[1], sys.argv[2]
    for kernel in (paged_attention._paged_decode_kernel, moe._moe_gate_up_kernel, moe._moe_down_kernel):
        assert isinstance(kernel, InterpretedFunction), type(kernel)
    model = load_model(ckpt, dtype=torch.float32, experts="dequant")
    result = {"forward": decode_forward(model)}
    # the most tokens one fused-MoE call saw on each engine run: decode batches only, or prefill too
    calls: list[int] = []
    fused = moe_layer.fused_moe

    def counted(x, *args, **kwargs):
        calls.append(x.shape[0])
        return fused(x, *args, **kwargs)

    moe_layer.fused_moe = counted
    result["engine"], result["fused_moe_max_tokens"] = {}, {}
    for name, path, moe_path in (
        ("reference", "reference", "reference"),
        ("static", "static", "reference"),
        ("static, moe kernel", "static", "kernel"),
    ):
        calls.clear()
        result["engine"][name] = engine_tokens(ckpt, path, moe_path=moe_path)
        result["fused_moe_max_tokens"][name] = max(calls, default=0)
    torch.save(result, out)


if __name__ == "__main__":
    main()
