"""Maverick "slice" benchmark: single decoder layers at their per-rank tensor-parallel-8 shapes on one
device, through the engine's own layers and kernels with random weights, projected to the whole model.

    .venv/bin/python scripts/bench_slice.py [--device auto|cuda|cpu] [--small] [--iters N] [--out DIR]
                                            [--cpu-threads N]
    make bench-slice [SLICE_ARGS="--small --device cpu"]

What decides the product's speed is one Maverick layer at TP 8 on an H100/H200, and one rank's layer
runs on one GPU: the script builds a `TextConfig` whose head counts, intermediate sizes and vocabulary
ARE one rank's (Maverick's / 8: 5 query heads, 1 KV head, experts 128 x 1024, dense MLP 2048, vocab
25256) and runs it on the single-rank `SINGLE` TensorParallel, whose all-reduce is a no-op. The
collectives are then added by a cost model (`CommModel`).

Measured, for a dense RoPE layer, a MoE RoPE layer and a MoE NoPE layer (one of each kind in the real
48-layer pattern, `layer_kinds`):
- decode at batch 1, 8, 32, 64 and context 1k, 8k (plus batch 64 at the projection's average
  context): on CUDA the served path, `DecodeMetadata` through the Triton kernels
  (`paged_decode_attention` with the runner's flash-decoding splits, `fused_moe` on FP8 experts)
  replayed from a CUDA graph as engine/cuda_graph.py captures it; on the CPU the same fixed-shape
  path with `torch_kernels=True` (kernels/torch_decode.py, eager: not torch.compile'd) on fp32
  weights (that path takes float experts only);
- prefill of one 1k and one 4k-token sequence on the reference path (`AttentionMetadata`: SDPA
  attention, grouped MoE; FP8 experts through `_scaled_mm` on CUDA), eager;
- the LM head (`Llama4Model.compute_logits`) at the decode batches, from a CUDA graph on CUDA.

Each case: the median over --iters timed runs after warm-up (CUDA: events around each run, the L2
cache flushed before each one, since the real model streams 48 different layers through it), the
bytes and FLOPs it must move and do by formula, and, on a GPU the `GPU_SPECS` table knows, the
achieved share of HBM bandwidth and of the tensor-core peak. Results: DIR/slice.json, DIR/slice.md
(printed too). `--small` shrinks every dimension (hidden 256, 4 experts, ...) with the same structure,
so a CPU run takes seconds: its numbers check the script, they project nothing.

Projection to the whole model at TP 8 (`project_step`, `project_throughput`): a decode step is
24 t_dense + 12 t_moe + 12 t_nope + t_lm_head, plus 97 all-reduces of [B, 5120] bf16 (2 per layer
and the vocab-parallel embedding's) and one all-gather of the [B, 202048] bf16 logits, each
collective priced by `CommModel` (alpha + bytes at NCCL bus bandwidth: assumptions, printed). Output
tokens/s at concurrency 64 with 1000 in / 1000 out: steps at B = 64 and the mean context 1500
(measured), plus each request's 1k-token prefill amortised over its outputs, against vLLM's
published 3,164 tokens/s (`VLLM_REFERENCE`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from maverick.config import TextConfig
from maverick.engine.cuda_graph import decode_splits, kernels_run_on
from maverick.layers.attention import AttentionMetadata, DecodeMetadata, allocate_kv_caches
from maverick.layers.fp8 import FP8_DTYPE, fp8_supported
from maverick.layers.parallel import SINGLE, TensorParallel
from maverick.layers.rope import PositionTables
from maverick.models.llama4 import DecoderLayer, Llama4Model
from maverick.plan import MAVERICK_FP8

ROOT = Path(__file__).resolve().parent.parent
L2_FLUSH_BYTES = 256 << 20  # written before each timed CUDA run: more than any GPU's L2 (H100: 50 MB)
BF16_BYTES = 2  # activations on the wire: the served model runs in bf16


# -- hardware and the cost model ------------------------------------------------------------------
@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes_per_s: float
    fp8_flops: float  # dense tensor-core peak (no sparsity)
    bf16_flops: float
    nvlink_bytes_per_s: float
    source: str


GPU_SPECS = (
    GpuSpec("H100 SXM", 3.35e12, 1979e12, 989e12, 900e9, "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
    GpuSpec("H200 SXM", 4.8e12, 1979e12, 989e12, 900e9, "NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
)


def detect_gpu(device: torch.device) -> GpuSpec | None:
    """The spec of this GPU by `torch.cuda.get_device_name`, or None (the CPU, other GPUs; the PCIe
    and NVL variants have other peaks and are not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "PCIe" in name or "NVL" in name or "MIG" in name:  # other peaks, or a slice of the GPU
        return None
    words = name.replace("-", " ").split()
    return next((s for s in GPU_SPECS if s.name.split()[0] in words), None)  # "H200", not "GH200"


@dataclass(frozen=True)
class CommModel:
    """Collective cost between the TP ranks (an assumption, not a measurement): a ring of `ranks`,
    each collective `alpha_s` of latency plus its bytes at NCCL's bus bandwidth (bus bandwidth is
    NCCL's per-link figure: an all-reduce of S bytes moves 2(n-1)/n S per rank, an all-gather of an
    S-byte result (n-1)/n S)."""

    ranks: int = 8
    alpha_s: float = 10e-6
    bus_bytes_per_s: float = 360e9
    source: str = (
        "assumption: alpha 10 us per collective; NCCL bus bandwidth 360 GB/s on NVLink 4 "
        "(900 GB/s per GPU, bidirectional)"
    )

    def all_reduce_s(self, nbytes: float) -> float:
        n = self.ranks
        return self.alpha_s + 2 * (n - 1) / n * nbytes / self.bus_bytes_per_s

    def all_gather_s(self, result_bytes: float) -> float:
        n = self.ranks
        return self.alpha_s + (n - 1) / n * result_bytes / self.bus_bytes_per_s


VLLM_REFERENCE = {
    "output_tokens_per_s": 3164.0,
    "setup": "Llama 4 Maverick FP8 on 8x H100",
    "provenance": "vLLM's published number, as cited in the project's issue",
}


# -- what is built and measured -----------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    tp: int
    cfg: TextConfig  # ONE RANK's sizes: heads, KV heads, intermediates and vocab already divided by tp
    full_vocab: int  # the whole vocabulary (the logits all-gather)
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]  # tokens in each sequence's cache after the step
    prefill_lens: tuple[int, ...]  # one sequence's prompt
    block_size: int  # the engine's default
    concurrency: int  # the throughput projection: requests in flight ...
    input_tokens: int  # ... each with this prompt ...
    output_tokens: int  # ... and this many output tokens

    @property
    def avg_context(self) -> int:
        """A request's mean context over its decode steps: input + output / 2."""
        return self.input_tokens + self.output_tokens // 2


