"""Llama 4 mixture of experts: top-1 sigmoid router, routed experts, and an ungated shared expert.

out = shared_expert(x) + expert_e(x * sigmoid(router_logit_e)),  e = argmax(router(x))

The router score scales the expert's *input* (not its output), with no renormalisation. Routed
experts are stacked: w13 [E, 2I, H] (gate rows then up rows) and w2 [E, H, I], either in FP8 with
per-row scales (`_scaled_mm`, per-token activation scales) or in a float dtype.

Two ways to run the routed experts: the eager reference (`RoutedExperts.forward`: tokens grouped by
expert on the host, any batch, any device), and a fixed-shape Triton kernel for decode batches
(`maverick.kernels.moe.fused_moe`: no host sync, so a CUDA graph can capture it; FP8 weights are
dequantised on the fly and the activations are *not* quantised, unlike the eager FP8 path).
"""

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from maverick.kernels import torch_decode
from maverick.kernels.moe import fused_moe
from maverick.layers.fp8 import FP8_DTYPE, fp8_linear
from maverick.layers.mlp import MLP
from maverick.layers.parallel import SINGLE, TensorParallel


class RoutedExperts(nn.Module):
    """Every expert on every rank, each rank holding a slice of every expert's intermediate rows
    (gate/up rows, down columns; at TP 8 Maverick's 128 × 5120 × 1024). Not whole experts per rank:
    with top-1 routing over 128 experts a step's tokens land unevenly, so an expert-parallel rank
    that drew the busy experts would hold up the others, and tokens would have to travel between
    ranks; split by the intermediate dimension, every rank does the same work for every token and
    the partial outputs join the shared expert's in the layer's one all-reduce."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        fp8: bool,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.tp = tp  # the loader slices each expert's projections for this rank (checkpoint.py)
        self.intermediate_size = tp.divide(intermediate_size, "intermediate_size")  # on this rank
        self.fp8 = fp8
        wdtype = FP8_DTYPE if fp8 else dtype
        E, H, inter = num_experts, hidden_size, self.intermediate_size
        self.w13 = nn.Parameter(torch.empty(E, 2 * inter, H, dtype=wdtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, H, inter, dtype=wdtype), requires_grad=False)
        if fp8:
            self.w13_scale = nn.Parameter(torch.empty(E, 2 * inter, dtype=torch.float32), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(E, H, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H] (already scaled by the router); expert_ids [T] -> [T, H].

        Tokens are grouped by expert: float experts run as two batched matmuls over all experts
        (groups padded to the largest), FP8 experts one `_scaled_mm` pair per expert with tokens.
        """
        if not self.fp8:
            return self._batched(x, expert_ids)
        order = torch.argsort(expert_ids, stable=True)
        counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()
        ends = list(accumulate(counts))  # expert e's tokens: order[ends[e] - counts[e] : ends[e]]
        groups = [(e, order[ends[e] - n : ends[e]]) for e, n in enumerate(counts) if n]
        h = x.new_empty(x.shape[0], self.intermediate_size)  # [T, I] (this rank's columns)
        for e, rows in groups:
            gate, up = fp8_linear(x[rows], self.w13[e], self.w13_scale[e]).chunk(2, dim=-1)
            h[rows] = F.silu(gate) * up
        # Each token's activation scale for the down projection from its whole row of h, as on
        # one rank: ranks that each scaled their own columns would round differently.
        amax = self.tp.all_reduce_max(h.abs().amax(dim=-1, keepdim=True).float())  # [T, 1]
        out = torch.zeros_like(x)
        for e, rows in groups:
            out[rows] = fp8_linear(h[rows], self.w2[e], self.w2_scale[e], amax[rows])
        return out

    def forward_fixed_shape(
        self, x: torch.Tensor, expert_ids: torch.Tensor, torch_kernels: bool = False
    ) -> torch.Tensor:
        """x [T, H], expert_ids [T] -> [T, H] through the Triton kernel: fixed shapes, no host sync
        (graph-capturable). Rows whose id is outside [0, E) are skipped (zeros). FP8 weights are
        dequantised in the kernel with the activations left unquantised: this differs from
        `forward`'s FP8 path (per-token e4m3 activations through `_scaled_mm`) by that rounding.
        `torch_kernels`: float experts in plain PyTorch instead (kernels/torch_decode.py, what a
        compiled CPU graph runs)."""
        if torch_kernels:
            if self.fp8:
                raise ValueError("the compiled decode path runs float experts only (experts='dequant')")
            return torch_decode.routed_experts(x, expert_ids, self.w13, self.w2)
        if self.fp8:
            return fused_moe(x, expert_ids, self.w13, self.w2, self.w13_scale, self.w2_scale)
        return fused_moe(x, expert_ids, self.w13, self.w2)

    def _batched(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        T, H = x.shape
        order = torch.argsort(expert_ids, stable=True)  # [T]: tokens grouped by expert
        counts = torch.bincount(expert_ids, minlength=self.num_experts)  # [E]
        starts = torch.cumsum(counts, 0) - counts
        sorted_ids = expert_ids[order]
        slot = torch.arange(T, device=x.device) - starts[sorted_ids]  # position within its group
        capacity = int(counts.max())
        grouped = x.new_zeros(self.num_experts, capacity, H)  # [E, C, H]
        grouped[sorted_ids, slot] = x[order]
        gate, up = torch.bmm(grouped, self.w13.transpose(1, 2)).chunk(2, dim=-1)  # [E, C, I] each
        y = torch.bmm(F.silu(gate) * up, self.w2.transpose(1, 2))  # [E, C, H]
        out = torch.empty_like(x)
        out[order] = y[sorted_ids, slot]
        return out


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (expert_ids [T], scores [T] in x's dtype): top-1 on raw logits, sigmoid score."""
        logits = x @ self.weight.t()  # [T, E]
        top_logit, expert_ids = logits.max(dim=-1)
        return expert_ids, torch.sigmoid(top_logit.float()).to(x.dtype)


class MoE(nn.Module):
    """Router replicated on every rank (each routes the same tokens the same way); routed and
    shared experts split by their intermediate dimension, their partial outputs summed over ranks
    once."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        dtype: torch.dtype,
        fp8: bool,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        self.tp = tp
        self.router = Router(hidden_size, num_experts, dtype)
        self.experts = RoutedExperts(num_experts, hidden_size, intermediate_size, dtype, fp8, tp)
        self.shared_expert = MLP(hidden_size, intermediate_size, dtype, tp, reduce=False)
        # The routed experts of every step (prefill and mixed too) through the fused kernel rather
        # than the grouped reference; set by Llama4Model.use_moe_kernel.
        self.kernel = False

    def forward(
        self,
        x: torch.Tensor,
        fixed_shape: bool = False,
        real_rows: torch.Tensor | None = None,
        torch_kernels: bool = False,
    ) -> torch.Tensor:
        """x [T, H] -> [T, H]. fixed_shape: routed experts through the graph-capturable kernel,
        skipping the rows where real_rows [T] bool is False (padding of a graph batch). With
        `kernel` set, every step's routed experts go through that kernel."""
        expert_ids, scores = self.router(x)
        if fixed_shape or self.kernel:
            if real_rows is not None:
                expert_ids = torch.where(real_rows, expert_ids, self.experts.num_experts)  # E: skipped
            routed = self.experts.forward_fixed_shape(x * scores[:, None], expert_ids, torch_kernels)
        else:
            routed = self.experts(x * scores[:, None], expert_ids)
        return self.tp.all_reduce(self.shared_expert(x) + routed)
