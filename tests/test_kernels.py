"""The Triton paged decode attention kernel (maverick/kernels/paged_attention.py) against an
independent oracle, run on the CPU by Triton's interpreter, and compiled for sm_90 (no GPU needed).

Triton 3.8 reads TRITON_INTERPRET when @triton.jit decorates a function (runtime/jit.py: the
decorator returns an InterpretedFunction if `knobs.runtime.interpret`, which reads the environment
variable), i.e. once, when maverick.kernels.paged_attention is first imported. Any earlier import in
this process (another test, the engine) fixes the kernel as a compiled JITFunction, which needs a
GPU. So the kernel runs in a fresh subprocess with TRITON_INTERPRET=1: this process builds the
inputs, the subprocess runs the wrapper on each case and saves the outputs (it first asserts that
the kernel really is interpreted), and this process compares them with the oracle.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import run_cases

from maverick.kernels import paged_attention as pa
from maverick.kernels.paged_attention import paged_decode_attention
from maverick.layers.attention import AttentionMetadata, paged_attention

needs_triton = pytest.mark.skipif(not pa.HAS_TRITON, reason="triton is not installed")


def make_case(
    seq_lens: list[int],
    *,
    block_size: int = 8,
    head_dim: int = 16,
    num_kv_heads: int = 2,
    group: int = 2,
    chunk_size: int | None = None,
    q_dtype: torch.dtype = torch.float32,
    cache_dtype: torch.dtype = torch.float32,
    q_view: bool = False,
    seed: int = 0,
    **kwargs,
) -> dict:
    """Wrapper arguments: blocks handed out in a shuffled order; table entries past a sequence's
    blocks, and the cache slots past its length, hold large values, which would show if read."""
    g = torch.Generator().manual_seed(seed)
    B, H = len(seq_lens), num_kv_heads * group
    counts = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(counts) + 1  # block 0 is a decoy: the table's padding entries point at it
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    block_tables = torch.zeros(B, max(counts) + 2, dtype=torch.int32)
    for b, c in enumerate(counts):
        block_tables[b, :c] = torch.tensor(order[:c], dtype=torch.int32)
        order = order[c:]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    for b, n in enumerate(seq_lens):  # slots past a sequence's length: cached garbage
        for pos in range(n, counts[b] * block_size):
            blk = block_tables[b, pos // block_size]
            k_cache[blk, pos % block_size], v_cache[blk, pos % block_size] = 50.0, 1e3
    k_cache[0], v_cache[0] = 50.0, 1e3
    if q_view:  # q as the model has it: a slice of the fused qkv projection (rows not contiguous)
        q = torch.randn(B, H + 2 * num_kv_heads, head_dim, generator=g)[:, :H]
    else:
        q = torch.randn(B, H, head_dim, generator=g)
    return dict(
        q=q.to(q_dtype),
        k_cache=k_cache.to(cache_dtype),
        v_cache=v_cache.to(cache_dtype),
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        scale=head_dim**-0.5,
        chunk_size=chunk_size,
        **kwargs,
    )


def oracle(q, k_cache, v_cache, block_tables, seq_lens, scale, chunk_size, **_) -> torch.Tensor:
    """softmax(q k^T * scale) v in float64, keys gathered position by position from the block table."""
    B, H, D = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = H // num_kv_heads
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue  # padding row: zeros
        start = 0 if chunk_size is None else (n - 1) // chunk_size * chunk_size
        keys, values = [], []
        for pos in range(start, n):
            blk = int(block_tables[b, pos // block_size])
            keys.append(k_cache[blk, pos % block_size])
            values.append(v_cache[blk, pos % block_size])
        k, v = torch.stack(keys).double(), torch.stack(values).double()  # [K, Hkv, D]
        for h in range(H):
            w = torch.softmax(k[:, h // group] @ q[b, h].double() * scale, dim=0)  # [K]
            out[b, h] = w @ v[:, h // group]
    return out


# block_size 8 unless said: lengths 1, bs-1, bs, bs+1, several blocks, long, and a padding row.
LENGTHS = [1, 7, 8, 9, 30, 100, 0]
CASES = {
    # block_n 16: each loop step spans two blocks, long rows take several steps; q strided
    "full": dict(seq_lens=LENGTHS, head_dim=32, block_n=16, q_view=True),
    "full_default_tile": dict(seq_lens=LENGTHS),  # block_n 64
    "chunk_2_blocks": dict(seq_lens=[1, 15, 16, 17, 33, 100, 0], chunk_size=16, block_n=16),
    "chunk_1_block": dict(seq_lens=[1, 7, 8, 9, 47, 0], chunk_size=8, block_n=16),
    # windows that start inside a block
    "chunk_not_block_multiple": dict(seq_lens=[1, 12, 13, 25, 97, 0], chunk_size=12, block_n=16),
    "chunk_below_block": dict(seq_lens=[1, 3, 4, 9, 50, 0], chunk_size=3, block_n=16),
    "chunk_over_lengths": dict(seq_lens=LENGTHS, chunk_size=128),  # the same as full attention
    "gqa_1": dict(seq_lens=[1, 9, 40, 0], num_kv_heads=4, group=1, block_n=16),
    "gqa_4": dict(seq_lens=[1, 9, 40, 0], num_kv_heads=2, group=4, chunk_size=16, block_n=16),
    # Maverick per GPU at TP 8: 5 query heads on 1 KV head (a group that is not a power of two)
    "gqa_5": dict(seq_lens=[1, 9, 40, 0], num_kv_heads=1, group=5, block_n=16),
    "block_size_4": dict(seq_lens=[1, 3, 4, 5, 50, 0], block_size=4, chunk_size=8, block_n=16),
    "block_size_32": dict(seq_lens=[1, 31, 32, 33, 100, 0], block_size=32),
    # bf16 cache cast to fp32 on load (the interpreter stores bf16 as uint16 and converts it)
    "bf16_cache_full": dict(seq_lens=LENGTHS, cache_dtype=torch.bfloat16, block_n=16),
    "bf16_cache_chunked": dict(seq_lens=LENGTHS, cache_dtype=torch.bfloat16, chunk_size=16),
    # 16-bit dots (q and cache both fp16, p cast to fp16): the production path, as bf16 runs it.
    # bf16 x bf16 itself cannot run here: the interpreter's tl.dot multiplies bf16's uint16
    # storage as integers (triton 3.8 runtime/interpreter.py create_dot), so fp16 stands in.
    "fp16": dict(seq_lens=LENGTHS, q_dtype=torch.float16, cache_dtype=torch.float16, chunk_size=16),
    # flash-decoding: 4 splits of a window (most get no tile on short rows), merged by log-sum-exp
    "splits_4": dict(seq_lens=LENGTHS, num_splits=4, block_n=16),
    "splits_3_chunked": dict(
        seq_lens=[1, 30, 64, 65, 127, 0], num_splits=3, chunk_size=64, block_n=16, group=5
    ),
    # tied to maverick.layers.attention.paged_attention below (no padding row: it has none)
    "reference_full": dict(seq_lens=[5, 8, 33, 70], head_dim=32, block_size=16),
    "reference_chunked": dict(seq_lens=[5, 8, 33, 70], head_dim=32, block_size=16, chunk_size=32),
}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3}  # by q's dtype: the dots' operand dtype


@pytest.fixture(scope="module")
def cases() -> dict[str, dict]:
    return {name: make_case(seed=i, **spec) for i, (name, spec) in enumerate(CASES.items())}


@pytest.fixture(scope="module")
def kernel_outputs(cases, tmp_path_factory) -> dict[str, torch.Tensor | str]:
    if not pa.HAS_TRITON:
        pytest.skip("triton is not installed")
    return run_cases(
        "maverick.kernels.paged_attention",
        "_paged_decode_kernel",
        "paged_decode_attention",
        cases,
        tmp_path_factory.mktemp("paged_kernel"),
    )


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_oracle(name, cases, kernel_outputs):
    case, out = cases[name], kernel_outputs[name]
    assert isinstance(out, torch.Tensor), f"the kernel raised:\n{out}"
    q = case["q"]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    expected = oracle(**case)
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    padding = case["seq_lens"] == 0
    assert (out[padding] == 0).all()


@needs_triton
@pytest.mark.parametrize("chunk_size", [None, 32])
def test_kernel_matches_project_reference(chunk_size, cases, kernel_outputs):
    """The same case through maverick.layers.attention.paged_attention: one decode token each."""
    name = "reference_full" if chunk_size is None else "reference_chunked"
    case = cases[name]
    block_size = case["k_cache"].shape[1]
    seq_lens = case["seq_lens"].tolist()
    last = torch.tensor(seq_lens) - 1  # the new token of each sequence
    slots = case["block_tables"][torch.arange(len(seq_lens)), last // block_size].long() * block_size
    meta = AttentionMetadata(
        slot_mapping=slots + last % block_size,
        block_tables=case["block_tables"],
        query_lens=[1] * len(seq_lens),
        seq_lens=seq_lens,
        block_size=block_size,
    )
    ref = paged_attention(case["q"], case["k_cache"], case["v_cache"], meta, case["scale"], chunk_size)
    torch.testing.assert_close(kernel_outputs[name], ref, atol=1e-5, rtol=1e-5)


def test_rejects_non_power_of_two_shapes():
    good = make_case([5, 9], block_size=8)
    bad_block = make_case([5, 9], block_size=6)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        paged_decode_attention(**bad_block)
    bad_dim = make_case([5, 9], head_dim=24)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        paged_decode_attention(**bad_dim)
    with pytest.raises(ValueError, match="block_n"):
        paged_decode_attention(**good, block_n=4)  # smaller than a block


def test_needs_triton(monkeypatch):
    monkeypatch.setattr(pa, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="needs triton"):
        paged_decode_attention(**make_case([5, 9]))


@needs_triton
def test_compiles_for_hopper():
    """The interpreter accepts what the GPU compiler may reject (its tl.dot has no minimum shape):
    compile Maverick's decode at TP 8 (bf16, 5 query heads on 1 KV head, blocks of 16, head_dim
    128, chunked, 4 splits) and the split merge for sm_90, down to a cubin with the ptxas in the
    triton wheel. Needs no GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(pa._paged_decode_kernel, JITFunction):
        pytest.skip("TRITON_INTERPRET is set in this process: the kernel is an interpreted function")
    decode = dict(GROUP=5, GROUP_P=8, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_N=64, CHUNK_SIZE=8192)
    decode.update(NUM_SPLITS=4, INPUT_PRECISION="tf32")
    combine = dict(NUM_SPLITS=4, SPLITS_P=4, HEAD_DIM=128)
    decode_ptrs = dict(q_ptr="*bf16", k_cache_ptr="*bf16", v_cache_ptr="*bf16", block_tables_ptr="*i32")
    decode_ptrs.update(seq_lens_ptr="*i32", out_ptr="*fp32", lse_ptr="*fp32", qk_scale="fp32")
    combine_ptrs = dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr="*bf16")
    for kernel, constexprs, types in [
        (pa._paged_decode_kernel, decode, decode_ptrs),
        (pa._combine_splits_kernel, combine, combine_ptrs),
    ]:
        names = kernel.arg_names
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
        # What the launcher specialises on these shapes: 16-byte aligned pointers, and the strides
        # over heads, blocks and tokens (multiples of head_dim 128) divisible by 16.
        aligned = {
            (i,): [["tt.divisibility", 16]]
            for i, n in enumerate(names)
            if n.endswith("_ptr")
            or n in ("stride_qb", "stride_qh", "stride_ob", "stride_oh", "stride_os")
            or n.startswith(("stride_k", "stride_v", "stride_p"))
        }
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned),
            target=GPUTarget("cuda", 90, 32),
        )
        assert compiled.asm["cubin"]