def rank_text_config(text: dict, tp: int) -> TextConfig:
    """The per-rank TextConfig of a full-model text config: the dimensions TP splits (maverick's own
    rules, TensorParallel.divide / kv_heads) divided by tp, the rest (layer pattern, chunk) as is."""
    parallel = TensorParallel(size=tp)
    kv_heads, _ = parallel.kv_heads(text["num_key_value_heads"], text["num_attention_heads"])
    rank = {
        **text,
        "num_attention_heads": parallel.divide(text["num_attention_heads"], "num_attention_heads"),
        "num_key_value_heads": kv_heads,
        "intermediate_size": parallel.divide(text["intermediate_size"], "intermediate_size"),
        "intermediate_size_mlp": parallel.divide(text["intermediate_size_mlp"], "intermediate_size_mlp"),
        "vocab_size": parallel.divide(text["vocab_size"], "vocab_size"),
    }
    return TextConfig.from_dict(rank)


def maverick_workload() -> Workload:
    """Llama 4 Maverick 17B-128E (maverick/plan.py's copy of its config.json) at TP 8."""
    text = MAVERICK_FP8["text_config"]
    return Workload(
        name="maverick-tp8",
        tp=8,
        cfg=rank_text_config(text, 8),
        full_vocab=text["vocab_size"],
        decode_batches=(1, 8, 32, 64),
        decode_contexts=(1024, 8192),
        prefill_lens=(1024, 4096),
        block_size=16,
        concurrency=64,
        input_tokens=1000,
        output_tokens=1000,
    )


def small_workload() -> Workload:
    """Every dimension shrunk, the structure kept: 5 query heads and 1 KV head per rank, 48 layers in
    Maverick's pattern, the larger decode context one whole chunk, both prefills inside one chunk."""
    text = {
        **MAVERICK_FP8["text_config"],
        "hidden_size": 256,
        "head_dim": 32,  # a power of two >= 16, as the Triton decode kernel needs
        "num_local_experts": 4,
        "intermediate_size": 8 * 32,
        "intermediate_size_mlp": 8 * 64,
        "vocab_size": 8 * 512,
        "attention_chunk_size": 256,
    }
    return dataclasses.replace(
        maverick_workload(),
        name="small",
        cfg=rank_text_config(text, 8),
        full_vocab=text["vocab_size"],
        decode_contexts=(64, 256),
        prefill_lens=(32, 128),
        input_tokens=32,
        output_tokens=32,
    )


@dataclass(frozen=True)
class LayerKind:
    key: str  # "dense" | "moe" | "nope"
    label: str
    index: int  # the first layer of this kind in the model: the one built
    count: int  # the model's layers of this kind


def layer_kinds(cfg: TextConfig) -> tuple[LayerKind, ...]:
    """Maverick's three kinds of layer from the config's own pattern (moe_layers: every 2nd;
    no_rope_layers: every 4th is NoPE, and those are all MoE layers). Any other combination (a dense
    NoPE layer) is not Maverick's and has no slice here."""
    kinds = {
        (False, True): ("dense", "dense RoPE"),
        (True, True): ("moe", "MoE RoPE"),
        (True, False): ("nope", "MoE NoPE"),
    }
    layers: dict[tuple[bool, bool], list[int]] = {k: [] for k in kinds}
    for i in range(cfg.num_hidden_layers):
        key = (cfg.is_moe(i), cfg.uses_rope(i))
        if key not in layers:
            raise ValueError(f"layer {i}: {'MoE' if key[0] else 'dense'} NoPE is not a Maverick layer kind")
        layers[key].append(i)
    return tuple(LayerKind(*kinds[k], idx[0], len(idx)) for k, idx in layers.items() if idx)


# -- bytes and FLOPs by formula -----------------------------------------------------------------
def expected_experts(num_experts: int, tokens: int) -> float:
    """E_B = E * (1 - (1 - 1/E)^B): distinct experts that B tokens touch in expectation when each
    is routed top-1 to one of E experts uniformly at random (each expert is missed by all B tokens
    with probability (1 - 1/E)^B). E_1 = 1; E_64 ~ 50.5 of 128."""
    return num_experts * (1.0 - (1.0 - 1.0 / num_experts) ** tokens)


@dataclass(frozen=True)
class WeightBytes:
    """One layer's parameters in bytes: `always` is read by every step whatever the routing
    (attention q/k/v/o, two norms, dense MLP or router + shared expert); `per_expert` is one routed
    expert's w13 + w2 (+ FP8 row scales), read only when a token is routed to it."""

    always: int
    per_expert: int
    num_experts: int

    @property
    def total(self) -> int:
        return self.always + self.per_expert * self.num_experts

    def read_by(self, tokens: int, experts: float | None = None) -> float:
        """Bytes a step of `tokens` tokens reads: `experts` routed experts (measured), by default
        those it touches in expectation (E_B)."""
        if experts is None:
            experts = expected_experts(self.num_experts, tokens) if self.num_experts else 0.0
        return self.always + self.per_expert * experts


