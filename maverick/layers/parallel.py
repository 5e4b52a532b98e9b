"""Tensor parallelism: which slice of each weight a rank holds, and the two collectives the
forward needs.

Every parameter that ranks split carries a `Shard`: the dimension, how many equal pieces it is cut
into and which piece this rank holds. The checkpoint loader reads only that piece from the file.
Parameters without one are replicated. Layers are built with per-rank sizes (`divide`).

The layout (Megatron's): a column-parallel projection splits its output rows, the row-parallel one
after it splits its input columns, and the partial sums of the row-parallel output are added up
with one all-reduce. Embedding and LM head split the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """Piece `index` of `count` equal pieces along `dim`."""

    dim: int
    index: int
    count: int

    def full_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The whole tensor's shape, given the piece's."""
        return tuple(n * self.count if d == self.dim else n for d, n in enumerate(shape))

    def bounds(self, size: int) -> tuple[int, int]:
        """[start, end) of this piece in a dimension of `size`."""
        part = size // self.count
        return self.index * part, (self.index + 1) * part

    def take(self, tensor: Any) -> Any:
        """This piece of `tensor` (a torch tensor, or a safetensors slice, read only in part)."""
        start, end = self.bounds(shape_of(tensor)[self.dim])
        index = (slice(None),) * self.dim + (slice(start, end),)
        return tensor[index]


def shape_of(tensor: Any) -> tuple[int, ...]:
    """A torch tensor's shape, or a safetensors slice's (before anything is read)."""
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())


def set_shard(param: torch.Tensor, shard: Shard | None) -> None:
    if shard is not None and shard.count > 1:
        param.shard = shard  # type: ignore[attr-defined]


def shard_of(param: torch.Tensor) -> Shard | None:
    return getattr(param, "shard", None)


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group. `group` None: a single rank (no collective
    runs); otherwise a torch.distributed process group of `size` ranks."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def divide(self, n: int, what: str) -> int:
        """n / size, or an error naming the dimension that does not divide."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) does not divide by tensor_parallel_size {self.size}")
        return n // self.size

    def shard(self, dim: int) -> Shard | None:
        """This rank's piece of a dimension split evenly over the group (None on a single rank)."""
        return Shard(dim, self.rank, self.size) if self.size > 1 else None

    def kv_heads(self, num_kv_heads: int, num_heads: int) -> tuple[int, Shard | None]:
        """(KV heads per rank, the rank's piece of the k/v rows' head dimension). With fewer KV heads
        than ranks each rank holds the one KV head its query heads attend with (replicated over
        size / num_kv_heads ranks)."""
        if num_kv_heads >= self.size:
            return self.divide(num_kv_heads, "num_key_value_heads"), self.shard(0)
        if self.size % num_kv_heads:
            raise ValueError(
                f"num_key_value_heads ({num_kv_heads}) must divide tensor_parallel_size {self.size} "
                "when it is smaller"
            )
        self.divide(num_heads, "num_attention_heads")
        return 1, Shard(0, self.rank * num_kv_heads // self.size, num_kv_heads)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a row-parallel layer's partial outputs)."""
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over ranks, in place."""
        if self.group is not None:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank order along the last dimension."""
        if self.group is None:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()
