"""Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used by dense layers and the shared expert."""

import torch
import torch.nn.functional as F
from torch import nn

from maverick.layers.linear import MergedColumnLinear
from maverick.layers.parallel import set_tp_dim


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        # gate and up in one GEMM (checkpoint: gate_proj, up_proj), column parallel
        self.gate_up_proj = MergedColumnLinear(
            hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size}, dtype
        )
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)
        set_tp_dim(self.down_proj.weight, 1)  # row parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.silu(gate) * up)
