"""Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used by dense layers and the shared expert."""

import torch
import torch.nn.functional as F
from torch import nn

from maverick.layers.parallel import set_tp_dim


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)
        set_tp_dim(self.gate_proj.weight, 0)  # column parallel
        set_tp_dim(self.up_proj.weight, 0)
        set_tp_dim(self.down_proj.weight, 1)  # row parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
