"""The fixed-shape decode path on a GPU, for scripts/gpu_check.py: correctness against the reference
path and times, written into the report's "decode_path" section.

- paged_decode_attention vs the reference `paged_attention` (bf16 cache; Maverick's 5 query heads
  per KV head, head_dim 128, blocks of 16; 1 KV head as at TP 8 and 8 as at TP 1);
- fused_moe vs a per-token oracle (bf16 activations; bf16 and FP8 weights), and its time against
  the eager RoutedExperts at Maverick's TP 8 expert shapes;
- the tiny model's fixed-shape forward vs the reference forward (fp32, and bf16 with FP8 experts),
  a CUDA-graph replay vs the same forward run eagerly, and the engine's greedy tokens with
  decode_path "cuda_graph" (with moe_path "reference" and "kernel") vs "reference"
  (tests/fixed_shape_decode.py does the work, as it does for tests/test_static_decode.py on the CPU);
- decode steps at batch 1, 8, 32, 64 over a random KV cache against an fp32 oracle: the fixed-shape
  path in fp32 (to rounding), and both paths in bf16 (so the fixed-shape path's distance reads
  against the bf16 reference path's own);
- decode-step times at batch 1, 8, 32, 64: reference path, fixed-shape path eagerly, CUDA graph.

Errors are max |got - ref| / max |ref|. Times are medians from torch.utils.benchmark (CUDA-synced).
"""

from __future__ import annotations

import time

import fixed_shape_decode
import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from maverick.checkpoint import load_model
from maverick.engine.cuda_graph import CudaGraphRunner, DecodeBatch, kernels_run_on
from maverick.kernels.moe import fused_moe
from maverick.kernels.paged_attention import paged_decode_attention
from maverick.layers.attention import AttentionMetadata, paged_attention
from maverick.layers.fp8 import fp8_supported, quantize_rowwise
from maverick.layers.moe import RoutedExperts


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _us(fn) -> float:
    """Median microseconds per call."""
    return 1e6 * Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median