def layer_weight_bytes(cfg: TextConfig, moe: bool, act_bytes: int, fp8_experts: bool) -> WeightBytes:
    """Per rank (cfg is one rank's): H hidden, D head_dim, heads/kv_heads, I expert and I_mlp dense
    intermediate, E experts. Dense weights and the router in the activation dtype; routed experts
    FP8 (1 byte + one fp32 scale per output row: w13 2I rows, w2 H rows) or in that dtype."""
    H, D, E = cfg.hidden_size, cfg.head_dim, cfg.num_local_experts
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    I, I_mlp = cfg.intermediate_size, cfg.intermediate_size_mlp  # noqa: E741
    attention = (H * (heads + 2 * kv) * D + heads * D * H) * act_bytes  # qkv_proj [(h+2kv)D, H], o_proj
    norms = 2 * H * act_bytes  # input_layernorm, post_attention_layernorm
    if not moe:
        return WeightBytes(attention + norms + 3 * H * I_mlp * act_bytes, 0, 0)  # gate_up [2I, H], down
    router = E * H * act_bytes
    shared = 3 * H * I * act_bytes
    per_expert = 3 * H * I * (1 if fp8_experts else act_bytes) + ((2 * I + H) * 4 if fp8_experts else 0)
    return WeightBytes(attention + norms + router + shared, per_expert, E)


def lm_head_bytes(cfg: TextConfig, act_bytes: int) -> int:
    return cfg.vocab_size * cfg.hidden_size * act_bytes  # [vocab shard, H]


def kv_bytes_per_token(cfg: TextConfig, kv_bytes: int) -> int:
    """K and V of one token in one layer on one rank."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * kv_bytes


def keys_seen(cfg: TextConfig, layer: int, position: int) -> int:
    """Keys the query at `position` attends to: its whole history on NoPE layers, its own chunk's
    part on RoPE layers (Llama 4's absolute chunks: at most attention_chunk_size keys)."""
    if not cfg.uses_rope(layer):
        return position + 1
    return position % cfg.attention_chunk_size + 1


@dataclass(frozen=True)
class Work:
    bytes: float  # weights read + KV read and written (activations, small at decode, not counted)
    flops: float  # 2*M*N*K per GEMM, 4*queries*keys*heads*D for attention (QK^T and PV)
    flops_fp8: float  # the part of `flops` on the FP8 tensor cores (the rest at the bf16 peak)


def _gemm_flops(cfg: TextConfig, moe: bool, tokens: int) -> tuple[float, float]:
    """(all GEMM FLOPs of `tokens` tokens through one layer, of which the routed experts')."""
    H, D, E = cfg.hidden_size, cfg.head_dim, cfg.num_local_experts
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    proj = 2 * tokens * H * (heads + 2 * kv) * D + 2 * tokens * heads * D * H  # qkv, o
    if not moe:
        return proj + 2 * tokens * 3 * H * cfg.intermediate_size_mlp, 0.0
    routed = 2 * tokens * 3 * H * cfg.intermediate_size  # top-1: one expert per token
    return proj + 2 * tokens * H * E + 2 * tokens * 3 * H * cfg.intermediate_size + routed, routed


def decode_work(
    cfg: TextConfig,
    layer: int,
    batch: int,
    context: int,
    act_bytes: int,
    fp8: bool,
    experts: float | None = None,
) -> Work:
    """A decode step of `batch` sequences, each at `context` tokens after the step, its routed
    experts `experts` (default E_B). The fixed-shape MoE kernel dequantises FP8 weights and
    multiplies in bf16: no FP8 tensor-core FLOPs."""
    moe = cfg.is_moe(layer)
    keys = keys_seen(cfg, layer, context - 1)
    gemm, _ = _gemm_flops(cfg, moe, batch)
    attention = 4 * batch * keys * cfg.num_attention_heads * cfg.head_dim
    kv = batch * (keys + 1) * kv_bytes_per_token(cfg, act_bytes)  # read the window, write the new token
    weights = layer_weight_bytes(cfg, moe, act_bytes, fp8).read_by(batch, experts)
    return Work(weights + kv, gemm + attention, 0.0)


def prefill_work(cfg: TextConfig, layer: int, tokens: int, act_bytes: int, fp8: bool) -> Work:
    """One sequence's `tokens`-token prompt: causal attention (query i sees keys_seen(i) keys), K/V
    written once and gathered once; FP8 experts run through `_scaled_mm` (FP8 FLOPs)."""
    moe = cfg.is_moe(layer)
    gemm, routed = _gemm_flops(cfg, moe, tokens)
    pairs = sum(keys_seen(cfg, layer, i) for i in range(tokens))
    attention = 4 * pairs * cfg.num_attention_heads * cfg.head_dim
    kv = 2 * tokens * kv_bytes_per_token(cfg, act_bytes)
    weights = layer_weight_bytes(cfg, moe, act_bytes, fp8).read_by(tokens)
    return Work(weights + kv, gemm + attention, routed if fp8 else 0.0)


def lm_head_work(cfg: TextConfig, batch: int, act_bytes: int) -> Work:
    return Work(lm_head_bytes(cfg, act_bytes), 2 * batch * cfg.hidden_size * cfg.vocab_size, 0.0)


# -- building the modules -----------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # activations, dense weights, router, KV cache
    fp8_experts: bool  # routed experts FP8 e4m3 with per-row fp32 scales

    @property
    def act_bytes(self) -> int:
        return self.dtype.itemsize

    @property
    def experts(self) -> str:
        return (
            "fp8 e4m3 + per-row fp32 scales" if self.fp8_experts else str(self.dtype).removeprefix("torch.")
        )


def build_layer(
    cfg: TextConfig, layer: int, precision: Precision, device: torch.device | str
) -> DecoderLayer:
    """The engine's DecoderLayer for `layer` on one rank (cfg is one rank's), uninitialised."""
    with torch.device(device):
        return DecoderLayer(cfg, layer, precision.dtype, precision.fp8_experts, SINGLE)


def build_lm_head(cfg: TextConfig, precision: Precision, device: torch.device | str) -> nn.Linear:
    """CausalLM's lm_head on one rank: [vocab shard, H]."""
    with torch.device(device):
        return nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=precision.dtype)


