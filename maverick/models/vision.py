"""Llama 4 vision tower and multimodal projector.

One 336×336 tile becomes 576 patch vectors plus a CLS vector (appended last); a pre-LN ViT with
2-D RoPE encodes them; the CLS is dropped, 2×2 neighbouring patches are folded into channels (pixel
shuffle) and an MLP adapter maps each to `vision_output_dim`. The projector then maps those into
the text model's hidden size, where they replace the `<|patch|>` token embeddings in order.

Parameter names equal the Hugging Face checkpoint keys under `vision_model.` and
`multi_modal_projector.`, so a strict loader fills them by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maverick.config import VisionConfig
from maverick.layers.rope import apply_rope, rotation_tables

# The reference builds every vision LayerNorm with PyTorch's default eps and ignores `norm_eps`.
LAYER_NORM_EPS = 1e-5


def vision_rope_cos_sin(cfg: VisionConfig, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """2-D RoPE table for one tile: cos, sin [patches + 1, head_dim // 2] in fp32.

    Pairs [0, head_dim/4) rotate by the patch column, pairs [head_dim/4, head_dim/2) by its row (both
    1-based); the CLS row (last) has angle 0, i.e. it is not rotated.
    """
    side = cfg.patches_per_side
    freq_dim = cfg.head_dim // 2
    exponents = torch.arange(0, freq_dim, 2, device=device)[: freq_dim // 2].float() / freq_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)  # [head_dim // 4]
    idx = torch.arange(side * side, device=device)
    col = (idx % side + 1).float()[:, None] * inv_freq  # [patches, head_dim // 4]
    row = (idx // side + 1).float()[:, None] * inv_freq  # [patches, head_dim // 4]
    angles = torch.cat([col, row], dim=-1)  # [patches, head_dim // 2]
    angles = torch.cat([angles, angles.new_zeros(1, angles.shape[1])])  # [patches + 1, head_dim // 2]
    return torch.cos(angles), torch.sin(angles)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[tiles, side², C] -> [tiles, (side·ratio)², C/ratio²].

    Each output token at (i, j) concatenates the s×s block x[s·i + di, s·j + dj] (s = 1/ratio) in
    (di, dj) row-major order, as the reference's two view/permute steps do.
    """
    tiles, n, channels = x.shape
    side, s = int(round(n**0.5)), int(round(1 / ratio))
    x = x.view(tiles, side // s, s, side // s, s, channels)  # [tiles, i, di, j, dj, C]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(tiles, (side // s) ** 2, s * s * channels)


class PatchEmbedding(nn.Module):
    """Non-overlapping patches flattened (channel, dy, dx) and projected; no bias."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.linear = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # [tiles, 3·p², 576], each column one patch flattened (channel, dy, dx)
        patches = F.unfold(pixel_values, kernel_size=self.patch_size, stride=self.patch_size)
        return self.linear(patches.transpose(1, 2))  # [tiles, 576, hidden]


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention over one tile's tokens, with biases and 2-D RoPE."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tiles, n, hidden = x.shape
        q = self.q_proj(x).view(tiles, n, -1, self.head_dim)  # [tiles, 577, heads, head_dim]
        k = self.k_proj(x).view(tiles, n, -1, self.head_dim)
        v = self.v_proj(x).view(tiles, n, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # fp32 inside, cast back
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(tiles, n, hidden))  # [tiles, 577, hidden]


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


class AdapterMLP(nn.Module):
    """fc1 -> GELU -> fc2 -> GELU, no biases."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.intermediate_size, cfg.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(cfg.projector_output_dim, cfg.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class VisionAdapter(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = AdapterMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle(x, self.ratio)  # [tiles, 144, hidden / ratio²]
        return self.mlp(x)  # [tiles, 144, vision_output_dim]


class VisionModel(nn.Module):
    """pixel_values [tiles, 3, 336, 336] -> [tiles, tokens_per_tile, vision_output_dim]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.head_dim % 4:
            raise ValueError(f"vision head_dim {cfg.head_dim} must be a multiple of 4 for 2-D RoPE")
        if abs(1 / cfg.pixel_shuffle_ratio - round(1 / cfg.pixel_shuffle_ratio)) > 1e-6:
            raise ValueError(f"vision pixel_shuffle_ratio {cfg.pixel_shuffle_ratio} must be 1/integer")
        if cfg.patches_per_side % round(1 / cfg.pixel_shuffle_ratio):
            raise ValueError("vision patches_per_side must be divisible by 1/pixel_shuffle_ratio")
        if cfg.projector_input_dim != cfg.projector_output_dim:
            raise ValueError("vision projector_input_dim must equal projector_output_dim (fc1 feeds fc2)")
        self.cfg = cfg
        num_positions = cfg.patches_per_side**2 + 1
        scale = cfg.hidden_size**-0.5
        self.patch_embedding = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(scale * torch.randn(num_positions, cfg.hidden_size))
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.model = VisionEncoder(cfg)
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.vision_adapter = VisionAdapter(cfg)
        # The RoPE table is derived, not learned: kept out of state_dict and out of `.to(dtype)` (it
        # stays fp32), and rebuilt per device, so meta-device construction needs no extra step.
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != device:
            self._rope = rotation_tables(*vision_rope_cos_sin(self.cfg, device))
        return self._rope

    def forward(self, pixel_values: torch.Tensor, max_tiles_per_batch: int | None = None) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != self.expected_tile_shape:
            want = ", ".join(map(str, self.expected_tile_shape))
            raise ValueError(f"pixel_values must be [tiles, {want}], got {list(pixel_values.shape)}")
        if max_tiles_per_batch is None or pixel_values.shape[0] <= max_tiles_per_batch:
            return self._encode(pixel_values)
        return torch.cat([self._encode(c) for c in pixel_values.split(max_tiles_per_batch)])

    @property
    def expected_tile_shape(self) -> tuple[int, int, int]:
        return (self.cfg.num_channels, self.cfg.image_size, self.cfg.image_size)

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.linear.weight
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        x = self.patch_embedding(pixel_values)  # [tiles, 576, hidden]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm  # [tiles, 577, hidden]
        x = self.layernorm_pre(x)
        cos, sin = self.rope(x.device)
        x = self.layernorm_post(self.model(x, cos, sin))
        return self.vision_adapter(x[:, :-1])  # [tiles, tokens_per_tile, vision_output_dim]


class MultiModalProjector(nn.Module):
    """Image features [.., vision_output_dim] -> text embeddings [.., text hidden_size]; no bias."""

    def __init__(self, vision_output_dim: int, text_hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_output_dim, text_hidden_size, bias=False)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(image_features)
