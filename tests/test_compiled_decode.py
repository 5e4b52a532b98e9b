"""The CPU's compiled decode path: kernels/torch_decode.py against the same float64 oracle as the
Triton kernel (tests/test_kernels.py), eagerly and through torch.compile, and its routed experts
against the grouped reference. The engine's tokens on this path equal transformers' in
tests/test_engine.py (parametrized by decode path)."""

from __future__ import annotations

import pytest
import torch
from test_kernels import CASES, make_case, oracle

from maverick.engine.execution import resolve_modes
from maverick.kernels import torch_decode
from maverick.layers.moe import RoutedExperts

TRITON_ONLY = ("block_n", "num_splits")  # the Triton kernel's tiling, not part of the contract


def _case(name: str, seed: int) -> dict:
    return make_case(seed=seed, **{k: v for k, v in CASES[name].items() if k not in TRITON_ONLY})


def _attention(case: dict, fn=torch_decode.paged_decode_attention) -> torch.Tensor:
    args = ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "scale", "chunk_size")
    return fn(*(case[a] for a in args))


@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_oracle(name):
    case = _case(name, seed=list(CASES).index(name))
    out = _attention(case)
    q = case["q"]
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    tol = {torch.float32: 1e-5, torch.float16: 3e-3}[q.dtype]
    torch.testing.assert_close(out.double(), oracle(**case), atol=tol, rtol=tol)
    assert (out[case["seq_lens"] == 0] == 0).all()  # padding rows


def test_compiled_attention_matches_oracle():
    """One graph, symbolic rows and width as the runner marks them, for cases of other sizes."""
    compiled = torch.compile(torch_decode.paged_decode_attention, dynamic=True)
    for i, name in enumerate(("chunk_not_block_multiple", "chunk_2_blocks", "gqa_4")):
        case = _case(name, seed=i)
        torch.testing.assert_close(_attention(case, compiled).double(), oracle(**case), atol=1e-5, rtol=1e-5)


def test_routed_experts_match_the_grouped_reference():
    g = torch.Generator().manual_seed(0)
    E, H, inter, T = 6, 32, 24, 11
    experts = RoutedExperts(E, H, inter, torch.float32, fp8=False)
    experts.w13.copy_(torch.randn(E, 2 * inter, H, generator=g) / H**0.5)
    experts.w2.copy_(torch.randn(E, H, inter, generator=g) / inter**0.5)
    x = torch.randn(T, H, generator=g)
    ids = torch.tensor([3, 0, 5, 3, 3, 1, 6, 2, 0, 6, 4])  # 6 = E: padding rows
    out = experts.forward_fixed_shape(x, ids, torch_kernels=True)
    real = ids < E
    torch.testing.assert_close(out[real], experts(x[real], ids[real]), atol=1e-6, rtol=1e-5)
    assert (out[~real] == 0).all()


def test_compiled_needs_one_cpu_rank():
    cpu = torch.device("cpu")
    modes = resolve_modes("compiled", "reference", cpu, 16, 32)
    assert (
        modes.compiled and modes.fixed_shape_decode and not modes.cuda_graphs and modes.decode == "compiled"
    )
    with pytest.raises(ValueError, match="tensor_parallel_size is 2"):
        resolve_modes("compiled", "reference", cpu, 16, 32, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="the CPU's decode path"):
        resolve_modes("compiled", "reference", torch.device("cuda", 0), 16, 32)
    assert not resolve_modes("auto", "reference", cpu, 16, 32).compiled  # opt-in for now
