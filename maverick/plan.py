"""Capacity planner: what one rank of a deployment holds, from the checkpoint's shapes alone.

    python -m maverick.plan --profile h100x8-tp8 [--model-dir DIR | --config maverick] [--seq-len N]
                            [--gpus N]

Prints the weight bytes per rank (by tensor class), the KV cache bytes per token per rank, the KV
tokens that fit at the profile's memory utilisation, the longest context and how many sequences of
--seq-len fit at once; or, where the profile cannot hold the model, why and what would fit.

The arithmetic mirrors the engine's tensor-parallel layout (maverick/layers/parallel.py):
- attention: q/o split by query heads; k/v split by KV heads when there are at least as many as
  ranks, else each rank holds the one KV head its query heads attend with (replicated);
- routed experts: every expert on every rank, split by the intermediate dimension (gate/up rows,
  down columns); FP8 experts are 1 byte per weight plus one fp32 scale per output row (gate/up
  scales split with their rows, down's [hidden] scales whole on every rank);
- shared expert and dense MLPs: split by their intermediate dimension;
- embedding and lm_head: split by the vocabulary;
- router and norms: replicated;
- vision tower and projector: on rank 0 only in the engine. Every figure here is rank 0's, the
  rank that binds (each rank allocates the same number of KV blocks): the conservative plan.

KV tokens that fit = (device memory × gpu_memory_utilization − weights − workspace) / KV bytes per
token, in whole blocks, less the engine's scratch block; on the CPU the budget is kv_cache_bytes.
The workspace is an estimate, stated in `workspace_bytes`. `check_fits` is what the engine calls
at start (and the launcher before it starts a server): a plan that cannot hold the weights, or
one max_model_len sequence, fails at once with what would fit.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

from maverick.config import ModelConfig, TextConfig, VisionConfig
from maverick.engine.api import DTYPES, EngineConfig
from maverick.layers.parallel import TensorParallel

GiB = 1 << 30
KiB = 1 << 10

# Outside weights, KV cache and activations, per GPU: the CUDA context (~0.5 GiB, outside torch's
# allocator), NCCL's buffers, the CUDA-graph pools of the decode batch sizes and the allocator's
# fragmentation. An estimate, not yet a measurement: check it against torch.cuda.mem_get_info on the
# first run on a GPU node.
RUNTIME_RESERVE_BYTES = 3 * GiB // 2

# meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8's config.json, the fields the arithmetic reads
# (see /work/shared/reference/llama4.md): read through ModelConfig like any checkpoint's.
_FP8_SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel"}
MAVERICK_FP8 = {
    "model_type": "llama4",
    "architectures": ["Llama4ForConditionalGeneration"],
    "text_config": {
        "vocab_size": 202048,
        "hidden_size": 5120,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "num_local_experts": 128,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 2,
        "attention_chunk_size": 8192,
        "max_position_embeddings": 1048576,
        "bos_token_id": 200000,
        "eos_token_id": [200001, 200007, 200008],
    },
    "vision_config": {
        "hidden_size": 1408,
        "num_hidden_layers": 34,
        "num_attention_heads": 16,
        "intermediate_size": 5632,
        "image_size": 336,
        "patch_size": 14,
        "pixel_shuffle_ratio": 0.5,
        "projector_input_dim": 4096,
        "projector_output_dim": 4096,
        "vision_output_dim": 4096,
    },
    "quantization_config": {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "weights": _FP8_SCHEME,
                "input_activations": {**_FP8_SCHEME, "dynamic": True, "strategy": "token"},
            }
        },
    },
}
BUILTIN = {"maverick": ("Llama 4 Maverick 17B-128E Instruct FP8", MAVERICK_FP8)}


def builtin_config(name: str) -> ModelConfig:
    return ModelConfig.from_dict(BUILTIN[name][1])


# -- the arithmetic --------------------------------------------------------------------------


def check_divisible(text: TextConfig, tp: int) -> None:
    """Raise ValueError naming the first dimension the tensor-parallel split needs and `tp` does not
    divide (the model's own rule: TensorParallel.divide / kv_heads)."""
    parallel = TensorParallel(size=tp)
    parallel.divide(text.num_attention_heads, "num_attention_heads")
    parallel.kv_heads(text.num_key_value_heads, text.num_attention_heads)
    parallel.divide(text.intermediate_size, "intermediate_size")
    parallel.divide(text.intermediate_size_mlp, "intermediate_size_mlp")
    parallel.divide(text.vocab_size, "vocab_size")


def kv_heads_per_rank(text: TextConfig, tp: int) -> int:
    return TensorParallel(size=tp).kv_heads(text.num_key_value_heads, text.num_attention_heads)[0]


def kv_bytes_per_token(text: TextConfig, tp: int, dtype_bytes: int) -> int:
    """K and V of every layer for one token, on one rank (every layer keeps the whole history:
    the chunked-attention layers' cache is not trimmed to their chunk)."""
    return 2 * text.num_hidden_layers * kv_heads_per_rank(text, tp) * text.head_dim * dtype_bytes


@dataclass(frozen=True)
class RankWeights:
    """Bytes of the weights one rank holds, by tensor class."""

    attention: int  # q, k, v, o of every layer
    routed_experts: int  # FP8: weights and their per-row scales
    shared_experts: int
    dense_mlp: int
    vocabulary: int  # embedding + lm_head
    replicated: int  # routers and norms
    vision: int  # vision tower + projector (rank 0)

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


def vision_parameters(vision: VisionConfig, text_hidden_size: int) -> int:
    """Parameters of the vision tower, its adapter and the projector (maverick/models/vision.py)."""
    hidden, inter = vision.hidden_size, vision.intermediate_size
    layer = (
        4 * (hidden * hidden + hidden)  # q, k, v, o with biases
        + (hidden * inter + inter)  # fc1
        + (inter * hidden + hidden)  # fc2
        + 2 * 2 * hidden  # two LayerNorms, weight and bias
    )
    return (
        vision.num_channels * vision.patch_size**2 * hidden  # patch embedding, no bias
        + hidden  # class embedding
        + (vision.patches_per_side**2 + 1) * hidden  # positional embedding
        + 2 * 2 * hidden  # layernorm_pre, layernorm_post
        + vision.num_hidden_layers * layer
        + inter * vision.projector_input_dim  # adapter fc1 (pixel-shuffled width in)
        + vision.projector_output_dim**2  # adapter fc2
        + vision.vision_output_dim * text_hidden_size  # multi_modal_projector
    )


def weight_bytes_per_rank(
    cfg: ModelConfig, tp: int, dtype_bytes: int, fp8_experts: bool, with_vision: bool = True
) -> RankWeights:
    """The weights one rank holds at tensor-parallel size `tp` (rank 0 `with_vision`)."""
    text = cfg.text
    check_divisible(text, tp)
    H, D, E = text.hidden_size, text.head_dim, text.num_local_experts
    heads, kv_heads = text.num_attention_heads // tp, kv_heads_per_rank(text, tp)
    inter, inter_mlp = text.intermediate_size // tp, text.intermediate_size_mlp // tp
    n_moe = len(text.moe_layers)
    n_dense = text.num_hidden_layers - n_moe
    if fp8_experts:
        # 1 byte per weight; fp32 scales: gate/up rows on this rank, down's H rows whole
        routed = E * (3 * H * inter + (2 * inter + H) * 4)
    else:
        routed = E * 3 * H * inter * dtype_bytes
    return RankWeights(
        attention=text.num_hidden_layers * (H * (heads + 2 * kv_heads) * D + heads * D * H) * dtype_bytes,
        routed_experts=n_moe * routed,
        shared_experts=n_moe * 3 * H * inter * dtype_bytes,
        dense_mlp=n_dense * 3 * H * inter_mlp * dtype_bytes,
        vocabulary=2 * (text.vocab_size // tp) * H * dtype_bytes,
        replicated=(n_moe * E * H + (2 * text.num_hidden_layers + 1) * H) * dtype_bytes,
        vision=vision_parameters(cfg.vision, H) * dtype_bytes if with_vision else 0,
    )


def workspace_bytes(
    text: TextConfig, tp: int, dtype_bytes: int, max_num_batched_tokens: int, max_num_seqs: int
) -> int:
    """An estimate of one GPU's memory outside weights and KV cache: RUNTIME_RESERVE_BYTES, the
    activations alive at once in a step of max_num_batched_tokens (residual, normed input and
    layer output [T, H]; q/k/v [T, heads + 2·kv_heads, D]; the MLP's gate/up and product
    [T, 3·I/tp] at the wider of the dense and expert widths), and the sampler's fp32 logits and
    probabilities over the whole vocabulary for max_num_seqs rows (gathered on every rank)."""
    per_token = (
        3 * text.hidden_size
        + (text.num_attention_heads // tp + 2 * kv_heads_per_rank(text, tp)) * text.head_dim
        + 3 * max(text.intermediate_size, text.intermediate_size_mlp) // tp
    ) * dtype_bytes
    logits = 2 * max_num_seqs * text.vocab_size * 4
    return RUNTIME_RESERVE_BYTES + max_num_batched_tokens * per_token + logits


def engine_workspace_bytes(text: TextConfig, engine: EngineConfig) -> int:
    """workspace_bytes at the engine's settings."""
    return workspace_bytes(
        text,
        engine.tensor_parallel_size,
        DTYPES[engine.dtype].itemsize,
        engine.max_num_batched_tokens,
        engine.max_num_seqs,
    )


def kv_cache_budget(text: TextConfig, engine: EngineConfig, total: int, free: int, in_use: int) -> int:
    """Bytes of one GPU for the KV cache once the weights are on it: total × gpu_memory_utilization
    less what this process holds (in_use: the weights) and the workspace, and never more than is
    free less the workspace (another process may hold part of the GPU). The planner passes its
    weight arithmetic as in_use; the engine passes what it measures after loading."""
    workspace = engine_workspace_bytes(text, engine)
    return min(int(total * engine.gpu_memory_utilization) - in_use, free) - workspace


# -- a plan: one deployment of one checkpoint ---------------------------------------------------


def uses_fp8_experts(cfg: ModelConfig, engine: EngineConfig, on_gpu: bool) -> bool:
    """As the loader decides (checkpoint.load_model): an FP8 checkpoint keeps its experts in FP8
    with experts="fp8", or "auto" on a GPU (H100/H200 have FP8 GEMMs); else they are dequantised."""
    return cfg.quant is not None and (engine.experts == "fp8" or (engine.experts == "auto" and on_gpu))


@dataclass(frozen=True)
class Plan:
    model: str
    tensor_parallel_size: int
    dtype: str
    weights: RankWeights  # rank 0's
    kv_bytes_per_token: int  # per rank
    device_memory_bytes: int | None  # per GPU; None: the CPU, where kv_cache_bytes is the budget
    gpu_memory_utilization: float
    workspace_bytes: int
    kv_cache_bytes: int  # per rank, what is left for the cache (negative: the weights do not fit)
    block_size: int
    max_position_embeddings: int
    max_model_len: int  # the engine's: its setting (None: max_position_embeddings), at most that

    @property
    def num_kv_blocks(self) -> int:
        """Blocks the engine would allocate (it keeps one more as the decode batches' scratch)."""
        return max(0, self.kv_cache_bytes // (self.kv_bytes_per_token * self.block_size) - 1)

    @property
    def kv_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    @property
    def longest_context(self) -> int:
        """The longest sequence the cache holds (alone), within the model's positions."""
        return min(self.max_position_embeddings, self.kv_tokens)

    def concurrent_sequences(self, seq_len: int) -> int:
        """Sequences of seq_len tokens whose KV fits at once (whole blocks each, no prefix sharing)."""
        return self.num_kv_blocks // math.ceil(seq_len / self.block_size)


def plan(
    cfg: ModelConfig, engine: EngineConfig, device_memory_bytes: int | None, model: str = "the model"
) -> Plan:
    """Rank 0 of `engine` (its TP size, dtype, batching limits and KV budget) on `cfg`. A GPU
    deployment gives `device_memory_bytes` (each GPU's total); the CPU gives None."""
    tp, dtype_bytes = engine.tensor_parallel_size, DTYPES[engine.dtype].itemsize
    text_positions = cfg.text.max_position_embeddings
    on_gpu = device_memory_bytes is not None
    weights = weight_bytes_per_rank(cfg, tp, dtype_bytes, uses_fp8_experts(cfg, engine, on_gpu))
    if on_gpu:
        workspace = engine_workspace_bytes(cfg.text, engine)
        free = device_memory_bytes - weights.total  # a GPU of its own
        budget = kv_cache_budget(cfg.text, engine, device_memory_bytes, free, weights.total)
    else:
        workspace, budget = 0, engine.kv_cache_bytes
    return Plan(
        model=model,
        tensor_parallel_size=tp,
        dtype=engine.dtype,
        weights=weights,
        kv_bytes_per_token=kv_bytes_per_token(cfg.text, tp, dtype_bytes),
        device_memory_bytes=device_memory_bytes,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        workspace_bytes=workspace,
        kv_cache_bytes=budget,
        block_size=engine.block_size,
        max_position_embeddings=text_positions,
        max_model_len=min(engine.max_model_len or text_positions, text_positions),
    )


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def check_gpus(instances: int, tp: int, gpus: int, what: str = "") -> None:
    """Every instance owns tensor_parallel_size GPUs of its own: instances × tp must be there."""
    if instances * tp > gpus:
        raise ValueError(
            f"{what or 'this deployment'} needs {instances} × {tp} = {instances * tp} GPUs "
            f"({instances} instance(s) of tensor_parallel_size {tp}); {gpus} are visible"
        )


def check_fits(
    cfg: ModelConfig,
    engine: EngineConfig,
    device_memory_bytes: int | None,
    model: str = "the model",
    max_gpus: int | None = None,
) -> Plan:
    """The plan if it holds the weights and one sequence of max_model_len (as vLLM requires: a
    request the engine accepts must fit the cache alone); else ValueError saying why and which
    tensor_parallel_size would fit (up to max_gpus where given)."""
    p = plan(cfg, engine, device_memory_bytes, model)
    if _fits(p):
        return p
    need = (p.max_model_len // p.block_size + 2) * p.block_size * p.kv_bytes_per_token  # + scratch
    if device_memory_bytes is None:  # the CPU: the cache is kv_cache_bytes, whatever the weights
        raise ValueError(
            f"max_model_len {p.max_model_len} needs {_size(need)} of KV cache per rank at TP "
            f"{p.tensor_parallel_size}; kv_cache_bytes {engine.kv_cache_bytes} holds {p.kv_tokens} tokens: "
            f"raise kv_cache_bytes to {need} or lower max_model_len"
        )
    usable = int(device_memory_bytes * engine.gpu_memory_utilization)
    if p.num_kv_blocks < 1:
        fp8 = uses_fp8_experts(cfg, engine, on_gpu=True)
        whole = weight_bytes_per_rank(cfg, 1, DTYPES[engine.dtype].itemsize, fp8)
        why = (
            f"{model} needs {_size(whole.total)} of weights; TP {p.tensor_parallel_size} puts "
            f"{_size(p.weights.total)} on each rank, and one {_size(device_memory_bytes)} GPU at "
            f"gpu_memory_utilization {engine.gpu_memory_utilization} holds {_size(usable)}, less "
            f"{_size(p.workspace_bytes)} of workspace"
        )
    else:
        why = (
            f"max_model_len {p.max_model_len} needs {_size(need)} of KV cache per rank at TP "
            f"{p.tensor_parallel_size}; {_size(p.kv_cache_bytes)} are left after {_size(p.weights.total)} "
            f"of weights per rank: at most {p.kv_tokens} tokens fit (max_model_len ≤ {p.kv_tokens})"
        )
    raise ValueError(f"{why}: {_suggest(cfg, engine, device_memory_bytes, model, max_gpus)}")


def _fits(p: Plan) -> bool:
    return p.num_kv_blocks >= 1 and p.kv_tokens >= p.max_model_len


def _suggest(
    cfg: ModelConfig, engine: EngineConfig, device_memory_bytes: int, model: str, max_gpus: int | None
) -> str:
    """The smallest larger tensor_parallel_size that holds the weights, with the context it holds."""
    limit = max_gpus or cfg.text.num_attention_heads
    for tp in range(engine.tensor_parallel_size + 1, limit + 1):
        try:
            p = plan(cfg, replace(engine, tensor_parallel_size=tp), device_memory_bytes, model)
        except ValueError:
            continue  # a dimension does not divide by it
        if p.num_kv_blocks >= 1:
            weights = f"{_size(p.weights.total)} of weights per rank"
            if _fits(p):
                return f"use tensor_parallel_size {tp} ({weights}, {p.kv_tokens} KV tokens)"
            return f"use tensor_parallel_size {tp} and max_model_len ≤ {p.kv_tokens} ({weights})"
    return f"no tensor_parallel_size up to {limit} holds it; lower max_model_len or use larger GPUs"


# -- command line ---------------------------------------------------------------------------------


def report(p: Plan, seq_len: int) -> str:
    w = p.weights
    memory = (
        f"{_size(p.device_memory_bytes)} per GPU × {p.gpu_memory_utilization} − weights − "
        f"{_size(p.workspace_bytes)} workspace"
        if p.device_memory_bytes is not None
        else "kv_cache_bytes (CPU)"
    )
    lines = [
        f"weights per rank          {_size(w.total)}  (rank 0, vision tower included)",
        *(f"  {f.name:<23} {_size(getattr(w, f.name))}" for f in fields(w)),
        f"KV cache per token, rank  {p.kv_bytes_per_token / KiB:.1f} KiB ({p.dtype})",
        f"KV cache per rank         {_size(p.kv_cache_bytes)}  ({memory})",
        f"KV tokens that fit        {p.kv_tokens}  ({p.num_kv_blocks} blocks of {p.block_size})",
        f"longest context           {p.longest_context}  "
        f"(max_position_embeddings {p.max_position_embeddings})",
        f"sequences of {seq_len:<12} {p.concurrent_sequences(seq_len)} at once"
        + (" (longer than the model's positions)" if seq_len > p.max_position_embeddings else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # here, not at the top: the profile loader imports engine_args, which imports this module
    from maverick.serving.profile import DEFAULT_PROFILE, load_profile, profile_engine_config, profile_names

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=DEFAULT_PROFILE, choices=profile_names())
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--model-dir", type=Path, help="a checkpoint folder (its config.json)")
    source.add_argument("--config", choices=sorted(BUILTIN), help="built-in shapes")
    ap.add_argument("--seq-len", type=int, default=8192, help="for the count of concurrent sequences")
    ap.add_argument("--gpus", type=int, help="GPUs on the node (default: the profile's gpus_per_node)")
    args = ap.parse_args(argv)
    profile = load_profile(args.profile)
    if args.model_dir is None and args.config is None:
        # a GPU profile plans Maverick by default, a CPU one the embedded tiny checkpoint
        args.config = "maverick" if profile.on_gpu else None
        args.model_dir = None if profile.on_gpu else Path("models/tiny-maverick")
    if args.config:
        model, cfg = BUILTIN[args.config][0], builtin_config(args.config)
    else:
        model, cfg = str(args.model_dir), ModelConfig.from_dir(args.model_dir)
    engine = profile_engine_config(profile, args.model_dir or ".")
    gpus = args.gpus if args.gpus is not None else profile.gpus_per_node
    print(f"profile {profile.name}: {profile.description}\nmodel {model}")
    try:
        if profile.on_gpu:
            check_gpus(profile.instances, engine.tensor_parallel_size, gpus, f"profile {profile.name}")
        p = check_fits(cfg, engine, profile.gpu_memory_bytes, model, max_gpus=gpus or None)
    except ValueError as e:
        print(f"does not fit: {e}")
        return 1
    print(report(p, args.seq_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
