"""The capacity planner (maverick/plan.py) against public figures for Maverick FP8 and, for the tiny
checkpoint, against the bytes of a model the loader really builds."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maverick.checkpoint import load_model
from maverick.config import ModelConfig
from maverick.layers.parallel import TensorParallel
from maverick.plan import (
    GiB,
    KiB,
    builtin_config,
    check_divisible,
    check_fits,
    check_gpus,
    engine_workspace_bytes,
    kv_bytes_per_token,
    kv_cache_budget,
    plan,
    weight_bytes_per_rank,
)
from maverick.serving.profile import load_profile, profile_engine_config

ROOT = Path(__file__).resolve().parents[1]
MAVERICK = builtin_config("maverick")
BF16 = 2
# The GPU profiles meant for Maverick FP8 (h100x8-2xtp4 is for smaller checkpoints).
MAVERICK_PROFILES = ["h100x8-tp8", "h200x8-tp8", "h200x4-tp4"]


def _state_dict_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_maverick_sizes_match_the_published_counts():
    # ≈401.6B parameters, 386.5B of them routed experts; ≈417 GB on disk in FP8 (llama4.md)
    bf16 = weight_bytes_per_rank(MAVERICK, 1, BF16, fp8_experts=False)
    assert bf16.total / BF16 == pytest.approx(401.6e9, rel=1e-3)
    assert bf16.routed_experts / BF16 == pytest.approx(386.5e9, rel=1e-3)
    assert weight_bytes_per_rank(MAVERICK, 1, BF16, fp8_experts=True).total == pytest.approx(417e9, rel=3e-3)


def test_maverick_fp8_weights_per_rank_at_tp8_match_vllm():
    """vLLM reports 48.9 GiB of weights per GPU for Maverick FP8 at TP 8. It splits the vision tower
    8 ways too, and counts its own buffers (the rotary table of 1M positions, ~0.25 GiB): our
    tensors in vLLM's layout come within 1% below it. Our engine keeps the whole tower on rank 0,
    so rank 0 (the planner's figure) carries 1.4 GiB more: within 3% above it."""
    rank0 = weight_bytes_per_rank(MAVERICK, 8, BF16, fp8_experts=True)
    vllm_layout = rank0.total - rank0.vision + rank0.vision / 8
    assert vllm_layout / GiB == pytest.approx(48.9, rel=0.01)
    assert 48.9 <= rank0.total / GiB <= 48.9 * 1.03


def test_maverick_kv_cache_per_token():
    # 192 KiB per token in bf16, 24 KiB per GPU at TP 8 (one KV head of 8 per rank)
    assert kv_bytes_per_token(MAVERICK.text, 1, BF16) == 192 * KiB
    assert kv_bytes_per_token(MAVERICK.text, 8, BF16) == 24 * KiB


@pytest.mark.parametrize("experts", ["fp8", "dequant"])
def test_tiny_weights_equal_the_bytes_of_the_loaded_model(tiny_ckpt, experts):
    """The oracle: the state dict of the model the loader builds from the tiny checkpoint."""
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, experts=experts)
    planned = weight_bytes_per_rank(ModelConfig.from_dir(tiny_ckpt), 1, BF16, fp8_experts=experts == "fp8")
    assert planned.total == _state_dict_bytes(model)


@pytest.mark.parametrize("rank", [0, 1])
def test_tiny_weights_per_rank_at_tp2_equal_the_loaded_slices(tiny_ckpt, rank):
    """Rank 0 holds the vision tower, rank 1 does not (maverick/models/llama4.py)."""
    tp = TensorParallel(rank=rank, size=2)  # no process group: building and loading need none
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, experts="fp8", tp=tp)
    cfg = ModelConfig.from_dir(tiny_ckpt)
    planned = weight_bytes_per_rank(cfg, 2, BF16, fp8_experts=True, with_vision=rank == 0)
    assert planned.total == _state_dict_bytes(model)


