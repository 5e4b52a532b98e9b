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
class DecodePlan:
    """Batched keys for decodes (sequences that bring one new token) of similar context length,
    padded to the longest of them."""

    rows: torch.Tensor  # [S_d]: their rows in the flat batch
    slots: torch.Tensor  # [S_d, K]: cache slots of the keys each may see (padding points at slot 0)
    mask: torch.Tensor  # [S_d, 1, 1, K] bool: real keys


@dataclass
class PrefillPlan:
    """One sequence with several new tokens: its keys and its causal (and chunk) mask."""

    start: int  # first row in the flat batch
    num_tokens: int
    slots: torch.Tensor  # [K]
    mask: torch.Tensor  # [n, K] bool


@dataclass
class AttentionMetadata:
    """What every attention layer of one forward step needs. Built once per step by the runner."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot for each new token
    block_tables: torch.Tensor  # [S, max_blocks] int32
    query_lens: list[int]  # new tokens per sequence (sum = T)
    seq_lens: list[int]  # tokens in the cache per sequence after this step (context + new)
    block_size: int
    # Gather indices and masks, built lazily once per step per chunk size (None = full attention)
    # and shared by all layers of that kind.
    _plans: dict[int | None, tuple[list[DecodePlan], list[PrefillPlan]]] = field(
        default_factory=dict, repr=False
    )

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def plan(self, chunk_size: int | None) -> tuple[list[DecodePlan], list[PrefillPlan]]:
        if chunk_size not in self._plans:
            self._plans[chunk_size] = self._build(chunk_size)
        return self._plans[chunk_size]

    def _key_window(self, total: int, first_q: int, chunk_size: int | None) -> int:
        """First key position a sequence's queries may see: its chunk start, or 0."""
        return 0 if chunk_size is None else (first_q // chunk_size) * chunk_size

    def _build(self, chunk_size: int | None) -> tuple[list[DecodePlan], list[PrefillPlan]]:
        device, bs = self.block_tables.device, self.block_size
        decode_idx, decode_rows, prefills = [], [], []
        row = 0
        for s, (n, total) in enumerate(zip(self.query_lens, self.seq_lens, strict=True)):
            if n == 1:
                decode_idx.append(s)
                decode_rows.append(row)
            else:
                kv_start = self._key_window(total, total - n, chunk_size)
                key_pos = torch.arange(kv_start, total, device=device)  # [K]
                q_pos = torch.arange(total - n, total, device=device)  # [n]
                slots = self.block_tables[s, key_pos // bs].long() * bs + key_pos % bs
                mask = key_pos[None, :] <= q_pos[:, None]
                if chunk_size is not None:
                    mask &= (key_pos // chunk_size)[None, :] == (q_pos // chunk_size)[:, None]
                prefills.append(PrefillPlan(row, n, slots, mask))
            row += n
        windows = []  # (decode index, first key position, total) of each decode
        for s_i in decode_idx:
            total = self.seq_lens[s_i]
            windows.append((s_i, self._key_window(total, total - 1, chunk_size), total))
        rows = dict(zip(decode_idx, decode_rows, strict=True))
        return [self._decode_group(g, rows) for g in _length_groups(windows)], prefills

    def _decode_group(self, group: list[tuple[int, int, int]], rows: dict[int, int]) -> DecodePlan:
        device, bs = self.block_tables.device, self.block_size
        width = max(total - start for _, start, total in group)
        idx = torch.tensor([s for s, _, _ in group], device=device)
        total_t = torch.tensor([t for _, _, t in group], device=device)[:, None]
        key_pos = torch.tensor([k for _, k, _ in group], device=device)[:, None] + torch.arange(
            width, device=device
        )
        valid = key_pos < total_t  # [S_d, K]
        key_pos = torch.where(valid, key_pos, 0)
        slots = self.block_tables[idx].gather(1, key_pos // bs).long() * bs + key_pos % bs
        return DecodePlan(
            torch.tensor([rows[s] for s, _, _ in group], device=device), slots, valid[:, None, None, :]
        )


def _length_groups(windows: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Decodes grouped so that each is padded to at most twice its own key count: one padded
    batch per group instead of all padded to the longest (full-attention layers see contexts of
    very different lengths; chunked layers mostly one group)."""
    ordered = sorted(windows, key=lambda w: w[2] - w[1], reverse=True)
    groups: list[list[tuple[int, int, int]]] = []
    for w in ordered:
        if groups and 2 * (w[2] - w[1]) >= groups[-1][0][2] - groups[-1][0][1]:
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


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

    Reference implementation on SDPA: all decodes in one padded batch, each prefill chunk on its
    own. Exact on any device; faster kernels are checked against it. GQA: the query heads of a KV
    head are folded into the query length, so K/V are never repeated.
    """
    T, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    out = torch.empty_like(q)
    decodes, prefills = meta.plan(chunk_size)
    for decode in decodes:
        S = decode.rows.shape[0]
        q_d = q[decode.rows].view(S, num_kv_heads, group, head_dim)  # [S, Hkv, G, D]
        # index_select on the flattened slots: several times faster than 2-D advanced indexing
        flat = decode.slots.reshape(-1)
        k_d = k_flat.index_select(0, flat).view(S, -1, num_kv_heads, head_dim).to(q.dtype).transpose(1, 2)
        v_d = v_flat.index_select(0, flat).view(S, -1, num_kv_heads, head_dim).to(q.dtype).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q_d, k_d, v_d, attn_mask=decode.mask, scale=scale
        )  # [S, Hkv, G, D]
        out[decode.rows] = o.reshape(S, num_heads, head_dim)
    for p in prefills:
        n = p.num_tokens
        q_s = (
            q[p.start : p.start + n].view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        )  # [Hkv, G, n, D]
        k_s = k_flat.index_select(0, p.slots).to(q.dtype).transpose(0, 1)[:, None]  # [Hkv, 1, K, D]
        v_s = v_flat.index_select(0, p.slots).to(q.dtype).transpose(0, 1)[:, None]
        o = F.scaled_dot_product_attention(
            q_s, k_s.expand(-1, group, -1, -1), v_s.expand(-1, group, -1, -1), attn_mask=p.mask, scale=scale
        )  # [Hkv, G, n, D]
        out[p.start : p.start + n] = o.permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)
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