@torch.no_grad()
def randomize_(module: nn.Module) -> nn.Module:
    """Random weights of realistic scale (unit-variance activations, finite in bf16): matrices
    N(0, 1/fan_in), norms 1, FP8 experts N(0, 1) in e4m3 with scale 1/sqrt(fan_in). With a random
    router every expert is equally likely, as E_B assumes."""
    params = dict(module.named_parameters())
    for name, p in params.items():
        if p.dtype == FP8_DTYPE:
            for e in range(p.shape[0]):  # one expert at a time: a float copy of all would be GBs
                p[e].copy_(torch.randn(p.shape[1:], device=p.device, dtype=torch.bfloat16).to(FP8_DTYPE))
        elif name.endswith("_scale"):
            p.fill_(params[name.removesuffix("_scale")].shape[-1] ** -0.5)
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, p.shape[-1] ** -0.5)
    return module


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# -- timing ------------------------------------------------------------------------------------
class Timer:
    """Median seconds per run after `warmup` runs. CUDA: events around each run (GPU time, no host
    sync in the loop), the L2 cache flushed before each; `graph=True` captures the run into a CUDA
    graph first (warm-up on a side stream, as CudaGraphRunner.capture does) and times its replays."""

    def __init__(self, device: torch.device, iters: int, warmup: int = 2):
        self.device, self.iters, self.warmup = device, iters, warmup
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None

    def __call__(self, fn: Callable[[], object], graph: bool = False) -> float:
        with torch.inference_mode():
            if graph and self.cuda:
                return self._time(self._capture(fn).replay)
            for _ in range(self.warmup):
                fn()
            return self._time(fn)

    def _capture(self, fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # Triton compiles its kernels, the allocator warms up
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize(self.device)
        g.replay()  # one untimed replay
        return g

    def _time(self, run: Callable[[], object]) -> float:
        if not self.cuda:
            times = []
            for _ in range(self.iters):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        for _ in range(self.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.flush.zero_()
            self.flush.sum()  # read back: L2 left holding clean lines, nothing to write back in the timing
            start.record()
            run()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) / 1e3 for s, e in events)


# -- the cases ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    section: str  # "decode" | "prefill" | "lm_head"
    layer: str  # LayerKind.key, or "lm_head"
    tokens: int  # decode, lm_head: the batch B; prefill: the prompt's tokens
    context: int  # decode: tokens per sequence after the step; prefill: = tokens; lm_head: 0
    keys: int  # decode: keys each query reads; prefill: keys of the last query; lm_head: 0
    time_s: float
    bytes: float
    flops: float
    flops_fp8: float
    experts_expected: float | None = None  # E_B (MoE layers)
    experts_hit: int | None = None  # distinct experts the router chose for this input


