"""The fixed-shape MoE kernel (maverick/kernels/moe.py) against an independent oracle, run on the CPU
by Triton's interpreter in a subprocess (see tests/test_kernels.py for why a subprocess), and
compiled for sm_90 with FP8 weights (no GPU needed).

The interpreter runs FP8 e4m3 loads and conversions (it keeps fp8 as uint8 and decodes through
fp16: every finite e4m3 value converts exactly; only the two NaN codes differ, which quantisation
never produces), so FP8 weights are tested here too. Activations are fp32 or fp16: the interpreter's
tl.dot multiplies bf16's uint16 storage as integers (see tests/test_kernels.py), so bf16 runs only
on a GPU (scripts/gpu_check.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from interpreter import run_cases

from maverick.kernels import moe as moe_kernel
from maverick.kernels.moe import align_by_expert, fused_moe
from maverick.layers.fp8 import FP8_DTYPE, quantize_rowwise
from maverick.layers.moe import RoutedExperts

needs_triton = pytest.mark.skipif(not moe_kernel.HAS_TRITON, reason="triton is not installed")


def make_case(
    expert_ids: list[int],
    *,
    num_experts: int,
    hidden: int = 64,
    inter: int = 48,
    dtype: torch.dtype = torch.float32,
    fp8: bool = False,
    seed: int = 0,
    **kwargs,
) -> dict:
    """fused_moe's arguments: weights at unit-ish scale, each expert and row different."""
    g = torch.Generator().manual_seed(seed)
    E, H, inter_ = num_experts, hidden, inter
    x = torch.randn(len(expert_ids), H, generator=g)
    w13 = torch.randn(E, 2 * inter_, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, inter_, generator=g) / inter_**0.5
    case = dict(x=x.to(dtype), expert_ids=torch.tensor(expert_ids, dtype=torch.long), **kwargs)
    if fp8:
        w13_q, s13 = quantize_rowwise(w13.reshape(-1, H))
        w2_q, s2 = quantize_rowwise(w2.reshape(-1, inter_))
        case.update(
            w13=w13_q.view(E, 2 * inter_, H),
            w2=w2_q.view(E, H, inter_),
            w13_scale=s13.view(E, 2 * inter_),
            w2_scale=s2.view(E, H),
        )
    else:
        case.update(w13=w13.to(dtype), w2=w2.to(dtype))
    return case


