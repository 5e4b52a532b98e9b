"""Top-1 routed experts with fixed shapes: a Triton grouped GEMM that a CUDA graph can capture.

out[t] = w2[e_t] · (silu(gate) * up),  [gate; up] = w13[e_t] · x[t]

for a batch of T tokens (decode: up to a few hundred) and E experts (Maverick: 128), with the
weights stacked as in `maverick.layers.moe.RoutedExperts`: w13 [E, 2I, H] (gate rows, then up
rows) and w2 [E, H, I], in a float dtype or in FP8 e4m3 with one fp32 scale per output row
(w13_scale [E, 2I], w2_scale [E, H]).

Design (vLLM's fused_moe, reduced to top-1): the tokens are sorted by expert on the device and
each expert's run is padded to a multiple of BLOCK_M rows (`align_by_expert`, a few small torch
ops: no `.tolist()`, no `.item()`, so no host sync). One program then computes a BLOCK_M x BLOCK_N
tile of one expert: its weight tile is read once for all of that expert's tokens in the block
(tokens that share an expert share the weight reads), the dots accumulate in fp32, and the FP8 row
scale multiplies the accumulated tile (it factors out of the sum over the input dimension). Two
kernels: gate_up + SiLU-and-multiply into h [P, I] in sorted order, then down, scattered back to the
tokens' rows. The number of blocks is bounded by cdiv(T, BLOCK_M) + min(T, E) whatever the
routing, so the grid is fixed; blocks past the last expert's run exit at once.

Numerics: FP8 weights are dequantised on the fly (e4m3 -> the activations' dtype, exact) and the
activations stay as they are (weight-only dequantisation). The eager FP8 path
(`maverick.layers.fp8.fp8_linear`) instead quantises each token's activations to e4m3 and runs
`_scaled_mm`, so the two differ by the e4m3 rounding of the activations (relative ~2^-4 per
element, averaging out in the sums). For float weights the two paths compute the same products;
this one rounds gate/up/h once (h is stored in the activations' dtype), the eager one after each
matmul.

Rows whose expert id is outside [0, E) (padding rows of a CUDA-graph batch) are skipped: their
output is zeros and their tokens cost no weight reads. The oracle is a per-token loop in
tests/test_moe_kernel.py; the eager `RoutedExperts.forward` is the model's reference.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the module stays importable (the eager MoE needs no triton)
    HAS_TRITON = False

FP8_DTYPE = torch.float8_e4m3fn


def align_by_expert(
    expert_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort tokens by expert, each expert's run padded to a multiple of block_m, on the device.

    expert_ids [T] (values outside [0, E) are skipped) -> (sorted_token_ids [NB * block_m] int32:
    token of each sorted row, T for a padding row; block_experts [NB] int32: the expert of each
    block of block_m rows, E for a block past the last run), NB = cdiv(T, block_m) + min(T, E).
    Shapes depend only on T, E and block_m: a CUDA graph replays it for any routing.
    """
    T, E, dev = expert_ids.shape[0], num_experts, expert_ids.device
    num_blocks = -(-T // block_m) + min(T, E)  # sum_e cdiv(n_e, M) <= T / M + #(experts with tokens)
    ids = expert_ids.long()
    valid = (ids >= 0) & (ids < E)  # [T]
    onehot = (ids[:, None] == torch.arange(E, device=dev)[None, :]).long()  # [T, E]; skipped rows: 0
    counts = onehot.sum(0)  # [E] tokens per expert
    padded = (counts + block_m - 1) // block_m * block_m  # [E] rows per expert, block-aligned
    ends = torch.cumsum(padded, 0)  # [E] end row of each expert's run
    rank = torch.cumsum(onehot, 0) - onehot  # [T, E]: earlier tokens of the same expert
    e = ids.clamp(0, E - 1)
    row = (ends - padded)[e] + rank.gather(1, e[:, None]).squeeze(1)  # [T] sorted row of each token
    P = num_blocks * block_m
    row = torch.where(valid, row, P)  # skipped tokens go to a dropped extra row
    sorted_ids = torch.full((P + 1,), T, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, row, torch.arange(T, dtype=torch.int32, device=dev))
    block_start = torch.arange(num_blocks, device=dev) * block_m  # [NB]
    # the expert whose padded run holds the block: how many runs end at or before its start
    block_experts = torch.searchsorted(ends, block_start, right=True).to(torch.int32)
    return sorted_ids[:P], block_experts


if HAS_TRITON:

    @triton.jit
    def _moe_gate_up_kernel(
        x_ptr,  # [T, H]
        w_ptr,  # [E, 2I, H]: gate rows [0, I), up rows [I, 2I)
        scale_ptr,  # FP8: [E, 2I] fp32 (else unused)
        sorted_ids_ptr,  # [P] int32: token of each sorted row (T = padding)
        block_experts_ptr,  # [P / BLOCK_M] int32 (E = no expert)
        h_ptr,  # [P, I] out: silu(gate) * up per sorted row
        num_tokens,
        hidden,  # H
        inter,  # I
        stride_xt,
        stride_we,
        stride_wn,
        stride_se,
        stride_hp,
        NUM_EXPERTS: tl.constexpr,
        FP8: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 dots (exact), else the 16-bit default
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_experts_ptr + pid_m)
        if e < NUM_EXPERTS:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            tok = tl.load(sorted_ids_ptr + offs_m)  # [BLOCK_M]
            tok_ok = tok < num_tokens
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] rows of gate (and of up)
            n_ok = offs_n < inter
            w_base = w_ptr + e.to(tl.int64) * stride_we
            acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, hidden, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < hidden
                x = tl.load(
                    x_ptr + tok.to(tl.int64)[:, None] * stride_xt + offs_k[None, :],
                    mask=tok_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )  # [BLOCK_M, BLOCK_K]
                w_mask = k_ok[:, None] & n_ok[None, :]
                # [BLOCK_K, BLOCK_N] tiles of the transposed weights; FP8 -> x's dtype is exact
                w_gate = tl.load(
                    w_base + offs_n[None, :] * stride_wn + offs_k[:, None], mask=w_mask, other=0.0
                ).to(x.dtype)
                w_up = tl.load(
                    w_base + (inter + offs_n)[None, :] * stride_wn + offs_k[:, None], mask=w_mask, other=0.0
                ).to(x.dtype)
                acc_gate += tl.dot(x, w_gate, input_precision=INPUT_PRECISION)
                acc_up += tl.dot(x, w_up, input_precision=INPUT_PRECISION)
            if FP8:  # per-row scales of the weights: columns of the accumulated tiles
                s_base = scale_ptr + e.to(tl.int64) * stride_se
                acc_gate *= tl.load(s_base + offs_n, mask=n_ok, other=0.0)[None, :]
                acc_up *= tl.load(s_base + inter + offs_n, mask=n_ok, other=0.0)[None, :]
            h = acc_gate * tl.sigmoid(acc_gate) * acc_up  # silu(gate) * up in fp32
            tl.store(
                h_ptr + offs_m.to(tl.int64)[:, None] * stride_hp + offs_n[None, :],
                h.to(h_ptr.dtype.element_ty),
                mask=tok_ok[:, None] & n_ok[None, :],
            )

    @triton.jit
    def _moe_down_kernel(
        h_ptr,  # [P, I]
        w_ptr,  # [E, H, I]
        scale_ptr,  # FP8: [E, H] fp32 (else unused)
        sorted_ids_ptr,  # [P] int32
        block_experts_ptr,  # [P / BLOCK_M] int32
        out_ptr,  # [T, H]: rows of skipped tokens are left as they are (zeros)
        num_tokens,
        hidden,  # H
        inter,  # I
        stride_hp,
        stride_we,
        stride_wn,
        stride_se,
        stride_ot,
        NUM_EXPERTS: tl.constexpr,
        FP8: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_experts_ptr + pid_m)
        if e < NUM_EXPERTS:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            tok = tl.load(sorted_ids_ptr + offs_m)
            tok_ok = tok < num_tokens
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
            n_ok = offs_n < hidden
            w_base = w_ptr + e.to(tl.int64) * stride_we
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, inter, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < inter
                h = tl.load(
                    h_ptr + offs_m.to(tl.int64)[:, None] * stride_hp + offs_k[None, :],
                    mask=tok_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )  # [BLOCK_M, BLOCK_K]
                w = tl.load(
                    w_base + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0,
                ).to(h.dtype)  # [BLOCK_K, BLOCK_N]
                acc += tl.dot(h, w, input_precision=INPUT_PRECISION)
            if FP8:
                acc *= tl.load(scale_ptr + e.to(tl.int64) * stride_se + offs_n, mask=n_ok, other=0.0)[None, :]
            tl.store(
                out_ptr + tok.to(tl.int64)[:, None] * stride_ot + offs_n[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=tok_ok[:, None] & n_ok[None, :],
            )


def fused_moe(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    *,
    block_m: int = 16,
    block_n: int = 32,
    block_k: int = 128,
    num_warps: int = 4,
) -> torch.Tensor:
    """Routed experts of a small batch: x [T, H] (already scaled by the router), expert_ids [T] ->
    out [T, H] in x's dtype; rows with an expert id outside [0, E) are zeros.

    w13 [E, 2I, H], w2 [E, H, I]: x's dtype, or FP8 e4m3 with w13_scale [E, 2I] and w2_scale [E, H]
    (fp32, one per output row; a trailing dimension of 1 is accepted). Fixed shapes, no host sync.
    block_m >= 16, block_n >= 16, block_k >= 16 are powers of two (tl.dot's smallest tile and
    tl.arange); block_n is small by default so a batch of one token still spreads each expert's
    rows over many programs.
    """
    if x.dim() != 2 or expert_ids.shape != (x.shape[0],):
        shapes = f"{tuple(x.shape)}, {tuple(expert_ids.shape)}"
        raise ValueError(f"expected x [T, H] and expert_ids [T], got {shapes}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expected w13 [E, 2I, H], w2 [E, H, I]; got {tuple(w13.shape)}, {tuple(w2.shape)}")
    T, H = x.shape
    E, two_i, w13_h = w13.shape
    inter = two_i // 2
    if w13_h != H or two_i % 2 or tuple(w2.shape) != (E, H, inter):
        raise ValueError(
            f"x [T, {H}] needs w13 [E, 2I, {H}] and w2 [E, {H}, I], got {tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    fp8 = w13.dtype == FP8_DTYPE
    if fp8:
        if w2.dtype != FP8_DTYPE or w13_scale is None or w2_scale is None:
            raise ValueError("FP8 experts need FP8 w13 and w2 and both row scales")
        w13_scale, w2_scale = w13_scale.reshape(E, two_i), w2_scale.reshape(E, H)
        if w13_scale.dtype != torch.float32 or w2_scale.dtype != torch.float32:
            raise ValueError("the FP8 row scales must be fp32")
    elif w13.dtype != x.dtype or w2.dtype != x.dtype or w13_scale is not None or w2_scale is not None:
        raise ValueError(f"float experts must be in x's dtype {x.dtype} and have no scales")
    for name, blk in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    if x.stride(-1) != 1 or w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("x, w13 and w2 must be contiguous in their last dimension")
    if not HAS_TRITON:
        raise RuntimeError("fused_moe needs triton, which is not installed")

    out = torch.zeros_like(x)  # skipped rows stay zero
    if T == 0:
        return out
    sorted_ids, block_experts = align_by_expert(expert_ids, E, block_m)
    num_blocks = block_experts.shape[0]
    h = torch.empty((sorted_ids.shape[0], inter), dtype=x.dtype, device=x.device)  # [P, I]
    dummy = w13  # the scale pointers of float experts are never read
    s13, s2 = (w13_scale, w2_scale) if fp8 else (dummy, dummy)
    common = dict(
        NUM_EXPERTS=E,
        FP8=fp8,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    _moe_gate_up_kernel[(num_blocks, triton.cdiv(inter, block_n))](
        x,
        w13,
        s13,
        sorted_ids,
        block_experts,
        h,
        T,
        H,
        inter,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        s13.stride(0),
        h.stride(0),
        BLOCK_N=block_n,
        **common,
    )
    _moe_down_kernel[(num_blocks, triton.cdiv(H, block_n))](
        h,
        w2,
        s2,
        sorted_ids,
        block_experts,
        out,
        T,
        H,
        inter,
        h.stride(0),
        w2.stride(0),
        w2.stride(1),
        s2.stride(0),
        out.stride(0),
        BLOCK_N=block_n,
        **common,
    )
    return out
