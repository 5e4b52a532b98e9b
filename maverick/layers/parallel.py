"""Tensor-parallel annotations. Each parameter may carry `tp_dim`: the dimension that a
tensor-parallel rank takes a slice of (0 = column parallel, 1 = row parallel for [out, in] weights;
the expert stacks name their own). Parameters without it are replicated. The checkpoint loader reads
the annotation to slice each tensor for its rank; layers are built with per-rank sizes.
"""

import torch


def set_tp_dim(param: torch.Tensor, dim: int) -> None:
    param.tp_dim = dim  # type: ignore[attr-defined]


def tp_slice(tensor: torch.Tensor, dim: int | None, rank: int, world_size: int) -> torch.Tensor:
    """The rank's contiguous slice of `tensor` along `dim` (the whole tensor when dim is None)."""
    if dim is None or world_size == 1:
        return tensor
    size = tensor.shape[dim]
    if size % world_size:
        raise ValueError(
            f"cannot split dimension {dim} of size {size} over {world_size} tensor-parallel ranks"
        )
    part = size // world_size
    return tensor.narrow(dim, rank * part, part)
