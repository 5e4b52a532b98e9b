"""How the engine executes, decided once at start: the settings' `decode_path` and `moe_path`
("auto" among them) become the concrete choices the model runner follows. "compiled" (opt-in, the
CPU's fast decode path: engine/cuda_graph.py) is never what "auto" picks yet.

An explicit choice that cannot run here fails the start with the reason; "auto" and
"cuda_graph" off CUDA fall back to the reference path (with one log line saying why), because the
reference path computes the same tokens everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from maverick.engine.api import DecodePath, MoEPath
from maverick.engine.cuda_graph import kernels_run_on

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutionModes:
    fixed_shape_decode: bool = False  # pure-decode steps through the fixed-shape Triton kernels
    cuda_graphs: bool = False  # ... replayed from CUDA graphs (only with fixed_shape_decode)
    moe_kernel: bool = False  # routed experts of prefill and mixed steps through the fused kernel
    # ... or in plain PyTorch through torch.compile (the CPU's; only with fixed_shape_decode), which
    # also runs a mixed step's decodes (model_runner.py)
    compiled: bool = False

    def __post_init__(self) -> None:
        if (self.cuda_graphs or self.compiled) and not self.fixed_shape_decode:
            raise ValueError(
                "cuda_graphs and compiled run the fixed-shape decode path: set fixed_shape_decode"
            )
        if self.cuda_graphs and self.compiled:
            raise ValueError("the fixed-shape decode path runs from CUDA graphs or compiled, not both")

    @property
    def decode(self) -> str:
        """The decode path in the settings' words: "cuda_graph", "compiled", "static" or "reference"."""
        if self.cuda_graphs or self.compiled:
            return "cuda_graph" if self.cuda_graphs else "compiled"
        return "static" if self.fixed_shape_decode else "reference"


REFERENCE = ExecutionModes()  # every step through the reference forward


def kernels_missing(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on this device, or None."""
    if kernels_run_on(device):
        return None
    return (
        "it runs Triton kernels: it needs triton and a CUDA device "
        f"(or TRITON_INTERPRET=1 on the CPU, for tests); the device is {device}"
    )


def fixed_shape_unsupported(device: torch.device, block_size: int, head_dim: int) -> str | None:
    """Why the fixed-shape decode kernels cannot run this model and cache here, or None."""
    if why_not := kernels_missing(device):
        return why_not
    if block_size & (block_size - 1) or head_dim & (head_dim - 1) or head_dim < 16:
        return f"it needs a power-of-two block_size and head_dim >= 16 (got {block_size}, {head_dim})"
    return None


def compiled_unsupported(device: torch.device, tensor_parallel_size: int) -> str | None:
    """Why the compiled decode path (torch.compile of the plain-PyTorch kernels) cannot run here, or None."""
    if device.type != "cpu":
        return f"it is the CPU's decode path (CUDA replays graphs: 'cuda_graph'); the device is {device}"
    if tensor_parallel_size > 1:
        return f"it runs one rank (tensor_parallel_size is {tensor_parallel_size})"
    return None


def resolve_modes(
    decode_path: DecodePath,
    moe_path: MoEPath,
    device: torch.device,
    block_size: int,
    head_dim: int,
    tensor_parallel_size: int = 1,
) -> ExecutionModes:
    if moe_path == "kernel" and (why_not := kernels_missing(device)):
        raise ValueError(f"moe_path 'kernel': {why_not}")
    if decode_path == "compiled":
        if why_not := compiled_unsupported(device, tensor_parallel_size):
            raise ValueError(f"decode_path 'compiled': {why_not}")
        return ExecutionModes(fixed_shape_decode=True, compiled=True, moe_kernel=moe_path == "kernel")
    cuda = device.type == "cuda"
    if decode_path == "auto":
        why_not = fixed_shape_unsupported(device, block_size, head_dim) if cuda else "no CUDA"
        if why_not and cuda:
            log.warning("decode_path 'auto': decoding on the reference path, not CUDA graphs: %s", why_not)
        decode_path = "reference" if why_not else "cuda_graph"
    elif decode_path == "cuda_graph" and not cuda:
        log.warning("decode_path 'cuda_graph' needs CUDA: %s decodes on the reference path", device)
        decode_path = "reference"
    if decode_path != "reference" and (why_not := fixed_shape_unsupported(device, block_size, head_dim)):
        raise ValueError(f"decode_path {decode_path!r}: {why_not}")
    return ExecutionModes(
        fixed_shape_decode=decode_path != "reference",
        cuda_graphs=decode_path == "cuda_graph",
        moe_kernel=moe_path == "kernel",
    )
