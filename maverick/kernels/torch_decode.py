"""The fixed-shape decode path's two kernels in plain PyTorch, for the CPU: what `torch.compile`
(inductor's C++ backend) turns into a few fused loops per batch-size bucket, as a CUDA graph
replays the Triton kernels on a GPU (engine/cuda_graph.py, decode_path "compiled").

Same contracts as `paged_attention.paged_decode_attention` and `moe.fused_moe`: fixed shapes, the
window of each row computed from `seq_lens` on the device, padding rows (seq_len 0, expert id E)
give zeros. The attention reads only the block-table columns it is given: the runner passes the
batch's width, not the buffers'. The attention's two products are matmuls over the gathered keys
(written as products and sums, inductor recomputed the scores inside the second reduction); the
routed experts are products and sums over each row's gathered expert, which inductor fuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]: each row's one new query (its K/V already in the cache)
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] int32: the batch's blocks (W: its longest table)
    seq_lens: torch.Tensor,  # [B] int32; 0 = padding row
    scale: float,
    chunk_size: int | None,  # RoPE layers: keys from the query's chunk start; None: all history
) -> torch.Tensor:
    """-> [B, H, D] in q's dtype. Softmax in fp32; the G query heads of a KV head share its keys."""
    B, H, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    W = block_tables.shape[1]
    pos = seq_lens.long() - 1  # [B] the query's position (-1: padding)
    if chunk_size is None:
        first = torch.zeros_like(pos)
        block_idx = torch.arange(W, device=q.device).expand(B, W)  # [B, W]
    else:
        # a chunk's keys span at most this many blocks, from the one holding the chunk's start (not
        # min(W, ...): the graph would then specialise on W; columns past W are masked)
        first = pos.clamp(min=0) // chunk_size * chunk_size
        n = (chunk_size + 2 * bs - 2) // bs
        block_idx = first[:, None] // bs + torch.arange(n, device=q.device)  # [B, n]
    key_pos = (block_idx[:, :, None] * bs + torch.arange(bs, device=q.device)).flatten(1)  # [B, K]
    valid = (key_pos >= first[:, None]) & (key_pos <= pos[:, None])
    valid[:, 0] |= pos < 0  # a padding row sees one key, so its softmax stays finite
    blocks = block_tables.gather(1, block_idx.clamp(max=W - 1)).long()  # past-the-end: masked
    slots = (blocks[:, :, None] * bs + torch.arange(bs, device=q.device)).flatten(1)  # [B, K]
    # the keys and values of the window gathered, then two batched matmuls (see the module docstring)
    k = k_cache.view(-1, Hkv, D)[slots].to(q.dtype).transpose(1, 2)  # [B, Hkv, K, D]
    v = v_cache.view(-1, Hkv, D)[slots].to(q.dtype).transpose(1, 2)
    qg = q.view(B, Hkv, H // Hkv, D)
    scores = torch.matmul(qg, k.transpose(2, 3)).float() * scale  # [B, Hkv, G, K]
    probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(dim=-1)
    out = torch.matmul(probs.to(q.dtype), v).reshape(B, H, D)
    return out * (pos >= 0)[:, None, None].to(out.dtype)


def routed_experts(
    x: torch.Tensor, expert_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """x [T, H] (already scaled by the router), expert_ids [T] -> [T, H]; float experts w13
    [E, 2I, H], w2 [E, H, I]; rows whose id is outside [0, E) are zeros.

    Each row's expert weights gathered and multiplied as products and sums: inductor fuses the
    gather into the reduction, so each row reads its own expert's rows in place (the work of top-1
    routing, no grouping on the host, no padding to the busiest expert)."""
    E = w13.shape[0]
    real = (expert_ids >= 0) & (expert_ids < E)
    ids = torch.where(real, expert_ids, 0)
    gate, up = (x[:, None, :] * w13[ids]).sum(-1).chunk(2, dim=-1)  # [T, I] each
    out = ((F.silu(gate) * up)[:, None, :] * w2[ids]).sum(-1)  # [T, H]
    return out * real[:, None].to(out.dtype)
