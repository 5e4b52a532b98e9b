"""What crosses the engine's boundary: the prompt a caller sends, the updates it gets back, and
the engine's settings. Everything outside `maverick/engine/` imports these from here (and the
errors from `errors.py`); the modules behind them are the engine's own business.

    engine = EngineClient(EngineConfig(model_dir=...))        # or AsyncEngine: same API, in-process
    async for out in engine.generate("req-1", Prompt(ids), SamplingParams(max_tokens=64)):
        print(out.text, end="")
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from maverick.checkpoint import ExpertMode
from maverick.engine.sampling_params import DEFAULT_MAX_TOKENS, SamplingParams

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DTYPES",
    "DecodePath",
    "EngineConfig",
    "ImageInput",
    "MoEPath",
    "Prompt",
    "RequestOutput",
    "SamplingParams",
]


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt, already tiled: its `<|patch|>` tokens are in the prompt in order."""

    pixel_values: torch.Tensor  # [tiles, 3, 336, 336] float32, thumbnail last when tiles > 1
    content_hash: bytes  # of the pixel values: part of the prefix-cache key of the blocks it covers

    @classmethod
    def from_pixels(cls, pixel_values: torch.Tensor) -> ImageInput:
        data = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return cls(pixel_values, hashlib.blake2b(data, digest_size=16).digest())

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


@dataclass(frozen=True)
class Prompt:
    """What the engine generates from: token ids with image layouts already expanded, and the images."""

    token_ids: list[int]
    images: tuple[ImageInput, ...] = ()


@dataclass
class RequestOutput:
    """One streamed update of one choice of a request. `text` and `token_ids` are deltas since the
    choice's last update. A request with SamplingParams.n > 1 has n choices (`index` 0..n-1), each
    with its own updates, interleaved, and its own finished one; the request ends with the last."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool  # this choice's last update
    finish_reason: str | None = None  # "stop", "length", "abort" or "error", once finished
    index: int = 0  # the choice (sequence index), 0..n-1
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # total so far
    num_cached_tokens: int = 0
    # with SamplingParams.logprobs: the raw-distribution log-prob of each new token [n], and the sum
    # over all of this sequence's tokens so far (None when not asked)
    logprobs: list[float] | None = None
    cumulative_logprob: float | None = None
    # with top_logprobs = K > 0: each new token's step's K most likely token ids and their log-probs
    # [n][K], most likely first (same raw distribution)
    top_token_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # monotonic time of each new token
    first_scheduled_time: float | None = None  # monotonic: when its first tokens were scheduled
    last_token_time: float | None = None  # monotonic: of its latest token (this update's or before)
    # KV blocks this choice was given: newly allocated (recomputation after preemption included),
    # and taken from the prefix cache
    num_new_blocks: int = 0
    num_reused_blocks: int = 0
    # with return_context_logits: the prompt's raw logits [prompt tokens, vocab] fp32, in the
    # choice's first update only; with return_generation_logits: each new token's step's raw
    # logits [n, vocab] fp32 (before bias, penalties and temperature)
    context_logits: np.ndarray | None = None
    generation_logits: np.ndarray | None = None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Pure-decode steps: "auto" (CUDA graphs where the fixed-shape kernels run on CUDA, else the
# reference path), "reference" (host-planned attention, grouped MoE, as prefill), "cuda_graph"
# (fixed shapes through the Triton kernels, replayed from CUDA graphs per batch-size bucket; the
# reference path off CUDA), "static" (the fixed-shape kernels eagerly: a test hook, which runs
# on the CPU under TRITON_INTERPRET=1), or "compiled" (the CPU's: the same fixed shapes in plain
# PyTorch through torch.compile, compiled at start; one rank, float experts, a C++ compiler).
# Resolved once when the engine starts (execution.py).
DecodePath = Literal["auto", "reference", "cuda_graph", "static", "compiled"]
# Routed experts of prefill and mixed steps: "reference" (grouped) or "kernel" (the fused Triton
# kernel of the decode path, at any token count; CUDA, or the interpreter in tests).
MoEPath = Literal["reference", "kernel"]


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    dtype: str = "bfloat16"
    # "cpu" or "cuda:K"; with tensor_parallel_size T > 1 on CUDA, rank r runs on cuda:K+r.
    device: str = "cpu"
    # Ranks the model is split over (heads, expert and MLP intermediate rows, vocabulary); rank 0
    # is this engine's process, ranks 1..T-1 processes it spawns (NCCL on CUDA, gloo on the CPU).
    tensor_parallel_size: int = 1
    experts: ExpertMode = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_bytes (CPU) or gpu_memory_utilization (CUDA)
    kv_cache_bytes: int = 1 << 30
    gpu_memory_utilization: float = 0.9  # CUDA: the share of each GPU this engine uses (plan.kv_cache_budget)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_num_waiting: int = 256  # more queued requests than this are refused (overload), not buffered
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    decode_path: DecodePath = "auto"
    moe_path: MoEPath = "reference"  # "kernel" once measured faster on a GPU (docs/performance.md)
    # torch's intra-op threads for this process; None: torch's default, one per core. Behind Triton
    # on the CPU, fewer: the server and its other processes need cores too, and a parallel region
    # whose threads are descheduled waits for the slowest.
    cpu_threads: int | None = None
    # Streamed updates carry at least this many new tokens (the first token and the end leave at
    # once): fewer, larger responses when each one costs the server more than the engine's step.
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.block_size < 1 or (self.num_kv_blocks is not None and self.num_kv_blocks < 1):
            raise ValueError("block_size and num_kv_blocks must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be at least 1")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError("cpu_threads must be at least 1 (or None for torch's default)")
