"""Projections of one input that run as one matmul but live apart in the checkpoint.

`MergedColumnLinear` holds q/k/v (or gate/up) stacked along the output rows: one GEMM instead of
three (or two) per layer. The checkpoint keeps `q_proj`, `k_proj`, ...; the loader fills each
part's rows (`part_rows`) with the part's tensor-parallel piece (`part_shards`), so a rank's
weight is [q_rank; k_rank; v_rank].
"""

import torch
from torch import nn

from maverick.layers.parallel import Shard


class MergedColumnLinear(nn.Linear):
    def __init__(self, in_features: int, parts: dict[str, tuple[int, Shard | None]], dtype: torch.dtype):
        """parts: checkpoint module name -> (its output rows on this rank, the rank's piece of the
        checkpoint tensor or None when whole), in stacking order."""
        super().__init__(in_features, sum(rows for rows, _ in parts.values()), bias=False, dtype=dtype)
        self.parts = {name: rows for name, (rows, _) in parts.items()}
        self.part_shards = {name: shard for name, (_, shard) in parts.items()}
        self.part_sizes = list(self.parts.values())

    def part_rows(self, name: str) -> slice:
        start = 0
        for part, size in self.parts.items():
            if part == name:
                return slice(start, start + size)
            start += size
        raise KeyError(name)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[.., sum(parts)] -> one tensor per part."""
        return y.split_with_sizes(self.part_sizes, dim=-1)  # (Tensor.split is a Python wrapper)
