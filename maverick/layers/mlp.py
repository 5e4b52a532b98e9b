"""Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used by dense layers and the shared expert.

Tensor parallel: gate/up column parallel, down row parallel; the partial outputs are summed over
ranks here, or by the caller (`reduce=False`: the MoE adds the routed experts' partials first and
reduces once)."""

import torch
import torch.nn.functional as F
from torch import nn

from maverick.layers.linear import MergedColumnLinear
from maverick.layers.parallel import SINGLE, TensorParallel, set_shard


class MLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        tp: TensorParallel = SINGLE,
        reduce: bool = True,
    ):
        super().__init__()
        self.tp, self.reduce = tp, reduce
        inter = tp.divide(intermediate_size, "intermediate_size")
        # gate and up in one GEMM (checkpoint: gate_proj, up_proj), column parallel
        self.gate_up_proj = MergedColumnLinear(
            hidden_size, {"gate_proj": (inter, tp.shard(0)), "up_proj": (inter, tp.shard(0))}, dtype
        )
        self.down_proj = nn.Linear(inter, hidden_size, bias=False, dtype=dtype)
        set_shard(self.down_proj.weight, tp.shard(1))  # row parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        out = self.down_proj(F.silu(gate) * up)
        return self.tp.all_reduce(out) if self.reduce else out