def test_the_engine_sizes_its_kv_cache_with_the_planners_arithmetic():
    """On a GPU the engine passes what it measured after loading (memory in use, memory free) to
    the function the planner uses with its weight arithmetic: on a GPU of its own with the weights
    as planned, the same bytes; more in use, less cache; a GPU shared with another process, what is
    free."""
    engine = profile_engine_config(load_profile("h100x8-tp8"), ".")
    total, util = 80 * GiB, engine.gpu_memory_utilization
    p = plan(MAVERICK, engine, total)
    workspace = engine_workspace_bytes(MAVERICK.text, engine)
    weights = p.weights.total
    assert p.kv_cache_bytes == int(total * util) - weights - workspace > 10 * GiB
    assert kv_cache_budget(MAVERICK.text, engine, total, total - weights, weights) == p.kv_cache_bytes
    more = kv_cache_budget(MAVERICK.text, engine, total, total - weights - GiB, weights + GiB)
    assert more == p.kv_cache_bytes - GiB
    shared = kv_cache_budget(MAVERICK.text, engine, total, 10 * GiB, weights)
    assert shared == 10 * GiB - workspace


def test_tp1_on_one_h100_is_refused_with_what_would_fit():
    profile = load_profile("h100x8-tp8")
    engine = dataclasses.replace(profile_engine_config(profile, "."), tensor_parallel_size=1)
    with pytest.raises(ValueError) as info:
        check_fits(MAVERICK, engine, profile.gpu_memory_bytes, "Maverick FP8", max_gpus=8)
    message = str(info.value)
    assert "Maverick FP8 needs 388.3 GiB of weights" in message
    assert "one 79.2 GiB GPU" in message
    assert "use tensor_parallel_size 8 (50.0 GiB of weights per rank" in message


def test_a_tp8_profile_on_a_4_gpu_node_is_refused():
    with pytest.raises(ValueError, match=r"needs 1 × 8 = 8 GPUs .*; 4 are visible"):
        check_gpus(1, 8, 4, "profile h100x8-tp8")
    out = _plan_cli("--profile", "h100x8-tp8", "--gpus", "4")
    assert out.returncode == 1 and "4 are visible" in out.stdout


@pytest.mark.parametrize("name", MAVERICK_PROFILES)
def test_maverick_profiles_fit_their_node(name):
    """Each Maverick profile holds the weights and one max_model_len sequence on its GPUs."""
    profile = load_profile(name)
    engine = profile_engine_config(profile, ".")
    plan = check_fits(MAVERICK, engine, profile.gpu_memory_bytes)
    assert plan.max_model_len <= plan.longest_context
    check_gpus(profile.instances, engine.tensor_parallel_size, profile.gpus_per_node)


def test_maverick_does_not_fit_two_tp4_replicas_on_h100s():
    profile = load_profile("h100x8-2xtp4")
    with pytest.raises(ValueError, match="use tensor_parallel_size 8"):
        check_fits(MAVERICK, profile_engine_config(profile, "."), profile.gpu_memory_bytes, max_gpus=8)


def test_a_context_the_cache_cannot_hold_is_refused():
    profile = load_profile("h100x8-tp8")
    engine = dataclasses.replace(profile_engine_config(profile, "."), max_model_len=None)  # 1M
    with pytest.raises(ValueError, match=r"max_model_len 1048576 needs 24.0 GiB .* at most \d+ tokens fit"):
        check_fits(MAVERICK, engine, profile.gpu_memory_bytes)


@pytest.mark.parametrize(
    "change, dimension",
    [
        (dict(num_attention_heads=12, num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_attention_heads=6, num_key_value_heads=1), "num_attention_heads"),
        (dict(intermediate_size=130), "intermediate_size"),
        (dict(intermediate_size_mlp=258), "intermediate_size_mlp"),
        (dict(vocab_size=4049), "vocab_size"),
    ],
)
def test_a_dimension_that_does_not_divide_is_named(tiny_ckpt, change, dimension):
    text = dataclasses.replace(ModelConfig.from_dir(tiny_ckpt).text, **change)
    with pytest.raises(ValueError, match=rf"^{dimension} \("):
        check_divisible(text, 4)


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maverick.plan", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_command_line_prints_the_plan():
    out = _plan_cli("--profile", "h100x8-tp8", "--config", "maverick", "--seq-len", "8192")
    assert out.returncode == 0, out.stderr
    assert "weights per rank          50.0 GiB" in out.stdout
    assert "KV cache per token, rank  24.0 KiB" in out.stdout
    assert "sequences of 8192" in out.stdout
    refused = _plan_cli("--profile", "h100x8-2xtp4")
    assert refused.returncode == 1 and "use tensor_parallel_size 8" in refused.stdout
