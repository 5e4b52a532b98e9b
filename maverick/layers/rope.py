"""Rotary position embedding in Llama 4's convention, and NoPE attention temperature tuning.

Llama 4 rotates *adjacent* pairs (x[2i], x[2i+1]) as one complex number (Meta's `freqs_cis`
convention); Hugging Face stores the q/k weights unpermuted for it, so no load-time permutation.
All angle math runs in fp32, whatever the model dtype.
"""

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, head_dim // 2] in fp32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, head_dim // 2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, head_dim // 2]. Rotates pairs (2i, 2i+1)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [T, heads, head_dim // 2, 2]
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def attn_temperature(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Per-token query scale for NoPE layers: log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1.

    Exactly 1 below position floor_scale - 1, so it only matters for long contexts. positions [T] -> [T] fp32.
    """
    return torch.log1p(torch.floor((positions.to(torch.float32) + 1.0) / floor_scale)) * attn_scale + 1.0
