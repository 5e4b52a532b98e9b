"""Rotary position embedding in Llama 4's convention, and NoPE attention temperature tuning.

Llama 4 rotates *adjacent* pairs (x[2i], x[2i+1]) as one complex number (Meta's `freqs_cis`
convention); Hugging Face stores the q/k weights unpermuted for it, so no load-time permutation.
All angle math runs in fp32, whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maverick.config import TextConfig


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, head_dim // 2] in fp32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, head_dim // 2]
    return torch.cos(angles), torch.sin(angles)


def rotation_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., head_dim // 2] -> the pair-interleaved tables `apply_rope` takes, [..., head_dim]:
    cos at 2i and 2i + 1, -sin at 2i and +sin at 2i + 1. Built once per step (or per tile shape)."""
    # stack, not repeat_interleave: no host sync inside a captured CUDA graph on any torch version
    return torch.stack((cos, cos), dim=-1).flatten(-2), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] (or [..., T, heads, head_dim]); cos/sin [T, head_dim] from
    `rotation_tables`. Rotates pairs (a, b) = (x[2i], x[2i+1]) to (a cos - b sin, a sin + b cos).

    As x * cos + swap_pairs(x) * sin: the same products and sums as the complex form, so the same
    bits, in four kernels instead of a dozen (this runs on q and k of every RoPE layer each step).
    """
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b, a) for each pair (a, b)
    return (x32 * cos[:, None] + swapped * sin[:, None]).type_as(x)


def attn_temperature(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Per-token query scale for NoPE layers: log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1.

    Exactly 1 below position floor_scale - 1, so it only matters for long contexts. positions [T] -> [T] fp32.
    """
    return torch.log1p(torch.floor((positions.to(torch.float32) + 1.0) / floor_scale)) * attn_scale + 1.0


@dataclass(frozen=True)
class PositionTables:
    """What the text attention layers need of this step's positions, computed once per step."""

    cos: torch.Tensor  # [T, head_dim] fp32, pair-interleaved (`rotation_tables`)
    sin: torch.Tensor  # [T, head_dim] fp32, signed
    q_scale: torch.Tensor | None  # [T, 1, 1] fp32 NoPE query temperature; None when tuning is off

    @classmethod
    def build(cls, positions: torch.Tensor, cfg: TextConfig) -> PositionTables:
        """positions [T]."""
        cos, sin = rotation_tables(*rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta))
        q_scale = None
        if cfg.attn_temperature_tuning:
            q_scale = attn_temperature(positions, cfg.floor_scale, cfg.attn_scale)[:, None, None]
        return cls(cos, sin, q_scale)
