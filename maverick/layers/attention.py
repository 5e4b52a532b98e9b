"""Paged attention over a flat batch of tokens from several sequences.

The KV cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim].
A token's K/V lives at slot `block_table[seq][pos // block_size] * block_size + pos % block_size`;
the caller passes those slots as `slot_mapping` for the tokens of this step, and each sequence's
block table for reading. Each sequence's new tokens are the last `query_len` of its `seq_len`.

Two masks exist in Llama 4: RoPE layers attend only inside their absolute chunk
(i // C == j // C, j <= i; not a sliding window), NoPE layers attend to the whole causal history.
So in chunked layers a prefill is cut at chunk boundaries into pieces that each see at most C keys,
and all pieces of a step run as one batch: n * C work instead of n * n for an n-token prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
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
    """One sequence with several new tokens in a full-attention layer: its keys and causal mask."""

    start: int  # first row in the flat batch
    num_tokens: int
    slots: torch.Tensor  # [K]
    mask: torch.Tensor  # [n, K] bool


@dataclass
class ChunkPiecesPlan:
    """The prefill tokens of a chunked layer, cut at chunk boundaries into P pieces padded to Q
    queries and K keys (both at most the chunk size): one batched attention for all of them."""

    rows: torch.Tensor  # [P * Q]: each query's row in the flat batch (padding: row 0)
    valid: torch.Tensor  # [R]: positions in [P * Q] that are real queries
    slots: torch.Tensor  # [P, K]: cache slots of each piece's keys (padding: slot 0)
    mask: torch.Tensor  # [P, 1, Q, K] bool (a padded query sees key 0 only, to stay finite)
    num_queries: int  # Q


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
    _plans: dict[int | None, tuple[list[DecodePlan], list[PrefillPlan], ChunkPiecesPlan | None]] = field(
        default_factory=dict, repr=False
    )
    # The same tables on the host, where the caller built them (the decode plans are made there);
    # copied back from the device when not given.
    host_block_tables: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def plan(
        self, chunk_size: int | None
    ) -> tuple[list[DecodePlan], list[PrefillPlan], ChunkPiecesPlan | None]:
        if chunk_size not in self._plans:
            self._plans[chunk_size] = self._build(chunk_size)
        return self._plans[chunk_size]

    @staticmethod
    def _key_window(first_q: int, chunk_size: int | None) -> int:
        """First key position a sequence's queries may see: its chunk start, or 0."""
        return 0 if chunk_size is None else (first_q // chunk_size) * chunk_size

    def _build(
        self, chunk_size: int | None
    ) -> tuple[list[DecodePlan], list[PrefillPlan], ChunkPiecesPlan | None]:
        device, bs = self.block_tables.device, self.block_size
        decode_idx, decode_rows, prefills = [], [], []
        pieces: list[tuple[int, int, int, int]] = []  # (seq, first row, first query pos, end pos)
        row = 0
        for s, (n, total) in enumerate(zip(self.query_lens, self.seq_lens, strict=True)):
            if n == 1:
                decode_idx.append(s)
                decode_rows.append(row)
            elif chunk_size is not None:
                q = total - n
                while q < total:
                    end = min(total, (q // chunk_size + 1) * chunk_size)
                    pieces.append((s, row + q - (total - n), q, end))
                    q = end
            else:
                key_pos = torch.arange(total, device=device)  # [K]
                q_pos = torch.arange(total - n, total, device=device)  # [n]
                slots = self.block_tables[s, key_pos // bs].long() * bs + key_pos % bs
                prefills.append(PrefillPlan(row, n, slots, key_pos[None, :] <= q_pos[:, None]))
            row += n
        windows = []  # (decode index, first key position, total) of each decode
        for s_i in decode_idx:
            total = self.seq_lens[s_i]
            windows.append((s_i, self._key_window(total - 1, chunk_size), total))
        rows = dict(zip(decode_idx, decode_rows, strict=True))
        decodes = [self._decode_group(g, rows) for g in _length_groups(windows)]
        return decodes, prefills, self._chunk_pieces(pieces, chunk_size) if pieces else None

    def _chunk_pieces(self, pieces: list[tuple[int, int, int, int]], chunk_size: int) -> ChunkPiecesPlan:
        """pieces: (seq, first row, first query position, end position), each inside one chunk. A
        piece's keys run from its chunk's start to its end; its queries are its last positions."""
        device, bs = self.block_tables.device, self.block_size
        seq, row0, q0, end = (torch.tensor(c, device=device)[:, None] for c in zip(*pieces, strict=True))
        k0 = q0 // chunk_size * chunk_size
        Q = max(e - q for _, _, q, e in pieces)
        K = max(e - q // chunk_size * chunk_size for _, _, q, e in pieces)
        q_pos = q0 + torch.arange(Q, device=device)  # [P, Q]
        key_pos = k0 + torch.arange(K, device=device)  # [P, K]
        q_valid, k_valid = q_pos < end, key_pos < end
        mask = (key_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]  # [P, Q, K]
        mask[:, :, 0] |= ~q_valid  # padded queries: one key, so the softmax stays finite
        key_pos = torch.where(k_valid, key_pos, 0)
        slots = self.block_tables[seq, key_pos // bs].long() * bs + key_pos % bs
        rows = torch.where(q_valid, row0 + q_pos - q0, 0).reshape(-1)
        valid = q_valid.reshape(-1).nonzero().squeeze(1)
        return ChunkPiecesPlan(rows, valid, slots, mask[:, None], Q)

    def _decode_group(self, group: list[tuple[int, int, int]], rows: dict[int, int]) -> DecodePlan:
        """Built on the host in numpy (a handful of vector operations, then one copy per tensor):
        the per-step planning cost is paid by every decode step."""
        device, bs = self.block_tables.device, self.block_size
        seq, start, total = (np.array(c) for c in zip(*group, strict=True))
        key_pos = start[:, None] + np.arange(int((total - start).max()))  # [S_d, K]
        valid = key_pos < total[:, None]
        key_pos = np.where(valid, key_pos, 0)
        blocks = np.take_along_axis(self._host_tables()[seq], key_pos // bs, axis=1)
        slots = blocks.astype(np.int64) * bs + key_pos % bs
        return DecodePlan(
            torch.tensor([rows[s] for s in seq.tolist()], device=device),
            torch.from_numpy(slots).to(device),
            torch.from_numpy(valid[:, None, None, :]).to(device),
        )

    def _host_tables(self) -> np.ndarray:
        if self.host_block_tables is None:
            self.host_block_tables = self.block_tables.cpu().numpy()
        return self.host_block_tables


@dataclass
class DecodeMetadata:
    """A pure-decode step in fixed shapes: each of B rows brings one new token (at position
    seq_len - 1), so every tensor has B rows whatever the sequences' lengths, nothing is planned on
    the host, and a CUDA graph captured for B replays any such step. Attention runs the Triton
    kernel `maverick.kernels.paged_attention.paged_decode_attention` and the MoE the fixed-shape
    kernel `maverick.kernels.moe.fused_moe`.

    Padding rows (a batch smaller than its graph's B): seq_len 0 (attention reads nothing and
    returns zeros; the MoE skips them) and a slot in a scratch KV block that no sequence owns.
    """

    slot_mapping: torch.Tensor  # [B] int64: cache slot of each new token (padding: the scratch slot)
    block_tables: torch.Tensor  # [B, max_blocks] int32; entries past a sequence's blocks are never read
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step; 0 = padding row
    num_splits: int = 1  # programs sharing one sequence's keys (flash-decoding), see paged_decode_attention
    # the same contracts in plain PyTorch (kernels/torch_decode.py: the CPU's compiled decode) instead
    # of the Triton kernels; block_tables then holds the batch's columns only (they are all read)
    torch_kernels: bool = False

    def real_rows(self) -> torch.Tensor:
        """[B] bool: rows that are not padding."""
        return self.seq_lens > 0


# Below this many keys, padding a decode to its group's width costs less than one more gather and
# attention call (measured on CPU); chunked layers' decodes then always form one group.
MIN_GROUP_KEYS = 128


def _length_groups(windows: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Decodes grouped so that each is padded to at most twice its own key count (or to
    MIN_GROUP_KEYS): one padded batch per group instead of all padded to the longest
    (full-attention layers see contexts of very different lengths)."""
    ordered = sorted(windows, key=lambda w: w[2] - w[1], reverse=True)
    groups: list[list[tuple[int, int, int]]] = []
    for w in ordered:
        if groups:
            lead = groups[-1][0][2] - groups[-1][0][1]
            if 2 * (w[2] - w[1]) >= lead or lead <= MIN_GROUP_KEYS:
                groups[-1].append(w)
                continue
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
    decodes, prefills, pieces = meta.plan(chunk_size)
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
    if pieces is not None:
        out[pieces.rows[pieces.valid]] = _chunk_pieces_attention(q, k_flat, v_flat, pieces, scale)
    return out


def _chunk_pieces_attention(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, plan: ChunkPiecesPlan, scale: float
) -> torch.Tensor:
    """q [T, H, D]; k_flat, v_flat [slots, Hkv, D] -> [R, H, D] for the plan's real queries.

    GQA: the G query heads of a KV head are folded into the query axis ([P, Hkv, G * Q, D], the
    mask repeated G times), so K/V are neither repeated nor expanded."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    group, Q = num_heads // num_kv_heads, plan.num_queries
    P, K = plan.slots.shape
    q_p = q.index_select(0, plan.rows).view(P, Q, num_kv_heads, group, head_dim)
    q_p = q_p.permute(0, 2, 3, 1, 4).reshape(P, num_kv_heads, group * Q, head_dim)
    flat = plan.slots.reshape(-1)
    k_p = k_flat.index_select(0, flat).view(P, K, num_kv_heads, head_dim).to(q.dtype).transpose(1, 2)
    v_p = v_flat.index_select(0, flat).view(P, K, num_kv_heads, head_dim).to(q.dtype).transpose(1, 2)
    mask = plan.mask.repeat(1, 1, group, 1)  # [P, 1, G * Q, K], in the (g, q) order of q_p
    o = F.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=mask, scale=scale)  # [P, Hkv, G*Q, D]
    o = o.view(P, num_kv_heads, group, Q, head_dim).permute(0, 3, 1, 2, 4).reshape(P * Q, num_heads, head_dim)
    return o.index_select(0, plan.valid)


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