def oracle(x, expert_ids, w13, w2, w13_scale=None, w2_scale=None, **_) -> torch.Tensor:
    """Token by token in float64: pick the expert, dequantise its rows, gate/up, SiLU, down."""
    E, two_i, _ = w13.shape
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, e in enumerate(expert_ids.tolist()):
        if not 0 <= e < E:
            continue  # a skipped (padding) row
        a, b = w13[e].double(), w2[e].double()  # [2I, H], [H, I]
        if w13_scale is not None:
            a, b = a * w13_scale[e].double()[:, None], b * w2_scale[e].double()[:, None]
        gate, up = (a @ x[t].double()).split(two_i // 2)
        out[t] = b @ (F.silu(gate) * up)
    return out


def _route(n: int, num_experts: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randint(0, num_experts, (n,), generator=g).tolist()


CASES = {
    # 13 tokens on 6 experts: several tokens per expert, H and I not multiples of the tiles
    "fp32": dict(expert_ids=_route(13, 6, 0), num_experts=6, hidden=80, inter=48, block_k=32),
    "one_token": dict(expert_ids=[3], num_experts=6),
    # one expert with more tokens than a block (two blocks of it), the others with one or none
    "crowded_expert": dict(expert_ids=[2] * 21 + [0, 5, 2], num_experts=6, block_n=16),
    # an expert whose tokens fill exactly one block, next to another's run
    "full_block": dict(expert_ids=[1] * 16 + [3, 3], num_experts=4, hidden=32, inter=32),
    # padding rows of a graph batch: ids -1 and E are skipped (zeros)
    "skipped_rows": dict(expert_ids=[1, -1, 4, 6, 1, 6], num_experts=6),
    "all_skipped": dict(expert_ids=[6, 6, 6], num_experts=6),
    # Maverick's 128 experts: most blocks of the fixed grid are empty
    "128_experts": dict(expert_ids=[127, 0, 64, 0, 5], num_experts=128, hidden=32, inter=32),
    "block_m_32": dict(expert_ids=_route(19, 4, 1), num_experts=4, block_m=32, block_n=64),
    # 16-bit dots, fp32 accumulation (fp16 stands in for bf16 in the interpreter)
    "fp16": dict(expert_ids=_route(11, 5, 2), num_experts=5, dtype=torch.float16),
    # FP8 weights with per-row scales, dequantised on load
    "fp8_fp32": dict(expert_ids=_route(17, 6, 3) + [-1], num_experts=6, hidden=80, block_k=32, fp8=True),
    "fp8_fp16": dict(expert_ids=_route(9, 4, 4), num_experts=4, dtype=torch.float16, fp8=True),
    # tied to RoutedExperts below
    "eager_float": dict(expert_ids=_route(12, 5, 5), num_experts=5),
    "eager_fp8": dict(expert_ids=_route(12, 5, 6), num_experts=5, fp8=True),
}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3}  # by the activations' dtype


@pytest.fixture(scope="module")
def cases() -> dict[str, dict]:
    return {name: make_case(seed=i, **spec) for i, (name, spec) in enumerate(CASES.items())}


@pytest.fixture(scope="module")
def kernel_outputs(cases, tmp_path_factory) -> dict[str, torch.Tensor | str]:
    if not moe_kernel.HAS_TRITON:
        pytest.skip("triton is not installed")
    return run_cases(
        "maverick.kernels.moe",
        "_moe_gate_up_kernel",
        "fused_moe",
        cases,
        tmp_path_factory.mktemp("moe_kernel"),
    )


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_oracle(name, cases, kernel_outputs):
    case, out = cases[name], kernel_outputs[name]
    assert isinstance(out, torch.Tensor), f"the kernel raised:\n{out}"
    x = case["x"]
    assert out.shape == x.shape and out.dtype == x.dtype
    expected = oracle(**case)
    tol = TOLERANCE[x.dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    E = case["w13"].shape[0]
    skipped = (case["expert_ids"] < 0) | (case["expert_ids"] >= E)
    assert (out[skipped] == 0).all()
    assert (out[~skipped].abs().sum(-1) > 0).all()


@needs_triton
def test_kernel_matches_eager_float_experts(cases, kernel_outputs):
    """The same weights through the model's eager RoutedExperts (grouped bmm): equal in fp32."""
    case = cases["eager_float"]
    E, two_i, H = case["w13"].shape
    experts = RoutedExperts(E, H, two_i // 2, torch.float32, fp8=False)
    experts.w13.copy_(case["w13"])
    experts.w2.copy_(case["w2"])
    ref = experts(case["x"], case["expert_ids"])
    torch.testing.assert_close(kernel_outputs["eager_float"], ref, atol=1e-5, rtol=1e-5)


@needs_triton
def test_kernel_vs_eager_fp8_differs_by_activation_rounding(cases, kernel_outputs):
    """The eager FP8 path quantises activations to e4m3 per token (`_scaled_mm`); the kernel keeps
    them (weight-only dequantisation). Their gap is that rounding: a few percent, not more."""
    case = cases["eager_fp8"]
    E, two_i, H = case["w13"].shape
    experts = RoutedExperts(E, H, two_i // 2, torch.float32, fp8=True)
    for name in ("w13", "w2", "w13_scale", "w2_scale"):
        getattr(experts, name).copy_(case[name])
    eager = experts(case["x"], case["expert_ids"]).double()
    exact = oracle(**case)
    kernel = kernel_outputs["eager_fp8"].double()
    kernel_err = ((kernel - exact).norm() / exact.norm()).item()
    eager_err = ((eager - exact).norm() / exact.norm()).item()
    assert kernel_err < 1e-6
    assert 1e-3 < eager_err < 0.1, eager_err


def test_align_by_expert_exact():
    """7 tokens, 4 experts, blocks of 2: runs sorted by expert, each padded to whole blocks."""
    ids = torch.tensor([2, 0, 2, 9, 2, 0, -1])  # 9 and -1: skipped
    sorted_ids, block_experts = align_by_expert(ids, num_experts=4, block_m=2)
    T = 7
    # NB = cdiv(7, 2) + min(7, 4) = 8 blocks: expert 0 (tokens 1, 5), expert 2 (0, 2, 4 + pad)
    assert block_experts.tolist() == [0, 2, 2, 4, 4, 4, 4, 4]
    assert sorted_ids.tolist() == [1, 5, 0, 2, 4, T] + [T] * 10
    assert sorted_ids.dtype == block_experts.dtype == torch.int32


def test_rejects_bad_arguments():
    case = make_case([0, 1], num_experts=2)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        fused_moe(**case, block_m=8)
    bad = dict(case, w13=case["w13"].double())
    with pytest.raises(ValueError, match="x's dtype"):
        fused_moe(**bad)
    fp8 = make_case([0, 1], num_experts=2, fp8=True)
    with pytest.raises(ValueError, match="both row scales"):
        fused_moe(**dict(fp8, w2_scale=None))
    assert fp8["w13"].dtype == FP8_DTYPE


@needs_triton
@pytest.mark.parametrize(
    "activations, weights, precision",
    [("bf16", "fp8e4nv", "tf32"), ("bf16", "bf16", "tf32"), ("fp32", "fp32", "ieee")],
)
def test_compiles_for_hopper(activations, weights, precision):
    """Both kernels at Maverick's TP 8 shapes (H 5120, I 1024, 128 experts): bf16 activations with
    FP8 or bf16 weights (served), fp32 (the exactness checks), compiled for sm_90 down to a cubin.
    Needs no GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(moe_kernel._moe_gate_up_kernel, JITFunction):
        pytest.skip("TRITON_INTERPRET is set in this process: the kernels are interpreted functions")
    constexprs = dict(NUM_EXPERTS=128, FP8=weights == "fp8e4nv", BLOCK_M=16, BLOCK_N=32, BLOCK_K=128)
    constexprs["INPUT_PRECISION"] = precision
    types = dict(w_ptr=f"*{weights}", scale_ptr="*fp32", sorted_ids_ptr="*i32", block_experts_ptr="*i32")
    types.update(x_ptr=f"*{activations}", h_ptr=f"*{activations}", out_ptr=f"*{activations}")
    for kernel in (moe_kernel._moe_gate_up_kernel, moe_kernel._moe_down_kernel):
        names = kernel.arg_names
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
        # what the launcher specialises on: 16-byte aligned pointers, strides that are multiples of 16
        aligned = {
            (i,): [["tt.divisibility", 16]]
            for i, n in enumerate(names)
            if n.endswith("_ptr") or n.startswith("stride")
        }
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned),
            target=GPUTarget("cuda", 90, 32),
        )
        assert compiled.asm["cubin"]
