"""Decode attention over a paged KV cache: a Triton kernel that a CUDA graph can capture.

Each sequence brings one new query token (at position seq_len - 1, its K/V already written to the
cache) that attends to the keys its layer may see, read through the sequence's block table:
positions [0, seq_len) on NoPE layers, [chunk start, seq_len) on chunked RoPE layers (Llama 4's
absolute chunks, not a sliding window). All inputs have fixed shapes and each sequence's window is
computed on the device from `seq_lens`, so a launch needs no host sync and replays in a CUDA graph
whose batch is padded with rows of seq_len 0 (their output is zeros, nothing is read for them).

Design: one program per (sequence, KV head, split) handles the `group` query heads that share the
KV head, so each K/V tile is loaded once for all of them (GQA). It walks its part of the window in
tiles of BLOCK_N tokens (whole cache blocks: a tile starts at a block boundary) with an online
softmax in fp32. With num_splits > 1 (flash-decoding) the window's tiles are shared among
num_splits programs and a second kernel merges their partial outputs by log-sum-exp: this fills the
GPU when batch * num_kv_heads is small (Maverick at TP 8 has one KV head per GPU) and contexts long.

Constraints, checked by the wrapper: block_size and head_dim are powers of two (tl.arange needs
power-of-two lengths, and a tile must hold whole blocks), head_dim >= 16 (tl.dot's smallest
reduction length for 16-bit operands). Not checked (it would need a host sync): every
seq_len <= max_blocks * block_size.

The reference is `maverick.layers.attention.paged_attention`; tests/test_kernels.py ties them.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the module stays importable (the reference path needs no triton)
    HAS_TRITON = False


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr,  # [B, H, D]
        k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
        v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
        block_tables_ptr,  # [B, max_blocks] int32
        seq_lens_ptr,  # [B] int32
        out_ptr,  # NUM_SPLITS == 1: out [B, H, D] (q's dtype); else partial outputs [B, H, S, D] fp32
        lse_ptr,  # NUM_SPLITS > 1: [B, H, S] fp32, log2-sum-exp2 of each split's scores (else unused)
        qk_scale,  # softmax scale * log2(e): scores are kept in the log2 domain for exp2
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_btb,
        stride_ob,
        stride_oh,
        stride_os,  # split stride of the partial outputs (0 when NUM_SPLITS == 1)
        stride_lb,
        stride_lh,
        GROUP: tl.constexpr,  # query heads per KV head
        GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two (the padded rows are masked)
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,  # tokens per cache block
        BLOCK_N: tl.constexpr,  # tokens per loop step, a multiple of BLOCK_SIZE
        CHUNK_SIZE: tl.constexpr,  # attention chunk of RoPE layers; 0 = whole causal history
        NUM_SPLITS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 dots (exact), else the 16-bit default
    ):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

        seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
        # The window [win_start, seq_len) of the query at position seq_len - 1.
        if CHUNK_SIZE > 0:
            win_start = (tl.maximum(seq_len - 1, 0) // CHUNK_SIZE) * CHUNK_SIZE
        else:
            win_start = 0
        # Tiles start at the window's first block, so only the window's blocks are visited and every
        # tile holds at least one key of the window. A padding row (seq_len 0) has no tile.
        tile_lo = (win_start // BLOCK_SIZE) * BLOCK_SIZE
        num_tiles = tl.cdiv(seq_len - tile_lo, BLOCK_N)
        tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        t_begin = split * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)

        offs_g = tl.arange(0, GROUP_P)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        heads = kv_head * GROUP + offs_g  # [GROUP_P] the query heads of this KV head
        head_ok = offs_g < GROUP  # [GROUP_P]

        # Dots run in q's dtype (K/V are cast on load), accumulation in fp32.
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=head_ok[:, None],
            other=0.0,
        )  # [GROUP_P, D]
        k_base = k_cache_ptr + kv_head * stride_kh
        v_base = v_cache_ptr + kv_head * stride_vh
        table = block_tables_ptr + b * stride_btb

        m_i = tl.full([GROUP_P], float("-inf"), tl.float32)  # running max score (log2 domain)
        l_i = tl.zeros([GROUP_P], tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([GROUP_P, HEAD_DIM], tl.float32)  # running sum of p * v
        for t in range(t_begin, t_end):
            pos = tile_lo + t * BLOCK_N + offs_n  # [BLOCK_N] key positions
            valid = (pos >= win_start) & (pos < seq_len)
            # Masked so that a tile overhanging seq_len never reads the table past the sequence.
            block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)  # [BLOCK_N]
            k_off = block * stride_kb + (pos % BLOCK_SIZE) * stride_kt  # [BLOCK_N] int64
            v_off = block * stride_vb + (pos % BLOCK_SIZE) * stride_vt
            k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            k = k.to(q.dtype)  # [BLOCK_N, D]
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # [GROUP_P, BLOCK_N]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # m_new is finite (each tile has a key of the window); the guard keeps exp2 away from
            # -inf - -inf should that ever change.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)  # [GROUP_P] rescales what was summed so far
            p = tl.exp2(s - m_safe[:, None])  # [GROUP_P, BLOCK_N], 0 at masked keys
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = v.to(q.dtype)  # [BLOCK_N, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=INPUT_PRECISION)
            m_i = m_new

        # No key (padding row, or a split past the window's end): l_i == 0 and acc == 0 -> zeros.
        has_keys = l_i > 0
        o = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # [GROUP_P, D]
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
        if NUM_SPLITS == 1:
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
        else:
            lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
            tl.store(o_ptrs, o, mask=head_ok[:, None])
            tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=head_ok)

    @triton.jit
    def _combine_splits_kernel(
        part_ptr,  # [B, H, S, D] fp32: each split's normalised output
        lse_ptr,  # [B, H, S] fp32: each split's log2-sum-exp2, -inf for a split without keys
        out_ptr,  # [B, H, D]
        stride_pb,
        stride_ph,
        stride_ps,
        stride_lb,
        stride_lh,
        stride_ob,
        stride_oh,
        NUM_SPLITS: tl.constexpr,
        SPLITS_P: tl.constexpr,  # NUM_SPLITS rounded up to a power of two
        HEAD_DIM: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, SPLITS_P)
        offs_d = tl.arange(0, HEAD_DIM)
        split_ok = offs_s < NUM_SPLITS
        lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=split_ok, other=float("-inf"))
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # a padding row: every split is empty
        w = tl.exp2(lse - m)  # [SPLITS_P] each split's share of the softmax mass (unnormalised)
        part = tl.load(
            part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
            mask=split_ok[:, None],
            other=0.0,
        )  # [SPLITS_P, D]
        den = tl.sum(w, axis=0)
        o = tl.sum(w[:, None] * part, axis=0) / tl.where(den > 0, den, 1.0)  # [D]
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    chunk_size: int | None = None,
    *,
    num_splits: int = 1,
    block_n: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged K/V: q [B, H, D] -> out [B, H, D].

    k_cache, v_cache: [num_blocks, block_size, Hkv, D], any float dtype (cast on load to q's).
    block_tables: [B, max_blocks] int32; entries past a sequence's blocks are never read.
    seq_lens: [B] int32, tokens in the cache including the new one; 0 marks a padding row (zeros out).
    chunk_size: None = NoPE layer (keys [0, seq_len)); else keys [chunk start, seq_len).
    num_splits: programs sharing one sequence's window (flash-decoding); a fixed number, so the
        launch stays graph-capturable. Worth more than 1 when B * Hkv is well under the SM count.
    block_n: tokens per loop step (power of two, multiple of block_size, >= 16); default
        max(block_size, 64).
    """
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"expected q [B, H, D] and caches [N, block_size, Hkv, D], got {q.shape}, {k_cache.shape}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if not _is_pow2(block_size):
        raise ValueError(f"block_size must be a power of two (tl.arange lengths), got {block_size}")
    if not _is_pow2(head_dim) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 (tl.arange, tl.dot), got {head_dim}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(
            f"expected block_tables [{batch}, max_blocks] and seq_lens [{batch}], "
            f"got {tuple(block_tables.shape)}, {tuple(seq_lens.shape)}"
        )
    if block_tables.dtype not in (torch.int32, torch.int64) or seq_lens.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise ValueError(
            f"block_tables and seq_lens must be int32, got {block_tables.dtype}, {seq_lens.dtype}"
        )
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q must be fp32, fp16 or bf16, got {q.dtype}")
    if (
        q.stride(-1) != 1
        or k_cache.stride(-1) != 1
        or v_cache.stride(-1) != 1
        or block_tables.stride(-1) != 1
    ):
        raise ValueError("q, the caches and block_tables must be contiguous in their last dimension")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    block_n = max(block_size, 64) if block_n is None else block_n
    if not _is_pow2(block_n) or block_n < max(block_size, 16):
        raise ValueError(f"block_n must be a power of two >= max(block_size, 16), got {block_n}")
    if not HAS_TRITON:
        raise RuntimeError("paged_decode_attention needs triton, which is not installed")

    group = num_heads // num_kv_heads
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_splits == 1:
        part, lse, part_strides, lse_strides = out, out, (*out.stride()[:2], 0), (0, 0)
    else:
        # Allocated per call: inside CUDA-graph capture they come from the graph's private pool.
        part = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_strides, lse_strides = part.stride()[:3], lse.stride()[:2]
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        part,
        lse,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        *part_strides,
        *lse_strides,
        GROUP=group,
        GROUP_P=_next_pow2(group),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        CHUNK_SIZE=chunk_size or 0,
        NUM_SPLITS=num_splits,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    if num_splits > 1:
        _combine_splits_kernel[(batch, num_heads)](
            part,
            lse,
            out,
            *part.stride()[:3],
            *lse.stride()[:2],
            *out.stride()[:2],
            NUM_SPLITS=num_splits,
            SPLITS_P=_next_pow2(num_splits),
            HEAD_DIM=head_dim,
        )
    return out