def _paged_kv(cfg: TextConfig, wl: Workload, seqs: int, context: int, precision: Precision, device):
    """One layer's paged cache holding `seqs` sequences of `context` tokens each (random K/V), their
    block tables [seqs, ceil(context / block_size)] (sequence s owns a contiguous run of blocks)."""
    bs = wl.block_size
    width = -(-context // bs)
    kv = allocate_kv_caches(
        1, seqs * width, bs, cfg.num_key_value_heads, cfg.head_dim, precision.dtype, device
    )
    for t in kv[0]:
        t.normal_()
    tables = torch.arange(seqs * width, dtype=torch.int32, device=device).view(seqs, width)
    return kv[0], tables


def _experts_hit(layer: DecoderLayer, x: torch.Tensor, tables, meta, kv) -> int:
    """Distinct experts the router picks in the layer's forward of x [T, H] (its input: the
    post-attention norm of x plus the attention's output, as DecoderLayer.forward computes it)."""
    with torch.inference_mode():
        h = x + layer.self_attn(layer.input_layernorm(x), tables, meta, kv)
        ids, _ = layer.feed_forward.router(layer.post_attention_layernorm(h))
    return int(ids.unique().numel())


def measure_decode(
    layer: DecoderLayer, kind: LayerKind, wl: Workload, batch: int, context: int, precision: Precision, timer
) -> Row:
    """One decode step of `batch` sequences at `context` tokens: the fixed-shape DecodeMetadata
    path (CUDA: Triton kernels in a CUDA graph; CPU: torch_kernels, eager). x [B, H]; the new
    token of each row is at position context - 1, its K/V written to its slot."""
    cfg, device = wl.cfg, timer.device
    kv, tables = _paged_kv(cfg, wl, batch, context, precision, device)
    pos = context - 1
    positions = torch.full((batch,), pos, dtype=torch.long, device=device)
    meta = DecodeMetadata(
        slot_mapping=(tables[:, pos // wl.block_size].long() * wl.block_size + pos % wl.block_size),
        block_tables=tables,  # [B, width]: just the batch's columns (what torch_kernels needs)
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        num_splits=decode_splits(batch, cfg.num_key_value_heads, device),  # as CudaGraphRunner picks
        torch_kernels=device.type != "cuda",
    )
    # RoPE/temperature tables are built once per step for all 48 layers (TextModel.forward): not timed
    pos_tables = PositionTables.build(positions, cfg)
    x = torch.randn(batch, cfg.hidden_size, dtype=precision.dtype, device=device)
    seconds = timer(lambda: layer(x, pos_tables, meta, kv), graph=True)
    moe = cfg.is_moe(kind.index)
    hit = _experts_hit(layer, x, pos_tables, meta, kv) if moe else None
    # the bytes this step read: the experts its tokens were routed to (E_B, the expectation, beside)
    work = decode_work(cfg, kind.index, batch, context, precision.act_bytes, precision.fp8_experts, hit)
    return Row(
        "decode",
        kind.key,
        batch,
        context,
        keys_seen(cfg, kind.index, pos),
        seconds,
        work.bytes,
        work.flops,
        work.flops_fp8,
        expected_experts(cfg.num_local_experts, batch) if moe else None,
        hit,
    )


def measure_prefill(
    layer: DecoderLayer, kind: LayerKind, wl: Workload, tokens: int, precision: Precision, timer
) -> Row:
    """One sequence's whole prompt on the reference path: AttentionMetadata (host-planned SDPA),
    grouped MoE, eager. The attention plan is built once per step and shared by every layer of its
    kind in the engine: built in the warm-up here, not timed."""
    cfg, device = wl.cfg, timer.device
    kv, tables = _paged_kv(cfg, wl, 1, tokens, precision, device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(tokens, device=device),  # the blocks are 0.. in order
        block_tables=tables,
        query_lens=[tokens],
        seq_lens=[tokens],
        block_size=wl.block_size,
    )
    pos_tables = PositionTables.build(torch.arange(tokens, device=device), cfg)
    x = torch.randn(tokens, cfg.hidden_size, dtype=precision.dtype, device=device)
    seconds = timer(lambda: layer(x, pos_tables, meta, kv))
    moe = cfg.is_moe(kind.index)
    hit = _experts_hit(layer, x, pos_tables, meta, kv) if moe else None
    work = prefill_work(cfg, kind.index, tokens, precision.act_bytes, precision.fp8_experts)
    return Row(
        "prefill",
        kind.key,
        tokens,
        tokens,
        keys_seen(cfg, kind.index, tokens - 1),
        seconds,
        work.bytes,
        work.flops,
        work.flops_fp8,
        expected_experts(cfg.num_local_experts, tokens) if moe else None,
        hit,
    )


def measure_lm_head(head: nn.Linear, wl: Workload, batch: int, precision: Precision, timer) -> Row:
    """Llama4Model.compute_logits on one rank (its all-gather a no-op on SINGLE): hidden [B, H] ->
    fp32 logits [B, vocab shard]; from a CUDA graph on CUDA, as the served decode step captures it."""
    holder = types.SimpleNamespace(tp=SINGLE, language_model=types.SimpleNamespace(lm_head=head))
    hidden = torch.randn(batch, wl.cfg.hidden_size, dtype=precision.dtype, device=timer.device)
    seconds = timer(lambda: Llama4Model.compute_logits(holder, hidden), graph=True)
    work = lm_head_work(wl.cfg, batch, precision.act_bytes)
    return Row("lm_head", "lm_head", batch, 0, 0, seconds, work.bytes, work.flops, work.flops_fp8)


def decode_cases(wl: Workload) -> list[tuple[int, int]]:
    """(batch, context): the grid, then the throughput projection's point (concurrency, avg context)."""
    grid = [(b, c) for c in wl.decode_contexts for b in wl.decode_batches]
    point = (wl.concurrency, wl.avg_context)
    return grid + ([point] if point not in grid else [])


def run_cases(
    wl: Workload, precision: Precision, timer: Timer, log=print, failures: list | None = None
) -> list[Row]:
    """Every case; one that fails (a GPU run gets one try) is logged into `failures` and the rest
    go on, so that what did run is reported."""
    rows: list[Row] = []
    failures = [] if failures is None else failures

    def failed(label: str, e: Exception) -> None:
        failures.append({"case": label, "error": f"{type(e).__name__}: {e}"})
        log(f"  {label}: FAILED {type(e).__name__}: {e}")

    def attempt(label: str, measure: Callable[..., Row], *args) -> None:
        try:
            rows.append(measure(*args))
        except Exception as e:  # noqa: BLE001 - recorded, reported, and the next case runs
            return failed(label, e)
        log(f"  {label}: {rows[-1].time_s * 1e6:10.1f} us")

    for kind in layer_kinds(wl.cfg):
        try:
            layer = randomize_(build_layer(wl.cfg, kind.index, precision, timer.device))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the other kinds still run
            failed(f"build {kind.label}", e)
            continue
        for batch, context in decode_cases(wl):
            label = f"decode  {kind.label:<10} B={batch:<3} context={context:<5}"
            attempt(label, measure_decode, layer, kind, wl, batch, context, precision, timer)
        for tokens in wl.prefill_lens:
            label = f"prefill {kind.label:<10} tokens={tokens:<5}"
            attempt(label, measure_prefill, layer, kind, wl, tokens, precision, timer)
        del layer
    head = randomize_(build_lm_head(wl.cfg, precision, timer.device))
    for batch in wl.decode_batches:
        attempt(f"lm_head B={batch:<3}", measure_lm_head, head, wl, batch, precision, timer)
    return rows


# -- derived figures and the projection -------------------------------------------------------
def metrics(row: Row, gpu: GpuSpec | None) -> dict:
    """Achieved bandwidth and FLOP/s; on a known GPU their share of its peaks. The tensor-core
    share is (the time the FLOPs take at the peak of their precision) / measured time."""
    out = {"bandwidth_bytes_per_s": row.bytes / row.time_s, "flops_per_s": row.flops / row.time_s}
    out["hbm_pct"] = out["tc_pct"] = None
    if gpu is not None:
        ideal = (row.flops - row.flops_fp8) / gpu.bf16_flops + row.flops_fp8 / gpu.fp8_flops
        out["hbm_pct"] = 100 * out["bandwidth_bytes_per_s"] / gpu.hbm_bytes_per_s
        out["tc_pct"] = 100 * ideal / row.time_s
    return out


@dataclass(frozen=True)
class StepProjection:
    """One decode step of the whole model on each TP rank:
    sum over kinds(count * t_layer) + t_lm_head + (2 * layers + 1) all-reduces of [B, H] bf16
    (attention and MLP/MoE per layer, plus the vocab-parallel embedding's) + the all-gather of the
    [B, vocab] bf16 logits (compute_logits)."""

    batch: int
    context: int
    layers_s: float
    lm_head_s: float
    all_reduces: int
    all_reduce_s: float  # all of them
    logits_gather_s: float
    step_s: float
    tokens_per_s: float  # batch / step_s


def project_step(
    rows: list[Row], wl: Workload, comm: CommModel, batch: int, context: int, tokens: int | None = None
) -> StepProjection:
    """`tokens` rows in the step's collectives (default: batch; a prefill: its prompt)."""
    t = {(r.section, r.layer, r.tokens, r.context): r.time_s for r in rows}
    layers = sum(k.count * t["decode", k.key, batch, context] for k in layer_kinds(wl.cfg))
    n_ar = 2 * wl.cfg.num_hidden_layers + 1
    ar = n_ar * comm.all_reduce_s((tokens or batch) * wl.cfg.hidden_size * BF16_BYTES)
    gather = comm.all_gather_s(batch * wl.full_vocab * BF16_BYTES)
    lm = t["lm_head", "lm_head", batch, 0]
    step = layers + lm + ar + gather
    return StepProjection(batch, context, layers, lm, n_ar, ar, gather, step, batch / step)


@dataclass(frozen=True)
class Throughput:
    """Output tokens/s at `concurrency` requests in flight, each `input_tokens` in and
    `output_tokens` out: every request's output comes from decode steps at B = concurrency and the
    average context, and its prompt's prefill is paid once (amortised over its outputs):
    tokens/s = C * out / (out * t_step + C * t_prefill)."""

    concurrency: int
    input_tokens: int
    output_tokens: int
    avg_context: int
    step_s: float
    prefill_s: float  # one request's prompt: layers (scaled from the measured length), collectives
    prefill_measured_tokens: int
    total_s: float
    output_tokens_per_s: float
    decode_only_tokens_per_s: float
    reference_tokens_per_s: float
    ratio_to_reference: float


def project_prefill(rows: list[Row], wl: Workload, comm: CommModel) -> tuple[float, int]:
    """One request's prefill of input_tokens: the smallest measured prompt length n >= input (else
    the largest), layer times scaled by input / n; + lm_head of one row + its collectives."""
    n = min((p for p in wl.prefill_lens if p >= wl.input_tokens), default=max(wl.prefill_lens))
    t = {(r.section, r.layer, r.tokens): r.time_s for r in rows if r.section != "decode"}
    layers = sum(k.count * t["prefill", k.key, n] for k in layer_kinds(wl.cfg)) * wl.input_tokens / n
    n_ar = 2 * wl.cfg.num_hidden_layers + 1
    ar = n_ar * comm.all_reduce_s(wl.input_tokens * wl.cfg.hidden_size * BF16_BYTES)
    gather = comm.all_gather_s(wl.full_vocab * BF16_BYTES)  # the last position's logits only
    return layers + t["lm_head", "lm_head", 1] + ar + gather, n


def project_throughput(rows: list[Row], wl: Workload, comm: CommModel) -> Throughput:
    step = project_step(rows, wl, comm, wl.concurrency, wl.avg_context)
    prefill, n = project_prefill(rows, wl, comm)
    total = wl.output_tokens * step.step_s + wl.concurrency * prefill
    tps = wl.concurrency * wl.output_tokens / total
    ref = VLLM_REFERENCE["output_tokens_per_s"]
    return Throughput(
        wl.concurrency,
        wl.input_tokens,
        wl.output_tokens,
        wl.avg_context,
        step.step_s,
        prefill,
        n,
        total,
        tps,
        step.tokens_per_s,
        ref,
        tps / ref,
    )


# -- report ------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
        *("| " + " | ".join(cells) + " |" for cells in lines),
    ]


def _rate_cells(r: dict) -> list[str]:
    """time, MB, achieved bandwidth and FLOP/s and their shares of the GPU's peaks."""
    return [
        f"{r['time_s'] * 1e6:.1f}",
        f"{r['bytes'] / 1e6:.2f}",
        f"{r['bandwidth_bytes_per_s'] / 1e9:.1f}",
        _pct(r["hbm_pct"]),
        f"{r['flops_per_s'] / 1e12:.3f}",
        _pct(r["tc_pct"]),
    ]


RATE_HEAD = ["time us", "MB", "GB/s", "% HBM", "TFLOP/s", "% TC peak"]


def _md_header(result: dict) -> list[str]:
    m, wl, s, gpu = result["meta"], result["workload"], result["meta"]["shapes"], result["meta"]["gpu"]
    spec = f"{gpu['name']} ({gpu['source']})" if gpu else "none, so the % of peak columns are n/a"
    note = f" ({m['experts_note']})" if m["experts_note"] else ""
    return [
        f"# Maverick slice benchmark ({wl['name']})",
        "",
        f"- device: {m['device_name']} ({m['device']}); GPU spec: {spec}",
        f"- dtype {m['dtype']}; routed experts {m['experts']}{note}",
        f"- decode path: {m['decode_path']}",
        f"- prefill path: {m['prefill_path']}",
        f"- one rank at TP {wl['tp']}: hidden {s['hidden']}, {s['heads']} query heads and {s['kv_heads']} "
        f"KV head of {s['head_dim']}, {s['experts']} experts x {s['expert_inter']}, dense MLP "
        f"{s['mlp_inter']}, vocab shard {s['vocab']}, chunk {s['chunk']}",
        f"- time: median of {m['iters']} runs after warm-up ({m['timing']})",
        *(f"- {name}: {text}" for name, text in result["formulas"].items()),
        "",
    ]


def _md_layers(result: dict, section: str) -> list[str]:
    """Decode or prefill rows: one per layer kind and case."""
    kinds = {k["key"]: k["label"] for k in result["layer_kinds"]}
    avg = result["workload"]["avg_context"]
    lines = []
    for r in (r for r in result["rows"] if r["section"] == section):
        hit = "" if r["experts_expected"] is None else f"{r['experts_expected']:.1f} ({r['experts_hit']})"
        case = [str(r["tokens"]), str(r["context"]) + (" (proj.)" if r["context"] == avg else "")]
        if section == "prefill":
            case = case[:1]
        lines.append([kinds[r["layer"]], *case, str(r["keys"]), hit, *_rate_cells(r)])
    head = ["layer", "B", "context"] if section == "decode" else ["layer", "tokens"]
    title = {"decode": "Decode step, one layer", "prefill": "Prefill of one sequence, one layer"}[section]
    return [f"## {title}", "", *_table([*head, "keys", "E_B (hit)", *RATE_HEAD], lines), ""]


def _md_lm_head(result: dict) -> list[str]:
    lines = [[str(r["tokens"]), *_rate_cells(r)] for r in result["rows"] if r["section"] == "lm_head"]
    return ["## LM head (compute_logits), one rank", "", *_table(["B", *RATE_HEAD], lines), ""]


def _md_projection(result: dict) -> list[str]:
    wl, p, comm = result["workload"], result["projection"], result["assumptions"]["comm"]
    counts = " + ".join(f"{k['count']}*t_{k['key']}" for k in result["layer_kinds"])
    if not p["steps"] or p["throughput"] is None:
        return ["## Projection", "", "Not made: a case it needs failed (see Failures).", ""]
    n_ar = p["steps"][0]["all_reduces"]
    lines = [
        [
            str(s["batch"]),
            str(s["context"]),
            *(f"{s[k] * 1e3:.3f}" for k in ("layers_s", "lm_head_s", "all_reduce_s", "logits_gather_s")),
            f"{s['step_s'] * 1e3:.3f}",
            f"{s['tokens_per_s']:.0f}",
        ]
        for s in p["steps"]
    ]
    head = ["B", "context", "layers ms", "lm_head ms", "all-reduces ms", "gather ms", "step ms", "tokens/s"]
    t, ref = p["throughput"], result["reference"]
    n = t["prefill_measured_tokens"]
    out = [
        f"## Projection: one decode step of the whole model at TP {wl['tp']}",
        "",
        f"step = {counts} + t_lm_head + {n_ar} all-reduces of B*hidden*2 bytes (2 per layer, 1 for the "
        "embedding) + 1 all-gather of the logits, B*vocab*2 bytes",
        "",
        f"all-reduce = alpha + 2(n-1)/n * bytes / busbw; all-gather = alpha + (n-1)/n * bytes / busbw; "
        f"n = {comm['ranks']}, alpha = {comm['alpha_s'] * 1e6:.0f} us, "
        f"busbw = {comm['bus_bytes_per_s'] / 1e9:.0f} GB/s ({comm['source']})",
        "",
        *_table(head, lines),
        "",
        f"## Projection: concurrency {t['concurrency']}, {t['input_tokens']} in / {t['output_tokens']} out",
        "",
        f"tokens/s = C*out / (out*t_step(B={t['concurrency']}, context={t['avg_context']}) + C*t_prefill), "
        f"t_prefill = the {n}-token prefill's layers x {t['input_tokens']}/{n} + lm_head(B=1) "
        "+ its collectives",
        "",
        f"- decode step: {t['step_s'] * 1e3:.3f} ms "
        f"({t['decode_only_tokens_per_s']:.0f} tokens/s, decode only)",
        f"- prefill per request: {t['prefill_s'] * 1e3:.2f} ms",
        f"- **projected output tokens/s: {t['output_tokens_per_s']:.0f}**",
        f"- reference: {ref['output_tokens_per_s']:.0f} output tokens/s, {ref['setup']} "
        f"({ref['provenance']}); ratio {t['ratio_to_reference']:.2f}",
        "",
        "Not counted, so the projection is an upper bound: sampling on rank 0 (a sort over the "
        "vocabulary with top-p/top-k), the host's scheduling and step preparation, mixed "
        "prefill + decode steps running on the reference path, and the FP8 prefill's per-layer "
        "max all-reduce of the activation scales. The all-reduce latency alpha alone is "
        f"{n_ar * comm['alpha_s'] * 1e3:.2f} ms of every step.",
    ]
    if result["meta"]["device"] != "cuda" or wl["name"] != "maverick-tp8":
        out += [
            "",
            f"Measured on {result['meta']['device']} at the '{wl['name']}' shapes: these figures check the "
            "script's arithmetic; they are not a projection of Maverick on a GPU.",
        ]
    return out


def _md_failures(result: dict) -> list[str]:
    if not result["failures"]:
        return []
    return ["## Failures", "", *(f"- {f['case']}: {f['error']}" for f in result["failures"]), ""]


def markdown(result: dict) -> str:
    sections = [
        _md_failures(result),
        _md_header(result),
        _md_layers(result, "decode"),
        _md_layers(result, "prefill"),
        _md_lm_head(result),
        _md_projection(result),
    ]
    return "\n".join(line for s in sections for line in s) + "\n"


FORMULAS = {
    "bytes": "weights read once per step (attention qkv/o, 2 norms, dense MLP or router + shared expert, "
    "+ E_B routed experts) + KV: B * (keys + 1) * 2 * kv_heads * head_dim * kv bytes (prefill: the "
    "prompt's K/V written and gathered once); activations not counted",
    "experts": "E_B = E * (1 - (1 - 1/E)^B), expected distinct experts of B tokens routed top-1 uniformly "
    "(hit: what the router chose for this random input)",
    "flops": "2*M*N*K per GEMM (qkv, o, MLP or router + shared + routed top-1), attention 4 * queries * keys "
    "* heads * head_dim; % TC peak = (FLOPs at the bf16 peak, or FP8 peak for prefill's _scaled_mm "
    "experts) / measured time",
}


# -- main --------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device")
        device = torch.device("cuda", torch.cuda.current_device())
        if not kernels_run_on(device):
            raise SystemExit("--device cuda: the decode path's Triton kernels need triton")
    return device


def precision_for(device: torch.device) -> tuple[Precision, str]:
    """CUDA: bf16 with FP8 experts (bf16 experts on GPUs older than sm_89, which lack FP8). CPU:
    fp32, float experts: the plain-torch decode path takes float experts only."""
    if device.type == "cuda":
        if fp8_supported(device):
            return Precision(torch.bfloat16, True), ""
        return Precision(torch.bfloat16, False), "this GPU has no FP8: bf16 experts"
    return Precision(
        torch.float32, False
    ), "CPU: fp32 experts, FP8 only on CUDA (sm_89+) in the measured paths"


def run(args: argparse.Namespace, log=print) -> dict:
    device = resolve_device(args.device)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    wl = small_workload() if args.small else maverick_workload()
    precision, note = precision_for(device)
    gpu = detect_gpu(device)
    comm = CommModel(ranks=wl.tp)
    timer = Timer(device, args.iters)
    torch.manual_seed(0)
    log(f"slice benchmark: {wl.name} on {device} ({precision.dtype}, experts {precision.experts})")
    failures: list[dict] = []
    rows = run_cases(wl, precision, timer, log, failures)
    cfg = wl.cfg
    measured = {(r.section, r.layer, r.tokens, r.context) for r in rows}
    kinds = [k.key for k in layer_kinds(cfg)]

    def complete(batch: int, context: int) -> bool:  # every layer kind and the LM head measured
        return all(("decode", k, batch, context) in measured for k in kinds) and any(
            r.section == "lm_head" and r.tokens == batch for r in rows
        )

    steps = [project_step(rows, wl, comm, b, c) for b, c in decode_cases(wl) if complete(b, c)]
    try:
        throughput = asdict(project_throughput(rows, wl, comm))
    except KeyError as e:  # a case it needs failed
        throughput = None
        failures.append({"case": "projection", "error": f"missing measurement {e}"})
    meta = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "gpu": asdict(gpu) if gpu else None,
        "torch": torch.__version__,
        "dtype": str(precision.dtype).removeprefix("torch."),
        "experts": precision.experts,
        "experts_note": note,
        "decode_path": "DecodeMetadata + Triton kernels (paged_decode_attention, fused_moe), replayed from "
        "a CUDA graph per case"
        if device.type == "cuda"
        else "DecodeMetadata with torch_kernels=True (kernels/torch_decode.py), eager, not compiled",
        "prefill_path": "AttentionMetadata reference path (SDPA, grouped MoE), eager",
        "iters": args.iters,
        "timing": "CUDA events around each run, L2 flushed before it"
        if device.type == "cuda"
        else "time.perf_counter around each run",
        "shapes": {
            "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "experts": cfg.num_local_experts,
            "expert_inter": cfg.intermediate_size,
            "mlp_inter": cfg.intermediate_size_mlp,
            "vocab": cfg.vocab_size,
            "chunk": cfg.attention_chunk_size,
            "layers": cfg.num_hidden_layers,
        },
    }
    workload = {**asdict(wl), "avg_context": wl.avg_context}  # cfg: the per-rank TextConfig
    return {
        "meta": meta,
        "workload": workload,
        "layer_kinds": [asdict(k) for k in layer_kinds(cfg)],
        "weight_bytes": {
            k.key: asdict(
                layer_weight_bytes(cfg, cfg.is_moe(k.index), precision.act_bytes, precision.fp8_experts)
            )
            for k in layer_kinds(cfg)
        }
        | {"lm_head": lm_head_bytes(cfg, precision.act_bytes)},
        "formulas": FORMULAS,
        "rows": [{**asdict(r), **metrics(r, gpu)} for r in rows],
        "projection": {"steps": [asdict(s) for s in steps], "throughput": throughput},
        "failures": failures,
        "assumptions": {"comm": asdict(comm), "activation_bytes_on_wire": BF16_BYTES},
        "gpu_specs": [asdict(s) for s in GPU_SPECS],
        "reference": VLLM_REFERENCE,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument(
        "--small", action="store_true", help="every dimension shrunk, same structure (seconds on a CPU)"
    )
    ap.add_argument("--iters", type=int, default=20, help="timed runs per case (the median is reported)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    ap.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch's intra-op threads (default: torch's, one per core); 1 on a busy machine, where a "
        "parallel region waits for its slowest, descheduled thread",
    )
    args = ap.parse_args(argv)
    if args.iters < 1 or (args.cpu_threads is not None and args.cpu_threads < 1):
        ap.error("--iters and --cpu-threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args, log=lambda s: print(s, file=sys.stderr))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "slice.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "slice.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