def check_attention(device: torch.device, out: list) -> None:
    g = torch.Generator().manual_seed(0)
    lens = [1, 17, 100, 1000, 4097, 300, 2500, 64]
    bs, D, B = 16, 128, len(lens)
    counts = [-(-n // bs) for n in lens]
    num_blocks = sum(counts) + 1
    tables = torch.zeros(B, max(counts), dtype=torch.int32)
    order, start = torch.randperm(num_blocks - 1, generator=g) + 1, 0  # shuffled blocks, 0 unused
    for i, c in enumerate(counts):
        tables[i, :c] = order[start : start + c]
        start += c
    tables, seq_lens = tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
    last = seq_lens.long() - 1
    meta = AttentionMetadata(
        slot_mapping=tables[torch.arange(B, device=device), last // bs].long() * bs + last % bs,
        block_tables=tables,
        query_lens=[1] * B,
        seq_lens=lens,
        block_size=bs,
    )
    for kv_heads, chunk, splits in ((1, None, 1), (1, 256, 4), (8, None, 1), (8, 1024, 2)):
        shape = (num_blocks, bs, kv_heads, D)
        k = torch.randn(shape, generator=g).to(device, torch.bfloat16)
        v = torch.randn(shape, generator=g).to(device, torch.bfloat16)
        q = torch.randn(B, 5 * kv_heads, D, generator=g).to(device, torch.bfloat16)

        def kernel(q=q, k=k, v=v, chunk=chunk, splits=splits):
            return paged_decode_attention(q, k, v, tables, seq_lens, D**-0.5, chunk, num_splits=splits)

        def reference(q=q, k=k, v=v, chunk=chunk):
            return paged_attention(q, k, v, meta, D**-0.5, chunk)

        exact = paged_attention(q.float(), k, v, meta, D**-0.5, chunk)  # fp32 math on the bf16 cache
        row = {"kv_heads": kv_heads, "chunk": chunk, "num_splits": splits}
        row.update(max_rel_err=_rel_err(kernel(), exact), kernel_us=_us(kernel), reference_us=_us(reference))
        out.append(row)
        print(f"paged_decode_attention {row}")


def _moe_oracle(x, ids, w13, w2, s13, s2) -> torch.Tensor:
    """Per token in fp32: its expert's rows, dequantised, then gate/up, SiLU, down."""
    a, b = w13[ids].float(), w2[ids].float()  # [T, 2I, H], [T, H, I]
    if s13 is not None:
        a, b = a * s13[ids][..., None], b * s2[ids][..., None]
    gate, up = torch.einsum("tnh,th->tn", a, x.float()).chunk(2, dim=-1)
    return torch.einsum("thi,ti->th", b, F.silu(gate) * up)


def _stacked_experts(E: int, H: int, inter: int, device, fp8: bool, g: torch.Generator | None = None):
    """(w13 [E, 2I, H], w2 [E, H, I], w13_scale [E, 2I] | None, w2_scale [E, H] | None)."""
    w13 = torch.randn(E, 2 * inter, H, generator=g).to(device) / H**0.5
    w2 = torch.randn(E, H, inter, generator=g).to(device) / inter**0.5
    if not fp8:
        return w13.to(torch.bfloat16), w2.to(torch.bfloat16), None, None
    q13, s13 = quantize_rowwise(w13.reshape(-1, H))
    q2, s2 = quantize_rowwise(w2.reshape(-1, inter))
    return q13.view(E, 2 * inter, H), q2.view(E, H, inter), s13.view(E, -1), s2.view(E, -1)


def check_fused_moe(device: torch.device, out: dict) -> None:
    g = torch.Generator().manual_seed(1)
    E, H, inter, T = 16, 1024, 512, 37
    x = torch.randn(T, H, generator=g).to(device, torch.bfloat16)
    ids = torch.randint(0, E, (T,), generator=g).to(device)
    for fp8 in (False, True) if fp8_supported(device) else (False,):
        weights = _stacked_experts(E, H, inter, device, fp8, g)
        row = {"weights": "fp8" if fp8 else "bf16"}
        row["max_rel_err"] = _rel_err(fused_moe(x, ids, *weights), _moe_oracle(x, ids, *weights))
        out["vs_oracle"].append(row)
        print(f"fused_moe {row}")
    # Maverick at TP 8: 128 experts, H 5120, I 8192 / 8; FP8 where the GPU has it
    E, H, inter = 128, 5120, 1024
    fp8 = fp8_supported(device)
    with torch.device(device):
        experts = RoutedExperts(E, H, inter, torch.bfloat16, fp8)
    w13, w2, s13, s2 = _stacked_experts(E, H, inter, device, fp8)
    experts.w13.copy_(w13)
    experts.w2.copy_(w2)
    if fp8:
        experts.w13_scale.copy_(s13)
        experts.w2_scale.copy_(s2)
    del w13, w2
    for T in (1, 8, 32, 64, 256, 1024, 4096):  # decode batches, then prefill chunks
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        ids = torch.randint(0, E, (T,), device=device)
        row = {"tokens": T, "weights": "fp8" if fp8 else "bf16"}
        # FP8: the gap is the eager path's e4m3 rounding of the activations (the kernel keeps them)
        row["vs_eager_rel_err"] = _rel_err(experts.forward_fixed_shape(x, ids), experts(x, ids))
        row["fused_us"] = _us(lambda x=x, ids=ids: experts.forward_fixed_shape(x, ids))
        row["eager_us"] = _us(lambda x=x, ids=ids: experts(x, ids))
        out["maverick_tp8"].append(row)
        print(f"fused_moe, Maverick TP 8 shapes {row}")


def check_forward_and_engine(model_dir: str, device: torch.device, out: dict) -> None:
    cuda = device.type == "cuda"
    variants = [("fp32 dequant", torch.float32, "dequant"), ("bf16 auto", torch.bfloat16, "auto")]
    if not cuda:  # the interpreter's tl.dot multiplies bf16 storage as integers
        variants = variants[:1]
    for name, dtype, experts in variants:
        model = load_model(model_dir, dtype=dtype, device=device, experts=experts)
        eager = fixed_shape_decode.decode_forward(model)
        row = {
            "fp8_experts": model.fp8_experts,
            "static_vs_reference_rel_err": _rel_err(eager["static"], eager["reference"]),
            "splits_vs_reference_rel_err": _rel_err(eager["splits"], eager["reference"]),
            "top1_equal": bool(torch.equal(eager["static"].argmax(-1), eager["reference"].argmax(-1))),
            "writes_only_new_slots_and_scratch": eager["static_written"]
            == sorted([*eager["new_token_slots"], eager["scratch_slot"]]),
        }
        if cuda:
            graph = fixed_shape_decode.decode_forward(model, use_graphs=True)
            row["graph_vs_eager_max_abs"] = (graph["static"] - eager["static"]).abs().max().item()
            row["graph_bitwise_equal"] = bool(torch.equal(graph["static"], eager["static"]))
        out["forward"][name] = row
        print(f"fixed-shape forward, {name}: {row}")
        del model
    if not cuda:
        print("engine tokens with CUDA graphs: skipped (needs CUDA)")
        return
    for name, dtype, experts in (("fp32 dequant", "float32", "dequant"), ("bf16 auto", "bfloat16", "auto")):
        ref, _ = fixed_shape_decode.engine_tokens(model_dir, "reference", str(device), dtype, experts)
        for moe_path in ("reference", "kernel"):  # the routed experts of prefill and mixed steps
            got, steps = fixed_shape_decode.engine_tokens(
                model_dir, "cuda_graph", str(device), dtype, experts, moe_path
            )
            equal = sum(a == b for r in ref for a, b in zip(ref[r], got[r], strict=True))
            row = {"equal_tokens": equal, "tokens": sum(map(len, ref.values())), "steps": steps}
            row["all_equal"] = got == ref
            out["engine_greedy"][f"{name}, moe_path {moe_path}"] = row
            print(f"engine greedy tokens, cuda_graph + moe_path {moe_path} vs reference, {name}: {row}")


DECODE_BS, DECODE_CTX, DECODE_MAX_B = 16, 200, 64  # block size, context per sequence, largest batch
DECODE_BATCHES = (1, 8, 32, 64)


def _decode_batch(B: int, device: torch.device, g: torch.Generator) -> tuple[DecodeBatch, dict]:
    """B sequences with DECODE_CTX tokens of context each, in disjoint blocks; the batch for
    CudaGraphRunner.run, and the same on the device for the reference forward."""
    bs, ctx = DECODE_BS, DECODE_CTX
    per_seq = -(-(ctx + 1) // bs)
    tables = torch.arange(B * per_seq, dtype=torch.int32).view(B, per_seq)
    pos = torch.full((B,), ctx, dtype=torch.long)
    batch = DecodeBatch(
        input_ids=torch.randint(0, 2000, (B,), generator=g).numpy(),
        positions=pos.numpy(),
        slot_mapping=(tables[:, ctx // bs].long() * bs + ctx % bs).numpy(),
        block_tables=tables.numpy(),
        seq_lens=(pos + 1).int().numpy(),
    )
    on_device = {
        "ids": torch.from_numpy(batch.input_ids).to(device),
        "positions": pos.to(device),
        "slots": torch.from_numpy(batch.slot_mapping).to(device),
        "tables": tables.to(device),
    }
    return batch, on_device


def _reference_step(model, kv, d: dict, B: int) -> torch.Tensor:
    meta = AttentionMetadata(d["slots"], d["tables"], [1] * B, [DECODE_CTX + 1] * B, DECODE_BS)  # per step
    return model.compute_logits(model(d["ids"], d["positions"], meta, kv))


def _decode_setup(model, kv_source: list | None = None):
    """(kv caches, CudaGraphRunner kwargs) for DECODE_MAX_B sequences; the caches random, or a copy
    (cast to the model's dtype) of kv_source."""
    per_seq = -(-(DECODE_CTX + 1) // DECODE_BS)
    num_blocks = DECODE_MAX_B * per_seq
    kv = model.allocate_kv_caches(num_blocks + 1, DECODE_BS)
    for i, (k, v) in enumerate(kv):
        if kv_source is None:
            k.normal_()
            v.normal_()
        else:
            k.copy_(kv_source[i][0])
            v.copy_(kv_source[i][1])
    common = dict(
        max_batch_size=DECODE_MAX_B, max_blocks_per_seq=per_seq, scratch_slot=num_blocks * DECODE_BS
    )
    return kv, common


def check_decode_steps(model_dir: str, device: torch.device, out: dict) -> None:
    """Decode steps at batch 1..64 over a random KV cache against an fp32 oracle (the reference
    path, fp32, dequantised experts): the fixed-shape path in fp32 must match it to rounding; in
    bf16 (FP8 experts where supported) both paths are compared with it, so the fixed-shape path's
    distance can be read against the bf16 reference path's own."""
    oracle = load_model(model_dir, dtype=torch.float32, device=device, experts="dequant")
    kv32, common = _decode_setup(oracle)
    runs = {"fp32 dequant": (oracle, kv32)}
    low = load_model(model_dir, dtype=torch.bfloat16, device=device)
    runs[f"bf16 {'fp8' if low.fp8_experts else 'bf16'} experts"] = (low, _decode_setup(low, kv32)[0])
    g = torch.Generator().manual_seed(3)
    for B in DECODE_BATCHES:
        batch, d = _decode_batch(B, device, g)
        exact = _reference_step(oracle, kv32, d, B).float()
        for name, (model, kv) in runs.items():
            static = CudaGraphRunner(model, kv, use_graphs=False, **common).run(batch).float()
            ref = _reference_step(model, kv, d, B).float()
            row = {"batch": B, "model": name}
            row["static_vs_fp32_rel_err"] = _rel_err(static, exact)
            row["reference_vs_fp32_rel_err"] = _rel_err(ref, exact)
            row["static_top1_vs_fp32"] = (static.argmax(-1) == exact.argmax(-1)).float().mean().item()
            row["reference_top1_vs_fp32"] = (ref.argmax(-1) == exact.argmax(-1)).float().mean().item()
            out["decode_step_accuracy"].append(row)
            print(f"decode step accuracy {row}")


def time_decode_steps(model_dir: str, device: torch.device, out: dict) -> None:
    """Decode-step times at batch 1..64, bf16 (FP8 experts where supported): reference path, the
    fixed-shape path eagerly, and CUDA-graph replay (which must equal the eager run bit for bit)."""
    model = load_model(model_dir, dtype=torch.bfloat16, device=device)
    kv, common = _decode_setup(model)
    t0 = time.perf_counter()
    graphs = CudaGraphRunner(model, kv, use_graphs=True, **common)
    out["graph_capture_s"] = time.perf_counter() - t0
    out["buckets"] = graphs.buckets
    eager = CudaGraphRunner(model, kv, use_graphs=False, **common)
    g = torch.Generator().manual_seed(2)
    for B in DECODE_BATCHES:
        batch, d = _decode_batch(B, device, g)
        row = {
            "batch": B,
            "graph_vs_eager_max_abs": (graphs.run(batch) - eager.run(batch)).abs().max().item(),
            "reference_ms": 1e-3 * _us(lambda d=d, B=B: _reference_step(model, kv, d, B)),
            "static_eager_ms": 1e-3 * _us(lambda batch=batch: eager.run(batch)),
            "cuda_graph_ms": 1e-3 * _us(lambda batch=batch: graphs.run(batch)),
        }
        out["decode_step"].append(row)
        print(f"decode step {row}")


def check_decode_path(model_dir: str, device: torch.device, report: dict) -> None:
    if not kernels_run_on(device):
        reason = f"the Triton kernels need CUDA (or TRITON_INTERPRET=1 on the CPU); the device is {device}"
        print(f"decode path checks: skipped ({reason})")
        report["decode_path"] = {"skipped": reason}
        return
    out: dict = {"attention": [], "fused_moe": {"vs_oracle": [], "maverick_tp8": []}, "forward": {}}
    out.update(engine_greedy={}, decode_step_accuracy=[], decode_step=[])
    report["decode_path"] = out
    if device.type != "cuda":
        print("kernel checks at Maverick's shapes and timings: skipped (need CUDA)")
    else:
        check_attention(device, out["attention"])
        check_fused_moe(device, out["fused_moe"])
    check_forward_and_engine(model_dir, device, out)
    if device.type == "cuda":
        check_decode_steps(model_dir, device, out)
        time_decode_steps(model_dir, device, out)
