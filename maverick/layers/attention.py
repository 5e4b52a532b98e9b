"""Paged attention over a flat batch of tokens from several sequences.

The KV cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim].
A token's K/V lives at slot `block_table[seq][pos // block_size] * block_size + pos % block_size`;
the caller passes those slots as `slot_mapping` for the tokens of this step, and each sequence's
block table for reading. Each sequence's new tokens are the last `query_len` of its `seq_len`.

Two masks exist in Llama 4: RoPE layers attend only inside their absolute chunk
(i // C == j // C, j <= i; not a sliding window), NoPE layers attend to the whole causal history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """What every attention layer of one forward step needs. Built once per step by the runner."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot for each new token
    block_tables: torch.Tensor  # [S, max_blocks] int32
    query_lens: list[int]  # new tokens per sequence (sum = T)
    seq_lens: list[int]  # tokens in the cache per sequence after this step (context + new)
    block_size: int
    # Per-sequence gather indices and masks, built lazily once per step per chunk size and shared
    # by all layers (None = full attention).
    _plans: dict[int | None, list[tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict, repr=False
    )

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def plan(self, chunk_size: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each sequence: (slots [Lk] of the keys it may see, mask [n, Lk] bool)."""
        if chunk_size not in self._plans:
            self._plans[chunk_size] = [self._plan_one(s, chunk_size) for s in range(self.num_seqs)]
        return self._plans[chunk_size]

    def _plan_one(self, s: int, chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.block_tables.device
        n, total = self.query_lens[s], self.seq_lens[s]
        first_q = total - n
        kv_start = 0 if chunk_size is None else (first_q // chunk_size) * chunk_size
        key_pos = torch.arange(kv_start, total, device=device)  # [Lk]
        q_pos = torch.arange(first_q, total, device=device)  # [n]
        blocks = self.block_tables[s, key_pos // self.block_size].long()
        slots = blocks * self.block_size + key_pos % self.block_size
        mask = key_pos[None, :] <= q_pos[:, None]
        if chunk_size is not None:
            mask &= (key_pos // chunk_size)[None, :] == (q_pos // chunk_size)[:, None]
        return slots, mask


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store this step's k, v [T, num_kv_heads, head_dim] at their slots."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    chunk_size: int | None,
) -> torch.Tensor:
    """q [T, num_heads, head_dim] -> [T, num_heads, head_dim], reading K/V from the cache.

    Reference implementation on SDPA, one sequence at a time: exact on any device, and what faster
    kernels are checked against.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    out = torch.empty_like(q)
    start = 0
    for (slots, mask), n in zip(meta.plan(chunk_size), meta.query_lens, strict=True):
        q_s = q[start : start + n].transpose(0, 1)  # [H, n, D]
        k_s = k_flat[slots].to(q.dtype).transpose(0, 1).repeat_interleave(group, dim=0)  # [H, Lk, D]
        v_s = v_flat[slots].to(q.dtype).transpose(0, 1).repeat_interleave(group, dim=0)
        o = F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=mask, scale=scale)  # [H, n, D]
        out[start : start + n] = o.transpose(0, 1)
        start += n
    return out


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (k_cache, v_cache) pair per layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]
